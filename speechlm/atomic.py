"""Write-then-rename: an output appears at its path only once complete.

Every tool of the pipeline writes through these, so a run killed at any moment (a SLURM time
limit, an OOM, Ctrl-C) leaves either the previous output or none, never a half-written file or
directory that looks finished. The temporary sibling is hidden and named by process, so two
processes writing different outputs in one directory never meet. A tool that resumes in place
(reruns into the same directory after a kill) passes `per_process=False` instead: the temporary
name is then fixed, so the rerun overwrites what the killed run left rather than leaving it behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def partial_path(path: str | Path, *, per_process: bool = True) -> Path:
    """The hidden temporary sibling of `path` that this process writes before the rename
    (`.NAME.partial-PID`, or `.NAME.partial` when not `per_process`)."""
    path = Path(path)
    suffix = f"-{os.getpid()}" if per_process else ""
    return path.with_name(f".{path.name}.partial{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, *, directory: bool = False, per_process: bool = True) -> Iterator[Path]:
    """Yields the temporary sibling to write (created empty when `directory`); when the block
    ends without an error it replaces `path` (an existing file or directory included), otherwise
    it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path, per_process=per_process)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty directory
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str, *, per_process: bool = True) -> Path:
    with atomic_path(path, per_process=per_process) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes, *, per_process: bool = True) -> Path:
    with atomic_path(path, per_process=per_process) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, obj: Any, *, per_process: bool = True, **dumps: Any) -> Path:
    """`json.dumps(obj, **dumps)` plus a final newline."""
    return write_text(path, json.dumps(obj, **dumps) + "\n", per_process=per_process)
