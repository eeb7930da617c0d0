#!/usr/bin/env python
"""Show what the model will read: decode documents of a built prefix back to kind, language,
text and codes (token_layout.decode_document).

  inspect_data.py DATA/audio_hi_train [--n 5] [--start 0] [--model EXPANDED_MODEL_DIR]

The token layout comes from --model (token_layout.json) or else from the manifest.json next to
the prefix. With --model the transcript is detokenized; without, its ids are shown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="inspect_data.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prefix", help="dataset prefix (path without .bin/.idx)")
    ap.add_argument("--n", type=int, default=5, help="documents to show (default 5)")
    ap.add_argument("--start", type=int, default=0, help="first document (default 0)")
    ap.add_argument("--model", help="expanded model dir: token layout + tokenizer to detokenize the text")
    ap.add_argument("--codes", type=int, default=12, help="codes to print per document (default 12)")
    args = ap.parse_args(argv)

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from speechlm import token_layout as tl

    prefix = args.prefix[:-4] if args.prefix.endswith((".bin", ".idx")) else args.prefix
    if not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
        print(f"error: no {prefix}.bin/.idx", file=sys.stderr)
        return 2
    tokenizer = None
    manifest_path = Path(prefix).parent / "manifest.json"
    if args.model:
        layout = tl.TokenLayout.load(args.model)
        tok_file = Path(args.model) / "tokenizer.json"
        if tok_file.is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tok_file))
    elif manifest_path.is_file():
        layout = tl.TokenLayout.from_dict(json.loads(manifest_path.read_text())["layout"])
    else:
        print("warning: no --model and no manifest.json: assuming the default layout (no language tags)", file=sys.stderr)
        layout = tl.TokenLayout()
    if manifest_path.is_file():
        stored = json.loads(manifest_path.read_text()).get("layout_hash")
        if stored and stored != layout.layout_hash:
            print(f"warning: the manifest records layout {stored}, decoding with {layout.layout_hash}", file=sys.stderr)

    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths
    print(f"{prefix}: {len(ds):,} documents, {int(lengths.sum()):,} tokens, layout {layout.layout_hash[:12]}")
    for i in range(args.start, min(len(ds), args.start + args.n)):
        ids = np.asarray(ds[i])
        try:
            doc = layout.decode_document(ids)
        except ValueError as e:
            print(f"[{i}] NOT A DOCUMENT ({e}): first ids {ids[:16].tolist()}")
            continue
        codes = doc.codes
        head = " ".join(str(c) for c in codes[: args.codes]) + (" ..." if len(codes) > args.codes else "")
        print(f"[{i}] {doc.kind} lang={doc.language or '-'} tokens={len(ids)} codes={len(codes)} "
              f"({len(codes) / tl.CODES_PER_SECOND:.2f} s)")
        if doc.kind != "audio":
            if tokenizer is not None:
                print(f"    text: {tokenizer.decode(doc.text_ids.tolist(), skip_special_tokens=False)!r}")
            else:
                print(f"    text ids ({len(doc.text_ids)}): {doc.text_ids[:24].tolist()}")
        if len(codes):
            print(f"    codes: {head}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
