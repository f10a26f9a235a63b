"""Shared plumbing of the benchmarks: options, timing, goals and the JSON line of a measurement.

A benchmark compares two sides measured in the same process (for example the loader and the
bare JPEG decoder). `interleave` runs the sides in turn for several rounds, so that a slow
period of a shared machine slows both sides alike, and the ratio uses the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.distributed import DistInfo, resolve_device

logger = logging.getLogger("benchmarks")

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "data" / "imagenet-sample-64"


@dataclass(frozen=True)
class Goal:
    """The bound a ratio must meet: `op` is ">=" or "<="."""

    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"goal op must be '>=' or '<=', got {self.op!r}")

    def passed(self, ratio: float) -> bool:
        if self.op == ">=":
            return ratio >= self.value
        return ratio <= self.value

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "value": self.value}


@dataclass(frozen=True)
class BenchOptions:
    """Command-line options shared by every benchmark module."""

    quick: bool
    device: torch.device
    threads: int
    workdir: Path | None


def parse_options(description: str, argv: Sequence[str] | None, default_threads: int | None = None) -> BenchOptions:
    """Parse `--quick`, `--device`, `--threads` and `--workdir`, and apply the thread count."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="Tiny models and inputs: checks the code path in seconds.")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto).")
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads,
        help="torch.set_num_threads for the measuring process (default: every usable core).",
    )
    parser.add_argument("--workdir", type=Path, help="Folder for caches and runs (default: a new temp folder).")
    args = parser.parse_args(argv)

    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    return BenchOptions(args.quick, resolve_device(args.device, DistInfo()), threads, args.workdir)


def usable_cores() -> int:
    """Return the number of CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def configure_logging() -> None:
    """Log progress of the benchmarks at INFO and only warnings of the pipeline, to stderr."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)


def run_module(
    description: str,
    run: Callable[[BenchOptions, Path], list[dict]],
    argv: Sequence[str] | None = None,
    default_threads: int | None = None,
) -> list[dict]:
    """Entry point of a benchmark module: parse options, run it in a work folder, print its JSON lines."""
    configure_logging()
    options = parse_options(description, argv, default_threads)
    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
        records = run(options, options.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="maskdistill-bench-") as folder:
            records = run(options, Path(folder))
    for record in records:
        print(json.dumps(record), flush=True)
    return records


def setup_record(options: BenchOptions, **details: Any) -> dict[str, Any]:
    """Describe what a measurement ran on: device, threads, torch version and `details`."""
    device = options.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "scale": "quick" if options.quick else "full",
        **details,
    }


def measurement(
    benchmark: str,
    case: str,
    ratio: float,
    goal: Goal,
    raw: dict[str, Any],
    setup: dict[str, Any],
) -> dict[str, Any]:
    """Build the JSON record of one measurement."""
    return {
        "benchmark": benchmark,
        "case": case,
        "ratio": ratio,
        "goal": goal.to_json(),
        "passed": goal.passed(ratio),
        "raw": raw,
        "setup": setup,
    }


def run_python_module(arguments: list[str]) -> str:
    """Run `python -m ARGUMENTS` in the repository with this process's thread count and return its stdout.

    Raises RuntimeError with the end of stderr when the command fails.
    """
    command = [sys.executable, "-m", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(function: Callable[[], Any], device: torch.device) -> float:
    """Return the wall time of one call of `function`, device work included."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def interleave(sides: dict[str, Callable[[], float]], rounds: int, warmup_rounds: int = 1) -> dict[str, list[float]]:
    """Call every side once per round, in turn, and return each side's values of the timed rounds.

    A side returns its own figure (a rate, usually), so that a side may report what a real run
    logged instead of a wall time measured here. The first `warmup_rounds` rounds are discarded.
    """
    values: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(warmup_rounds + rounds):
        timed = round_index >= warmup_rounds
        for name, side in sides.items():
            value = side()
            if timed:
                values[name].append(value)
        label = "timed" if timed else "warm-up"
        logger.info("round %d (%s): %s", round_index + 1, label, _format_round(values, timed))
    return values


def _format_round(values: dict[str, list[float]], timed: bool) -> str:
    if not timed:
        return "done"
    return ", ".join(f"{name} {series[-1]:.4g}" for name, series in values.items())


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def rounded(values: Iterable[float], digits: int = 4) -> list[float]:
    """Round each value to `digits` significant digits for the JSON line."""
    return [float(f"{value:.{digits}g}") for value in values]
