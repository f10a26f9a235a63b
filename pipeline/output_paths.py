"""Checks that an output path given on the command line can be created, run before a stage writes.

Without them, an output below a regular file (`--out README.md/run`) fails deep inside the
stage with NotADirectoryError or FileExistsError from `mkdir`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UsageError


def check_output_folder(path: str | Path, option: str) -> None:
    """Raise UsageError naming `option` unless `path` is a folder or can be created as one."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{option} {path} is a broken symbolic link: remove it or pass another folder")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file: pass a folder")
    _check_parents(path, option)


def check_output_file(path: str | Path, option: str) -> None:
    """Raise UsageError naming `option` when `path` is a folder or cannot be created as a file."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder: pass a file name")
    _check_parents(path, option)


def _check_parents(path: Path, option: str) -> None:
    """Raise UsageError when the nearest existing parent of `path` is not a folder.

    Parents that do not exist yet are fine, because the stages create them.
    """
    for parent in path.parents:
        if parent.is_dir():
            return
        # is_symlink also catches a dangling link, which exists() does not see but mkdir cannot replace
        if parent.exists() or parent.is_symlink():
            kind = "a file" if parent.is_file() else "not a folder"
            raise UsageError(
                f"{option} {path} cannot be created: {parent} is {kind}; choose another {option} or move {parent}"
            )
