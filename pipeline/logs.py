"""Console logging, metrics files and progress display for long stages.

Only rank 0 logs at INFO to the console; other ranks log warnings and errors. Everything goes
to stderr, so stdout keeps only a command's result. Metrics go to a JSON-lines file in the run
folder, and to TensorBoard event files when tensorboard is installed. Progress is a rich
progress bar when stderr is a terminal, and otherwise a plain log line every
`LOG_INTERVAL_SECONDS`, so that piped or batch-job output stays line-based (no carriage
returns, no ANSI escapes).
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipeline.atomic import atomic_write_text

logger = logging.getLogger(__name__)

LOG_INTERVAL_SECONDS = 30.0
QUIET_LOGGERS = ("PIL", "matplotlib", "urllib3", "httpx", "huggingface_hub", "filelock")

# One console for log records and progress bars, so that records print above a running bar.
CONSOLE = Console(stderr=True)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def setup_logging(rank: int = 0, debug: bool = False) -> None:
    """Log to stderr: INFO (DEBUG with `debug`) on rank 0, WARNING and above on other ranks.

    On a terminal, rich formats the records. Elsewhere each record is one plain line with time,
    level and logger name, and ranks other than 0 prefix it with their rank.
    """
    level = logging.DEBUG if debug else logging.INFO
    if rank != 0:
        level = logging.WARNING

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if stderr_is_terminal():
        handler: logging.Handler = RichHandler(console=CONSOLE, show_path=False, rich_tracebacks=debug)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank {rank}] " if rank else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class MetricsLog:
    """Metrics as JSON lines (`metrics.jsonl`) and, when available, TensorBoard events.

    Each line is one record: `{"step": ..., "time": <unix seconds>, **values}`. TensorBoard gets
    the numeric values only, under `run_dir/tensorboard`. Both are flushed at every `write`, so
    a killed run keeps its metrics up to the last one written.

    `start_step` is the step at which a run continues, such as the step of the checkpoint it
    resumes from. Records after it, left by a killed run, are then removed from metrics.jsonl
    and hidden in TensorBoard, so that steps never go backward. Without `start_step` the log
    appends to what the folder contains.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, start_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tensorboard = None
        if not enabled:
            return
        if start_step is not None:
            _drop_records_after(self.path, start_step)

        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed; metrics go to %s only", self.path)
            return
        # TensorBoard hides the events at steps >= purge_step of earlier event files in log_dir.
        # NOTE: it orders the files by name, which starts with the creation time in seconds, so
        # this works only when the clock here is past the creation time of the killed run's file.
        purge_step = start_step + 1 if start_step is not None else None
        self._tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(name, value, step)
            # on its own, SummaryWriter flushes only every flush_secs (120 s by default)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrite the metrics file without its records after `step` and without a line cut off by a kill."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept_lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept_lines.append(line)

    if len(kept_lines) < len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept_lines))
        logger.info("removed %d records after step %d from %s", len(lines) - len(kept_lines), step, path)


class ProgressReporter:
    """Progress of a long stage: a rich bar on a terminal, a log line every `interval` s otherwise.

    `advance(count, extra, samples)` adds `count` done units of `total` (`unit`, e.g. "img" or
    "step"). The displayed rate is in units per second, or in `samples` per second when
    `sample_unit` is set (steps counted, img/s shown). The counts, rates and `eta_seconds()` are
    kept even when display is disabled (`enabled=False`). `extra` is text shown after the rate,
    such as shards done and bytes written, and it stays until a later call passes new text.
    `close()` stops the bar, or logs a final line. With `log_lines=False` nothing is logged off a
    terminal, for loops that log their own periodic lines.
    """

    def __init__(
        self,
        description: str,
        total: int,
        unit: str = "img",
        enabled: bool = True,
        interval: float = LOG_INTERVAL_SECONDS,
        log_lines: bool = True,
        sample_unit: str | None = None,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.sample_unit = sample_unit
        self.enabled = enabled
        self.interval = interval
        self.log_lines = log_lines
        self.done = 0
        self.samples = 0
        self.extra = ""
        self.started = time.monotonic()
        self._last_line = self.started
        self._logged_done = 0
        self._closed = False
        self._bar: Progress | None = None
        self._task = None
        if enabled and stderr_is_terminal():
            self._start_bar()

    def _start_bar(self) -> None:
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn(self.unit),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=CONSOLE,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=self.total, rate="", extra="")
        # A bar left running would keep the terminal's cursor hidden after an exception.
        atexit.register(self.close)

    @property
    def rate(self) -> float:
        """Units per second since the reporter started."""
        return self.done / max(time.monotonic() - self.started, 1e-9)

    @property
    def sample_rate(self) -> float:
        """Samples per second since the reporter started."""
        return self.samples / max(time.monotonic() - self.started, 1e-9)

    def _rate_text(self) -> str:
        if self.sample_unit is not None:
            return f"{self.sample_rate:.1f} {self.sample_unit}/s"
        return f"{self.rate:.1f} {self.unit}/s"

    def eta_seconds(self) -> float:
        """Estimated seconds left at the mean rate so far; inf before the first unit is done."""
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else float("inf")

    def advance(self, count: int, extra: str | None = None, samples: int = 0) -> None:
        self.done += count
        self.samples += samples
        if extra is not None:
            self.extra = extra
        if not self.enabled or self._closed:
            return

        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=self._rate_text(), extra=self.extra)
            return
        now = time.monotonic()
        if self.log_lines and now - self._last_line >= self.interval:
            self._last_line = now
            self._log_line()

    def _log_line(self, final: bool = False) -> None:
        self._logged_done = self.done
        percent = 100.0 * self.done / self.total if self.total else 100.0
        elapsed = format_seconds(time.monotonic() - self.started)
        eta = "" if final else f", ETA {format_seconds(self.eta_seconds())}"
        extra = f"; {self.extra}" if self.extra else ""
        logger.info(
            "%s: %d/%d %s (%.0f%%), %s, elapsed %s%s%s",
            self.description, self.done, self.total, self.unit, percent, self._rate_text(), elapsed, eta, extra,
        )

    def close(self) -> None:
        """Stop the bar, or log the final count and rate; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.stop()
            atexit.unregister(self.close)
        elif self.enabled and self.log_lines and (self.done != self._logged_done or self.done == 0):
            self._log_line(final=True)


def format_seconds(seconds: float) -> str:
    """Format a duration as H:MM:SS, or "unknown" for inf or NaN."""
    if seconds != seconds or seconds == float("inf"):
        return "unknown"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
