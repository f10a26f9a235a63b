import json
import os
import re
import subprocess
import sys

import pytest

from pipeline import atomic
from pipeline.atomic import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    host_name,
    is_stale_temp,
    remove_stale_temps,
    temp_path,
)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def folder_names(folder):
    return sorted(p.name for p in folder.iterdir())


class FailingWriter:
    """A file object whose write stores the first half of the data, then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_write_bytes_creates_file(tmp_path):
    atomic_write_bytes(tmp_path / "state.bin", b"\x00\x01payload")

    assert (tmp_path / "state.bin").read_bytes() == b"\x00\x01payload"
    assert folder_names(tmp_path) == ["state.bin"]


def test_write_text_replaces_file(tmp_path):
    (tmp_path / "notes.txt").write_text("old")

    atomic_write_text(tmp_path / "notes.txt", "new ✓")

    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "new ✓"
    assert folder_names(tmp_path) == ["notes.txt"]


def test_write_json_round_trip(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": [1, 2], "b": None})

    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2], "b": None}
    assert (tmp_path / "m.json").read_text().endswith("\n")


def test_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    atomic_write_bytes(tmp_path / "ckpt.pt", b"good checkpoint")
    real_open = open
    monkeypatch.setattr(atomic, "open", lambda *a, **k: FailingWriter(real_open(*a, **k)), raising=False)

    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(tmp_path / "ckpt.pt", b"new checkpoint that never lands")

    assert (tmp_path / "ckpt.pt").read_bytes() == b"good checkpoint"
    assert folder_names(tmp_path) == ["ckpt.pt"]


def test_crash_mid_json_keeps_previous(tmp_path):
    atomic_write_json(tmp_path / "manifest.json", {"version": 1})

    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "manifest.json", {"version": 2, "blob": object()})

    assert json.loads((tmp_path / "manifest.json").read_text()) == {"version": 1}
    assert folder_names(tmp_path) == ["manifest.json"]


def test_failed_fsync_keeps_previous(tmp_path, monkeypatch):
    atomic_write_bytes(tmp_path / "f", b"old")

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write_bytes(tmp_path / "f", b"new")

    assert (tmp_path / "f").read_bytes() == b"old"
    assert folder_names(tmp_path) == ["f"]


def test_failed_rename_keeps_previous(tmp_path, monkeypatch):
    atomic_write_bytes(tmp_path / "f", b"old")

    def failing_replace(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="cross-device"):
        atomic_write_bytes(tmp_path / "f", b"new")

    assert (tmp_path / "f").read_bytes() == b"old"
    assert folder_names(tmp_path) == ["f"]


def test_atomic_open_exception_in_block(tmp_path):
    atomic_write_bytes(tmp_path / "f", b"old")

    with pytest.raises(KeyboardInterrupt):
        with atomic_open(tmp_path / "f", "wb") as f:
            f.write(b"half")
            raise KeyboardInterrupt

    assert (tmp_path / "f").read_bytes() == b"old"
    assert folder_names(tmp_path) == ["f"]


def test_atomic_open_rejects_other_modes(tmp_path):
    for mode in ("ab", "r+b", "xb"):
        with pytest.raises(ValueError, match=re.escape(repr(mode))):
            with atomic_open(tmp_path / "f", mode):
                pass
    assert folder_names(tmp_path) == []


def test_temp_path_beside_target(tmp_path):
    path = temp_path(tmp_path / "manifest.json")

    assert path.parent == tmp_path
    assert path.name.startswith(".tmp-manifest.json-")
    assert path.name.endswith(f"@{host_name()}")
    assert temp_path(tmp_path / "manifest.json") != path


def test_stale_temp_rules(tmp_path):
    assert is_stale_temp(tmp_path / f".tmp-f-{dead_pid()}-0123abcd@{host_name()}")
    assert not is_stale_temp(tmp_path / f".tmp-f-{os.getpid()}-0123abcd@{host_name()}")
    assert not is_stale_temp(tmp_path / f".tmp-f-{dead_pid()}-0123abcd@another-host")
    assert not is_stale_temp(tmp_path / "shard_000001")


def test_remove_stale_temps_only_dead(tmp_path):
    dead = dead_pid()
    (tmp_path / f".tmp-manifest.json-{dead}-0123abcd@{host_name()}").write_text("partial")
    (tmp_path / f".tmp-shard_000004-{dead}-89abcdef@{host_name()}").mkdir()
    (tmp_path / f".tmp-shard_000004-{dead}-89abcdef@{host_name()}" / "zarr.json").write_text("{}")
    live = f".tmp-shard_000005-{os.getpid()}-0123abcd@{host_name()}"
    (tmp_path / live).mkdir()
    (tmp_path / "manifest.json").write_text("{}")

    removed = remove_stale_temps(tmp_path)

    assert len(removed) == 2
    assert folder_names(tmp_path) == [live, "manifest.json"]
