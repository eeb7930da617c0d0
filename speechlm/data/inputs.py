"""Input specs -> a sorted list of input files, local or on S3 (both builders: shards and text
files), and the S3 error codes that mean an input is missing rather than unreachable."""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from typing import Any, Callable

from braceexpand import braceexpand

from speechlm.data import s3


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def expand(specs: str | list[str], suffixes: tuple[str, ...], client_factory: Callable[[], Any] | None = None, *,
           s3_keys_without_suffix_are_prefixes: bool = False) -> list[str]:
    """Input URLs/paths named by specs, sorted and de-duplicated; empty if none.

    Each spec is a local path, directory (every file below it ending in `suffixes`) or glob, or
    `s3://bucket/key`, `s3://bucket/prefix/` (every such file under it), or an s3 glob; brace
    ranges (`shard-{000000..000099}.tar`) are expanded first. A name without a glob is taken as
    is (a missing one shows up as a failed input); an s3 key not ending in a suffix is a prefix
    too when `s3_keys_without_suffix_are_prefixes`. `client_factory()` gives the S3 client (only
    called for s3 specs).
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    out: set[str] = set()
    client = None
    for spec in specs:
        for item in braceexpand(spec):
            if item.startswith("s3://"):
                client = client or (client_factory or s3.make_client)()
                out.update(_expand_s3(client, item, suffixes, s3_keys_without_suffix_are_prefixes))
            elif _has_glob(item):
                out.update(p for p in glob.glob(item) if os.path.isfile(p))
            elif os.path.isdir(item):
                out.update(os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs if f.endswith(suffixes))
            else:
                out.add(item)
    return sorted(out)


def _expand_s3(client: Any, url: str, suffixes: tuple[str, ...], bare_is_prefix: bool) -> list[str]:
    bucket, key = s3.split_url(url)
    if _has_glob(key):
        static = re.split(r"[*?\[]", key, maxsplit=1)[0]
        return [f"s3://{bucket}/{k}" for k in s3.list_keys(client, bucket, static) if fnmatch.fnmatchcase(k, key)]
    if key == "" or key.endswith("/") or (bare_is_prefix and not key.endswith(suffixes)):
        # a prefix: every input below it
        return [f"s3://{bucket}/{k}" for k in s3.list_keys(client, bucket, key) if k.endswith(suffixes)]
    return [url]


def missing_object_code(e: BaseException) -> str | None:
    """The S3 error code when `e` says the object or bucket does not exist, else None (an error a
    rerun may get past)."""
    code = getattr(e, "response", {}).get("Error", {}).get("Code") if hasattr(e, "response") else None
    return code if code in ("NoSuchKey", "404", "NoSuchBucket") else None
