"""Output path checks: folders and files that can be created, and the file or link in the way."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import UsageError
from pipeline.output_paths import check_output_file, check_output_folder


def test_folder_new_or_existing_accepted(tmp_path: Path):
    existing = tmp_path / "run"
    existing.mkdir()

    check_output_folder(existing, "--out")
    check_output_folder(tmp_path / "a" / "b" / "run", "--out")

    assert not (tmp_path / "a").exists()


def test_folder_that_is_file_rejected(tmp_path: Path):
    path = tmp_path / "run"
    path.write_text("not a run\n")

    with pytest.raises(UsageError) as error:
        check_output_folder(path, "--out")

    assert str(error.value) == f"--out {path} is a file: pass a folder"


def test_folder_below_file_rejected(tmp_path: Path):
    blocker = tmp_path / "README.md"
    blocker.write_text("text\n")

    with pytest.raises(UsageError) as error:
        check_output_folder(blocker / "nested" / "run", "--out")

    message = str(error.value)
    assert message.startswith(f"--out {blocker / 'nested' / 'run'} cannot be created")
    assert f"{blocker} is a file" in message
    assert "choose another --out" in message


def test_file_that_is_folder_rejected(tmp_path: Path):
    with pytest.raises(UsageError) as error:
        check_output_file(tmp_path, "--output")

    assert str(error.value) == f"--output {tmp_path} is a folder: pass a file name"


def test_file_below_file_rejected(tmp_path: Path):
    blocker = tmp_path / "plot.png"
    blocker.write_bytes(b"\x89PNG")

    with pytest.raises(UsageError) as error:
        check_output_file(blocker / "plot.png", "--output")

    assert f"{blocker} is a file" in str(error.value)
    assert "--output" in str(error.value)


def test_file_below_dangling_link_rejected(tmp_path: Path):
    link = tmp_path / "outputs"
    link.symlink_to(tmp_path / "missing-target")

    with pytest.raises(UsageError) as error:
        check_output_file(link / "plot.png", "--output")

    assert f"{link} is not a folder" in str(error.value)


def test_file_in_new_folders_accepted(tmp_path: Path):
    check_output_file(tmp_path / "figures" / "run-a" / "plot.png", "--output")

    assert not (tmp_path / "figures").exists()
