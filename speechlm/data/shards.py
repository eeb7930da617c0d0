"""WebDataset shards: expand an input spec to a sorted shard list, open a shard (local or S3)
as a byte stream, and read its samples with a minimal tar parser.

Why our own tar reader: Python's `tarfile` (what webdataset uses) builds a TarInfo object per
member and parses every header field; reading ~1,250-code segments it tops out near 10 k
samples/s on one core. A WebDataset shard only needs name, size and type from each header, so
`iter_tar` reads big blocks and slices members out of them (see docs/data_prep.md for figures).
"""

from __future__ import annotations

import gzip
import zlib
from typing import BinaryIO, Iterator

from speechlm.data import inputs, s3

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_BLOCK = 512
# bytes per read() from the shard stream. Small on purpose: a multi-MB bytes object is a fresh
# mmap whose pages fault on every refill (measured: 48 k samples/s at 4 MiB, 83 k at 64 KiB).
_READ_SIZE = 64 << 10


class CorruptShardError(ValueError):
    """The shard is not a well-formed tar stream (bad header, truncated member or archive)."""


# --- shard lists ------------------------------------------------------------------------------
def expand_spec(specs: str | list[str], client_factory=None) -> list[str]:
    """Shard URLs/paths named by specs, sorted and de-duplicated (`inputs.expand`; an s3 key that
    is not a shard name is a prefix). FileNotFoundError if there are none."""
    out = inputs.expand(specs, SHARD_SUFFIXES, client_factory, s3_keys_without_suffix_are_prefixes=True)
    if not out:
        raise FileNotFoundError(f"no shards found for {[specs] if isinstance(specs, str) else list(specs)}")
    return out


# --- opening ----------------------------------------------------------------------------------
def open_shard(url: str, client=None) -> BinaryIO:
    """A byte stream of the shard (gunzipped for .tar.gz/.tgz). S3 objects are streamed through
    `s3.ResumableBody`, never copied to disk."""
    if url.startswith("s3://"):
        bucket, key = s3.split_url(url)
        raw: BinaryIO = s3.ResumableBody(client or s3.make_client(), bucket, key)  # type: ignore[assignment]
    else:
        raw = open(url, "rb", buffering=0)
    if url.endswith((".gz", ".tgz")):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


# --- tar reading ------------------------------------------------------------------------------
def _octal(field_: bytes) -> int:
    if field_[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes >= 8 GiB
        n = int.from_bytes(field_[1:], "big")
        return -n if field_[0] == 0xFF else n
    s = field_.rstrip(b" \0").lstrip(b" ")
    return int(s, 8) if s else 0


def _checksum_ok(hdr: bytes) -> bool:
    """The header checksum: the byte sum with the checksum field read as spaces. adler32's low
    half is (1 + byte sum) mod 65521, computed in C: ~20x faster than sum(hdr) in Python."""
    want = (zlib.adler32(hdr) & 0xFFFF) - (zlib.adler32(hdr[148:156]) & 0xFFFF) + 8 * 32  # field's sum the same way
    try:
        if int(hdr[148:154], 8) % 65521 == want % 65521:  # the usual "dddddd\0 " form
            return True
        return _octal(hdr[148:156]) % 65521 == want % 65521  # other spellings (7 digits, ...)
    except ValueError:
        return False


def _pax_path(data: bytes) -> str | None:
    # records are "<len> key=value\n"; TarWriter writes one pax header per member (mtime etc.)
    for rec in data.split(b"\n"):
        _, _, kv = rec.partition(b" ")
        if kv.startswith(b"path="):
            return kv[5:].decode("utf-8")
    return None


def _refill(read, buf: bytes, pos: int, need: int) -> bytes:
    """buf[pos:] followed by enough new bytes that at least `need` are available."""
    parts = [buf[pos:]]
    have = len(parts[0])
    while have < need:
        chunk = read(max(_READ_SIZE, need - have))
        if not chunk:
            raise CorruptShardError(f"truncated: stream ended {need - have} bytes short")
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def iter_tar(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every regular file in a tar stream, in order.

    Raises CorruptShardError on a header whose checksum is wrong, a member cut short, or a stream
    that ends without the end-of-archive block (a truncated upload); the members yielded before
    the error are intact.
    """
    read = f.read
    buf, pos, end = b"", 0, 0
    long_name: str | None = None
    while True:
        if pos + _BLOCK > end:
            try:
                buf, pos = _refill(read, buf, pos, _BLOCK), 0
            except CorruptShardError:
                raise CorruptShardError("truncated: no end-of-archive marker") from None
            end = len(buf)
        hdr = buf[pos : pos + _BLOCK]
        pos += _BLOCK
        if hdr[0] == 0 and hdr.count(0) == _BLOCK:
            return  # end of archive (a second zero block and record padding may follow)
        if not _checksum_ok(hdr):
            raise CorruptShardError("bad tar header checksum")
        # the usual 11 digits + NUL, else base-256 or other padding (valid: the checksum matched)
        size = int(hdr[124:135], 8) if hdr[135] == 0 and hdr[124] != 0x80 else _octal(hdr[124:136])
        padded = (size + _BLOCK - 1) & ~(_BLOCK - 1)
        if pos + padded > end:
            buf, pos = _refill(read, buf, pos, padded), 0
            end = len(buf)
        typ = hdr[156]
        if typ in _REGULAR:
            data = buf[pos : pos + size]
            if long_name is not None:
                name, long_name = long_name, None
            else:
                i = hdr.find(0, 0, 100)
                name = hdr[: i if i >= 0 else 100].decode("utf-8")
                if hdr[345] and hdr[257:262] == b"ustar":
                    name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
            pos += padded
            yield name, data
            continue
        if typ == _PAX:  # pax extended header: only the path matters here
            data = buf[pos : pos + size]
            if b" path=" in data:
                long_name = _pax_path(data) or long_name
        elif typ == _GNU_LONGNAME:
            long_name = buf[pos : pos + size].rstrip(b"\0").decode("utf-8")
        pos += padded  # directories, links, global pax headers: nothing to read


_REGULAR = frozenset(b"0\x007")
_GNU_LONGNAME, _PAX = ord("L"), ord("x")


def iter_samples(f: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) per WebDataset sample: consecutive tar members grouped the way
    webdataset groups them (key = path up to the first dot of the file name, field = the rest,
    lower-cased; a file name without a dot after its first character belongs to no sample).

    On corruption the sample being assembled is dropped (it may be incomplete) and the
    CorruptShardError propagates.
    """
    key: str | None = None
    fields: dict[str, bytes] = {}
    for name, data in iter_tar(f):
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot <= slash:
            continue  # no extension: not part of any sample (webdataset skips these too)
        k = name[:dot]
        if k != key:
            if key is not None:
                yield key, fields
            key, fields = k, {}
        fields[name[dot + 1 :].lower()] = data
    if key is not None:
        yield key, fields
