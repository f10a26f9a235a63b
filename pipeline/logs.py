"""Console logging, metrics files and progress display for long stages.

Only rank 0 logs at INFO to the console; other ranks log warnings and errors. Metrics go to a
JSON-lines file in the run folder, and to TensorBoard event files when tensorboard is installed.
Progress is a rich progress bar on a terminal and a log line every `interval` seconds otherwise,
so batch logs stay line-based.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

logger = logging.getLogger(__name__)


def setup_logging(rank: int = 0, debug: bool = False) -> None:
    level = logging.DEBUG if debug else logging.INFO
    if rank != 0:
        level = logging.WARNING

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=debug)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank {rank}] " if rank else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("PIL", "matplotlib", "urllib3", "httpx", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class MetricsLog:
    """Metrics as JSON lines (`metrics.jsonl`) and, when available, TensorBoard events."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tensorboard = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed; metrics go to %s only", self.path)
        else:
            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


class ProgressReporter:
    """A progress bar on a terminal; a log line every `interval` seconds otherwise."""

    def __init__(self, description: str, total: int, unit: str = "img", enabled: bool = True, interval: float = 30.0):
        self.description = description
        self.total = total
        self.unit = unit
        self.enabled = enabled
        self.interval = interval
        self.done = 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._bar: Progress | None = None
        self._task = None
        if enabled and sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[extra]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, rate="", extra="")

    def advance(self, count: int, extra: str = "") -> None:
        if not self.enabled:
            return
        self.done += count
        now = time.monotonic()
        rate = self.done / max(now - self.started, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{rate:.1f} {self.unit}/s", extra=extra)
        elif now - self._last_line >= self.interval or self.done >= self.total:
            self._last_line = now
            remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
            logger.info(
                "%s: %d/%d %s, %.1f %s/s, ETA %s %s",
                self.description, self.done, self.total, self.unit, rate, self.unit, format_seconds(remaining), extra,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def format_seconds(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
