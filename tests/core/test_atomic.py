"""Atomic writes: whole file or old file, never a partial one, and no temp file left behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gsstudio_ext.core import atomic
from gsstudio_ext.core.atomic import atomic_write, write_json_atomic


def _half_write(handle) -> None:
    handle.write(b"partial")
    raise OSError("disk full")


def test_atomic_write_bytes_creates_parent_fsyncs_and_sets_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "a" / "b" / "out.bin"
    written = atomic_write(str(target), lambda handle: handle.write(bytes(range(256))))
    assert written == target and isinstance(written, Path)
    assert target.read_bytes() == bytes(range(256))
    assert len(synced) == 1
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(target.parent) == ["out.bin"]


def test_failing_write_fn_leaves_existing_file_and_no_temp(tmp_path: Path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old contents")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, _half_write)
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["data.bin"]

    # a new file that fails is never created
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "new.bin", _half_write)
    assert os.listdir(tmp_path) == ["data.bin"]


def test_failing_rename_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "data.txt"
    target.write_text("old")

    def no_replace(src, dst):
        raise PermissionError("read-only")

    monkeypatch.setattr(atomic.os, "replace", no_replace)
    with pytest.raises(PermissionError):
        atomic_write(target, lambda handle: handle.write("new"), mode="w")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["data.txt"]


def test_atomic_write_rejects_other_modes(tmp_path: Path):
    with pytest.raises(ValueError, match="mode"):
        atomic_write(tmp_path / "x", lambda handle: None, mode="ab")
    assert os.listdir(tmp_path) == []


def test_json_round_trip_and_default_format(tmp_path: Path):
    obj = {"z": [1, 2.5, None], "a": {"name": "mug", "ok": True}, "unicode": "caf\u00e9"}
    path = write_json_atomic(tmp_path / "sub" / "out.json", obj)
    assert path == tmp_path / "sub" / "out.json"
    assert json.loads(path.read_text()) == obj
    # default: indent 2, insertion order, no final newline (json.dumps output byte for byte)
    assert path.read_text() == json.dumps(obj, indent=2)
    assert list(json.loads(path.read_text())) == ["z", "a", "unicode"]


def test_json_options_give_exact_format(tmp_path: Path):
    obj = {"b": 1, "a": [1, {"d": 2, "c": 3}]}
    path = write_json_atomic(tmp_path / "m.json", obj, indent=1, sort_keys=True, trailing_newline=True)
    assert path.read_text() == '{\n "a": [\n  1,\n  {\n   "c": 3,\n   "d": 2\n  }\n ],\n "b": 1\n}\n'
    compact = write_json_atomic(tmp_path / "c.json", obj, indent=None)
    assert compact.read_text() == '{"b": 1, "a": [1, {"d": 2, "c": 3}]}'


def test_unserialisable_json_leaves_existing_file_and_no_temp(tmp_path: Path):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["r.json"]
