"""The JSON files of `comoe bench`: reading a directory's results and peer results, writing one result."""

from __future__ import annotations

import json
import os
from pathlib import Path

from comoe.tools.bench.run import SCHEMA_VERSION
from comoe.utils.files import write_json_atomic


def load_results(directory: str | os.PathLike) -> list[dict]:
    """The `comoe bench` results in ``directory`` (peer results, ``peer-*.json``, are not among them)."""
    out = []
    for path in sorted(Path(directory).glob("*.json")):
        if path.name.startswith("peer-"):
            continue
        with open(path) as fh:
            data = json.load(fh)
        if isinstance(data, dict) and data.get("schema") == SCHEMA_VERSION and "cases" in data:
            out.append(data)
    return out


def load_peer_results(directory: str | os.PathLike) -> list[dict]:
    """The peer results (``peer-*.json``, written by ``benchmarks/peers/*/bench.py``) in ``directory``."""
    out = []
    for path in sorted(Path(directory).glob("peer-*.json")):
        with open(path) as fh:
            data = json.load(fh)
        if isinstance(data, dict) and "peer" in data and "variants" in data:
            out.append(data)
    return out


def write_json(result: dict, directory: str | os.PathLike) -> Path:
    return write_json_atomic(Path(directory) / f"{result['name']}.json", result, indent=1)
