#!/usr/bin/env python
"""Merge the per-shard partial datasets of a speech build into its final prefixes.

Run once every task of `build_speech.py --num-tasks N` has finished. Partials are appended in
sorted shard order with megatron-core's IndexedDatasetBuilder.add_index, each final .bin/.idx is
written under a temporary name and renamed, then manifest.json. Refuses (exit 2) while a shard
is not done. Rerunning is safe and gives the same bytes.

  merge_speech.py --output data/audio [--clean]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="merge_speech.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="the output directory of build_speech.py")
    ap.add_argument("--clean", action="store_true", help="delete output/partials after a successful merge "
                    "(a later rerun then has to process every shard again)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    from speechlm.data import partials, speech

    try:
        manifest = speech.merge(args.output, progress=not args.quiet)
    except speech.SpeechDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(speech.format_manifest(manifest))
    if args.clean:
        shutil.rmtree(Path(args.output) / partials.PARTIALS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
