"""Plan the pretraining mixture: dataset manifests + a mix config -> a blend file.

    python data_prep/plan_mix.py --manifests out/speech_audio out/speech_tts out/text_sangraha \
        --config recipes/data/default_mix.yaml --output runs/blends/blend.yaml

Writes the blend (the training recipes name it by path), `<blend>.report.md` and
`<blend>.languages.png` next to it, and prints the report. See docs/mixture.md.
"""

from __future__ import annotations

import argparse
import sys

from speechlm.data.mix import MixError, load_config, outputs_for, write_plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifests", nargs="+", required=True, help="build output directories or manifest.json files")
    ap.add_argument("--config", required=True, help="mix config YAML (recipes/data/default_mix.yaml)")
    ap.add_argument("--output", required=True, help="blend file to write (YAML)")
    ap.add_argument("--on-exceed", choices=("warn", "error", "cap"), help="override the config's on_exceed")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.on_exceed:
            from dataclasses import replace

            cfg = replace(cfg, on_exceed=args.on_exceed)
        _, text = write_plan(args.manifests, cfg, args.output)
    except MixError as e:
        print(f"plan_mix: error: {e}", file=sys.stderr)
        return 2
    print(text)
    rep, chart = outputs_for(args.output)
    print(f"wrote {args.output}, {rep}, {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
