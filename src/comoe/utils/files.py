"""Atomic writes: everything is written to a temporary path beside its target and renamed into place.

A reader (or a resumed grid that treats ``metrics.json`` as "this run is finished") never sees a
half-written file or directory, even if the process is killed mid-write. Every file comoe writes goes
through here.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _temporary_name(target: Path) -> Path:
    """A hidden name beside ``target``, unique to this process and thread."""
    return target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; write it, and on success it replaces ``path``.

    On an error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; fill it, and on success it becomes ``target``.

    An existing ``target`` is replaced; with ``keep_existing`` it is kept instead (a shared cache that
    another process filled first). On an error the temporary directory is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists() and not keep_existing:
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (keep_existing and target.is_dir()):  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 2, sort_keys: bool = False) -> Path:
    return write_text_atomic(
        path, json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    )
