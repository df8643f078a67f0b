"""Atomic file writes: a temporary file in the same directory, renamed into place.

A reader (or a resumed grid that treats ``metrics.json`` as "this run is finished") never sees a
half-written file, even if the process is killed mid-write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 2, sort_keys: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")
