"""Writes that are whole or absent, and survive a power cut once they return.

Every file or folder lmtune leaves behind is written under a hidden staging name, flushed, renamed
into place, and its folder flushed too (a rename is durable only once the folder holding it is).
A writer that fails raises one WriteError that says what was being written, why, and what was
kept. Real writers fail in more ways than OSError: on a full disk torch.save raises RuntimeError
("unexpected pos ...") and safetensors raises SafetensorError, so all three are caught here, and
only around the write itself.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from lmtune.errors import LmtuneError

WRITER_ERRORS = (OSError, RuntimeError, SafetensorError)


class WriteError(LmtuneError):
    """A file or folder could not be written: full disk, permissions, a path that is a file."""


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.is_dir():
            free = shutil.disk_usage(folder).free / 2**20
            return f"the disk is full ({free:,.1f} MiB free)" if free < 1 else f"{free:,.1f} MiB free there"
    return "its folder does not exist"


def _reason(exc: BaseException) -> str:
    text = (getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__).splitlines()[0]
    return text[:200]


@contextmanager
def writing(what: str, target: Path, kept: str) -> Iterator[None]:
    """Turn any writer's failure inside the block into one WriteError naming `what`, the reason,
    the free space and `kept` (what is still there and usable)."""
    try:
        yield
    except WRITER_ERRORS as exc:
        raise WriteError(f"could not write {what} ({target}): {_reason(exc)}; "
                         f"{_free_space(target)}. {kept}",
                         "free disk space, or fix the folder's permissions, then run again.") from exc


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (the names renamed into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        if path.is_file() or path.is_dir():
            fsync_path(path)
    fsync_path(folder)


def staging_name(final: Path) -> Path:
    return final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.staging"


def write_file(path: Path, data: str | bytes, what: str, kept: str = "") -> None:
    """Write `data` to `path` atomically and durably."""
    write_with(path, lambda tmp: tmp.write_bytes(data.encode() if isinstance(data, str) else data),
               what, kept)


def write_with(path: Path, writer: Callable[[Path], None], what: str, kept: str = "") -> None:
    """`writer(tmp)` writes the file at a temporary path; it replaces `path` only when complete."""
    path = Path(path)
    tmp = staging_name(path)
    kept = kept or (f"The previous {path.name} is unchanged." if path.exists() else
                    f"No {path.name} was written.")
    with writing(what, path, kept):
        if not path.parent.is_dir():
            raise FileNotFoundError(f"the folder {path.parent} does not exist")
        try:
            writer(tmp)
            fsync_path(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(path.parent)


def replace_folder(staging: Path, final: Path) -> None:
    """Move a fully written and flushed `staging` folder to `final` (replacing it), durably."""
    fsync_tree(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_path(final.parent)
