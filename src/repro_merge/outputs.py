"""Writing outputs so that no file ever has its final name unless it is complete.

Every file is written under a hidden ``.NAME.partial`` name in the same folder, flushed to disk, and
renamed into place; a crash leaves only ``.partial`` files, which the next run removes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from repro_merge.errors import OutputExistsError

PARTIAL = ".partial"


def partial_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{PARTIAL}")


def prepare_output_dir(folder: Path, resume: bool = False) -> None:
    """Create ``folder``; refuse one with files in it unless resuming (then drop leftover partials)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder}: output path exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        if resume and p.name.startswith(".") and p.name.endswith(PARTIAL):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif not resume:
            raise OutputExistsError(
                f"{folder}: output folder is not empty (it holds {p.name}); choose a new folder"
            )


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def staged_file(final: Path) -> Iterator[Path]:
    """Yield the temporary path to write ``final`` to; on success it is synced and renamed."""
    tmp = partial_name(final)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(final: Path, data: bytes) -> None:
    with staged_file(final) as tmp:
        tmp.write_bytes(data)


def publish_from(folder: Path, write: Callable[[Path], None]) -> list[Path]:
    """Let ``write`` fill a hidden scratch folder inside ``folder`` (for writers such as transformers'
    ``save_pretrained`` that write final names themselves), then move each file into ``folder``."""
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", suffix=PARTIAL, dir=folder))
    try:
        write(scratch)
        moved = []
        for p in sorted(scratch.iterdir()):
            _fsync_file(p)
            os.replace(p, folder / p.name)
            moved.append(folder / p.name)
        _fsync_dir(folder)
        return moved
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
