"""Recipe -> ConfigContainer for many cases in one process (one ~30 s Megatron import for all).

usage: python tests/workers/recipe_config.py CASES.json OUT.json

CASES.json: [{"name", "argv": speechlm.train arguments (a --dry-run), "effective": bool}, ...].
For each case OUT.json holds the dry run's exit status, stdout and stderr, the scheduler's and
optimizer's weight-decay fields of the built ConfigContainer, and with "effective" the effective
settings as the dry run printed them (speechlm.train.effective_settings, read back from its YAML).
"""

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from speechlm.train import run as train  # noqa: E402  (CPU mode first)


def _dry_run(argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    rc = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            train.main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except Exception:  # a traceback is a failure of its own: record it
            rc = 2
            traceback.print_exc()
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def _built(argv: list[str]) -> dict:
    """The ConfigContainer's fields, as main() builds it (same parser)."""
    args = list(argv)
    gpu = "--gpu" in args
    world = int(args[args.index("--world-size") + 1]) if "--world-size" in args else 1
    config = args[args.index("--config") + 1]
    overrides = [a for a in args if "=" in a and not a.startswith("--")]
    with contextlib.redirect_stderr(io.StringIO()):
        cfg, _, _ = train.build_config(train.load_recipe(config, overrides), world, gpu=gpu or None)
    s = cfg.scheduler
    return {"start_weight_decay": s.start_weight_decay, "end_weight_decay": s.end_weight_decay,
            "weight_decay_incr_style": s.weight_decay_incr_style, "optimizer_weight_decay": cfg.optimizer.weight_decay}


def _printed_effective(stdout: str) -> dict:
    """The YAML after the dry run's '# effective settings' line."""
    _, sep, tail = stdout.partition("\n# effective settings")
    if not sep:
        raise ValueError("the dry run printed no effective settings")
    return yaml.safe_load(tail.split("\n", 1)[1])


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = {}
    for case in cases:
        r = _dry_run(case["argv"])
        if r["rc"] == 0:
            try:
                r.update(_built(case["argv"]))
                if case.get("effective"):
                    r["effective"] = _printed_effective(r["stdout"])
            except Exception:
                r["error"] = traceback.format_exc()
        results[case["name"]] = r
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
