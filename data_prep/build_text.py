#!/usr/bin/env python
"""Build Megatron indexed datasets of text-only documents from jsonl / parquet corpora.

Each record becomes `<|begin_of_text|> text <|end_of_text|>` (the token layout of --model, an
expanded model dir). Texts longer than --seq-length are split into near-equal consecutive
pieces of their token ids, each its own document of at most --seq-length tokens.
Output in --output: <source>_<lang>_train / <source>_<lang>_valid prefixes (.bin/.idx) and
manifest.json (documents, tokens, skips by reason, layout hash, settings).

Text: one field (--text-field, default text) or a template over several fields
(--template aya = "{inputs}\\n\\n{targets}", Aya's prompt and response; or any "{a} ... {b}").
Language: --language-field (codes or names: hi, hin, Hindi, hin_Deva, hi-IN), else the fixed
--language. Records in other languages are skipped and counted.
Quality filters (see docs/mixture.md): --preset web (long-form text: at least 200 characters,
letter share 0.7, repeated lines 0.3, boilerplate lines 0.2) or --preset instruction
(prompt/response pairs such as Aya: no length or repeated-line rule, letter share 0.5,
boilerplate 0.2); the default is instruction with a --template, else web. --min-chars,
--min-letter-share, --max-repeated-lines, --max-boilerplate-lines override single values of the
preset; --no-filters turns them all off.

Parallel and resumable like build_speech.py: --num-tasks/--task-index (default SLURM array
variables) split the sorted input files round-robin; a finished file is kept under
output/partials/ and skipped by a rerun; merge with --merge once all tasks are done.
S3 / R2 inputs: --endpoint-url or R2_ENDPOINT_URL / AWS_ENDPOINT_URL, keys from the AWS chain.

Examples:
  build_text.py --input 's3://corpora/sangraha/hi/*.parquet' --model ckpt/llama3-speech \\
      --output data/text/sangraha --source sangraha --language hi
  build_text.py --input aya/train.parquet --model ckpt/llama3-speech --output data/text/aya \\
      --source aya --template aya --language-field language     (--preset instruction implied)
  build_text.py --input pairs.jsonl --model ckpt/llama3-speech --output data/text/pairs \\
      --source pairs --preset instruction                       (pairs rendered into one field)
"""

from __future__ import annotations

import argparse
import sys

from speechlm.data import build_cli


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="build_text.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build_cli.add_model_options(
        ap, input_help="input files: local paths, directories or globs, s3://bucket/key, "
        "s3://bucket/prefix/, s3 globs; brace ranges expanded (.jsonl[.gz], .json[.gz], .parquet)",
        output_help="output directory (one per source)")
    ap.add_argument("--source", help="corpus name (names prefixes and datasets: text/<source>/<lang>)")
    ap.add_argument("--format", choices=("json", "parquet"), help="input format (default: from the file name)")
    build_cli.add_split_options(
        ap, valid_help="share of records held out for validation, by a hash of the text (default 0.01)")
    g = ap.add_argument_group("record schema")
    g.add_argument("--text-field", default="text", help="field holding the text (default text)")
    g.add_argument("--template", help="'aya' or a format string over fields, e.g. '{inputs}\\n\\n{targets}'")
    g.add_argument("--language-field", default="language", help="field holding the language; '' for none (default language)")
    g.add_argument("--language", help="language of records without a language field value")
    g = ap.add_argument_group("quality filters (each flag overrides one value of the preset)")
    g.add_argument("--preset", choices=("web", "instruction"),
                   help="filter settings: web (long-form text) or instruction (prompt/response pairs); "
                        "default instruction with --template, else web")
    g.add_argument("--min-chars", type=int, help="fewest characters (web 200, instruction 0 = off)")
    g.add_argument("--min-letter-share", type=float, help="least share of letters among non-space chars (web 0.7, instruction 0.5)")
    g.add_argument("--max-repeated-lines", type=float, help="most share of lines repeating an earlier one (web 0.3, instruction off; 1 = off)")
    g.add_argument("--max-boilerplate-lines", type=float, help="most share of lines with a boilerplate phrase (both 0.2; 1 = off)")
    g.add_argument("--no-filters", action="store_true", help="turn every quality filter off")
    build_cli.add_task_options(ap, unit="file", merge_help="only merge finished partials")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    build_cli.setup_logging(args.quiet)
    from speechlm.data import text, text_filters

    def build(task_index: int) -> dict:
        filters = text_filters.NO_FILTERS if args.no_filters else text_filters.resolve_filters(
            args.preset, templated=args.template is not None, min_chars=args.min_chars,
            min_letter_share=args.min_letter_share, max_repeated_line_share=args.max_repeated_lines,
            max_boilerplate_line_share=args.max_boilerplate_lines)
        template = args.template
        if template is not None:  # a shell cannot easily pass a newline: accept \n and \t
            template = template.replace("\\n", "\n").replace("\\t", "\t")
        return text.build(
            args.input, args.model, args.output, args.source, text_field=args.text_field, template=template,
            language_field=args.language_field or None, default_language=args.language, input_format=args.format,
            filters=filters, **build_cli.build_kwargs(args, task_index),
        )

    return build_cli.run(args, ap, required=("input", "model", "source"), build=build, merge=text.merge,
                         format_manifest=text.format_manifest, unit="file", merge_command="data_prep/build_text.py --merge")


if __name__ == "__main__":
    sys.exit(main())
