"""Provenance of an output: package versions, git revision and command line."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("maskdistill", "torch", "torchvision", "timm", "open_clip_torch", "zarr", "numcodecs", "webdataset", "numpy", "pillow")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision(folder: Path | None = None) -> str | None:
    """Return the commit of the checkout that contains this package, with "-dirty" when it has changes."""
    folder = folder or Path(__file__).resolve().parent.parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("-dirty" if status else "")


def run_environment() -> dict:
    return {"command": sys.argv, "git_revision": git_revision(), "packages": package_versions()}
