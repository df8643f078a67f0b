"""The one YAML reader and writer: every YAML file comoe reads or writes goes through here.

YAML 1.1 reads ``1e-3`` as a string; comoe reads it as the float YAML 1.2 (and every user) means, and
writes strings such as ``'1e5'`` quoted so that they read back as strings. Errors name the file, the line
where there is one, and what is wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from comoe.utils.files import write_text_atomic


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent forms without a dot (``1e-3``, ``5E+4``) as floats, not strings."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings such as '1e5', so that `_Loader` reads them back as strings."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+.0123456789"),
    )


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely, reading ``1e-3`` as a float (YAML 1.2) rather than a string (YAML 1.1).

    A pipe, FIFO or character device (``--config /dev/stdin``, ``--config <(...)``) is read once and its text
    kept, so the command's later readings see the same fields. A missing file is a FileNotFoundError and
    invalid YAML a ValueError, both naming the file (and the line).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory; give a YAML file of fields")
    if not path.exists():
        raise FileNotFoundError(f"no such config file: {path}")
    try:
        return yaml.load(_text(path), Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or err
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None:
            problem = f"{problem}, {context} at line {context_mark.line + 1}"
        raise ValueError(f"{path} is not valid YAML{where}: {problem}; fix the file there") from None


def load_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file is an empty mapping); anything else is a ValueError
    naming the file and ``what`` it should map (e.g. "RunConfig fields")."""
    data = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of {what}, got {type(data).__name__}")
    return data


def yaml_text(data: Any) -> str:
    """``data`` as YAML, keys in their order, read back by `load_yaml` as the same values."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def write_yaml(path: str | Path, data: Any) -> Path:
    """Write ``data`` as YAML (see `yaml_text`), atomically."""
    return write_text_atomic(path, yaml_text(data))


_STREAMS: dict[str, str] = {}  # the text of each pipe or device read so far: it can be read only once


def _text(path: Path) -> str:
    if path.is_file():
        return path.read_text(encoding="utf-8")
    key = str(path)
    if key not in _STREAMS:
        _STREAMS[key] = path.read_text(encoding="utf-8")
    return _STREAMS[key]
