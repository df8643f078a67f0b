"""Atomic writes (comoe.utils.files): a target is either the old complete version or the new one."""

from __future__ import annotations

import json

import pytest

from comoe.utils.files import atomic_dir, atomic_path, write_json_atomic, write_text_atomic


def test_atomic_dir_publishes_only_complete_dirs_and_replaces_an_old_one(tmp_path):
    target = tmp_path / "runs" / "adapter"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed while writing")
    assert not target.exists() and list(target.parent.iterdir()) == []  # the temp dir is gone too

    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and tmp.name.startswith(".")
        (tmp / "weights").write_text("first")
    assert (target / "weights").read_text() == "first"

    with atomic_dir(target) as tmp:  # a newer checkpoint or adapter replaces the old one whole
        (tmp / "other").write_text("second")
    assert [p.name for p in target.iterdir()] == ["other"]

    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:  # a failed rewrite keeps the old one
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["other"] and [p.name for p in target.parent.iterdir()] == [
        "adapter"
    ]


def test_atomic_dir_keep_existing_keeps_what_another_process_published(tmp_path):
    target = tmp_path / "cache" / "model"
    with atomic_dir(target, keep_existing=True) as tmp:
        (tmp / "weights").write_text("first")
    with atomic_dir(target, keep_existing=True) as tmp:
        (tmp / "weights").write_text("second")
    assert (target / "weights").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_a_failed_file_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"accuracy": 0.5})
    with pytest.raises(TypeError), atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"accuracy": object()}))  # fails while writing
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    write_text_atomic(path, "replaced\n")
    assert path.read_text() == "replaced\n"
