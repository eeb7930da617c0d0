"""SFT refuses a pretraining checkpoint made with another token layout (provenance.json's
layout_hash), before any training: the dry run of the SFT recipe, in a subprocess (Bridge's CPU
mode stays out of this pytest process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO
from speechlm.token_layout import TokenLayout

# train.main as the command line runs it (`python -m speechlm.train --dry-run ...`), once per
# checkpoint in one process: the exit message, or "ok".
_SCRIPT = """
import contextlib, io, json, sys
from speechlm import train
model, blend, report, *ckpts = sys.argv[1:]
out = {}
for ckpt in ckpts:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train.main(["--dry-run", "--config", "recipes/sft_smoke.yaml", f"speechlm.hf_model={model}",
                        f"speechlm.blend={blend}", f"checkpoint.pretrained_checkpoint={ckpt}", "checkpoint.save=/tmp/unused"])
        out[ckpt] = "ok"
    except SystemExit as e:
        out[ckpt] = str(e.code)
open(report, "w").write(json.dumps(out))
"""


def _pretraining_checkpoint(root, layout_hash: str):
    """A pretraining save directory as speechlm.train leaves it: tracker + iter_*/provenance.json."""
    (root / "iter_0000040").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("40")
    provenance = {"iteration": 40, "layout_hash": layout_hash, "recipe": {"optimizer": {"min_lr": 3.0e-4}}}
    (root / "iter_0000040" / "provenance.json").write_text(json.dumps(provenance))
    return root


def test_sft_refuses_a_pretraining_checkpoint_of_another_layout(expanded_tiny_dir, synthetic_blend, tmp_path):
    ours = TokenLayout.load(expanded_tiny_dir).layout_hash
    other = TokenLayout(language_tags=True).layout_hash
    same = _pretraining_checkpoint(tmp_path / "same", ours)
    tagged = _pretraining_checkpoint(tmp_path / "tagged", other)
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(expanded_tiny_dir), str(synthetic_blend), str(report),
                           str(same), str(tagged), str(same / "iter_0000040")],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(report.read_text())
    assert r[str(same)] == "ok" and r[str(same / "iter_0000040")] == "ok", r
    refused = r[str(tagged)]
    assert "the SFT recipe cannot work" in refused and other in refused and ours in refused, refused
    assert str(tagged / "iter_0000040") in refused, refused
