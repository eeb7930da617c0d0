"""Build-time check of the training image (run by the Dockerfile; also usable inside any image).

    python docker/check_container.py --bridge 0.6.2 --core 0.19.2 [--sync]
    python docker/check_container.py --extras requirements.in PKG [PKG ...]

--sync installs the pinned megatron-bridge / megatron-core patch releases with --no-deps when the
image carries another patch release of the same minor line, and refuses a different line.
Without --sync it only checks: versions equal the pins, and the GPU stack imports.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import subprocess
import sys


def installed(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def minor_line(version: str) -> str:
    return ".".join(version.split(".")[:2])


def sync(pins: dict[str, str]) -> None:
    for pkg, want in pins.items():
        have = installed(pkg)
        if have == want:
            print(f"{pkg} {have}: as pinned")
            continue
        if have is not None and minor_line(have) != minor_line(want):
            sys.exit(f"{pkg} {have} in the base image is not the {minor_line(want)} line we pin ({want}): "
                     "pick the NeMo tag that carries it instead of patching across lines")
        print(f"{pkg} {have} -> {want} (--no-deps)")
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-deps", f"{pkg}=={want}"])


def install_extras(requirements: str, names: list[str]) -> None:
    pins = {}
    for line in open(requirements):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.lower()] = version
    frozen = subprocess.check_output([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], text=True)
    with open("/tmp/image-constraints.txt", "w") as f:
        f.write(frozen)
    missing = [f"{n}=={pins[n.lower()]}" for n in names if installed(n) is None]
    print("already in the image:", [n for n in names if installed(n) is not None], "installing:", missing)
    if missing:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-cache-dir",
                               "-c", "/tmp/image-constraints.txt", *missing])


def check(pins: dict[str, str]) -> None:
    wrong = {p: installed(p) for p, v in pins.items() if installed(p) != v}
    if wrong:
        sys.exit(f"version mismatch: {wrong}, expected {pins}")
    for module in ("torch", "transformer_engine.pytorch", "megatron.core", "megatron.bridge",
                   "megatron.bridge.training.pretrain", "speechlm.token_layout", "speechlm.train"):
        importlib.import_module(module)  # raises (and fails the build) on a broken import
    import torch

    if torch.version.cuda is None:
        sys.exit("torch in the image is not a CUDA build")
    print("image OK:", {p: installed(p) for p in pins}, "torch", torch.__version__, "cuda", torch.version.cuda)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bridge", help="megatron-bridge version to require")
    parser.add_argument("--core", help="megatron-core version to require")
    parser.add_argument("--sync", action="store_true", help="install the pinned patch releases if needed")
    parser.add_argument("--extras", metavar="REQUIREMENTS", help="install PACKAGES the image lacks at their pins")
    parser.add_argument("packages", nargs="*", help="package names for --extras")
    args = parser.parse_args()
    if args.extras:
        return install_extras(args.extras, args.packages)
    if not (args.bridge and args.core):
        parser.error("--bridge and --core are required")
    pins = {"megatron-bridge": args.bridge, "megatron-core": args.core}
    sync(pins) if args.sync else check(pins)


if __name__ == "__main__":
    main()
