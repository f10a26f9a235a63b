"""`maskdistill plot`: training loss, validation loss and learning rate of runs, overlaid.

Each run folder written by `pretrain` has a `metrics.jsonl` with one JSON record per line.
Training records carry `loss` (the loss at that step), `loss_mean` (the mean over the last
`--log-every` steps) and `lr`. Validation records carry `val_loss`. `pretrain` also calls
`plot_runs` on its own folder at the end of a run, which writes `RUN/plot.png`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline.errors import UsageError
from pipeline.output_paths import check_output_file
from pipeline.visualize import check_figure_suffix

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "plot.png"
# Above this ratio of largest to smallest loss the loss axes switch to a log scale.
LOG_SCALE_RATIO = 20.0


@dataclass
class Curve:
    """Values of one metric by step, sorted by step."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class RunMetrics:
    """The curves of one run folder, read from its metrics file."""

    folder: Path
    loss: Curve
    loss_mean: Curve
    val_loss: Curve
    lr: Curve


def read_metrics(run_dir: str | Path) -> RunMetrics:
    """Read a run's `metrics.jsonl` into curves.

    When a step has two records of the same kind, the later one wins. pretrain drops the
    records after the checkpoint that it resumes from, but files written by other tools may
    repeat steps. Lines that do not parse (a run killed while writing one) are skipped with a
    warning. Raises UsageError when the folder or file is missing, or when the file contains
    no training loss.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise UsageError(f"run folder {folder} not found: pass a folder written by maskdistill pretrain --out")
    path = folder / METRICS_NAME
    if not path.is_file():
        raise UsageError(
            f"{folder} has no {METRICS_NAME}: pass a run folder written by maskdistill pretrain "
            "(the file appears after the first --log-every steps)"
        )

    training, validation = _records_by_step(path)
    if not training:
        raise UsageError(f"{path} contains no training loss records yet: plot the run after its first --log-every steps")
    return RunMetrics(
        folder=folder,
        loss=_curve(training, "loss"),
        loss_mean=_curve(training, "loss_mean"),
        val_loss=_curve(validation, "val_loss"),
        lr=_curve(training, "lr"),
    )


def _records_by_step(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """Return the training and the validation records of a metrics file, keyed by step."""
    training: dict[int, dict] = {}
    validation: dict[int, dict] = {}
    bad_lines = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            bad_lines.append(number)
            continue
        if "loss" in record:
            training[step] = record
        if "val_loss" in record:
            validation[step] = record

    if bad_lines:
        logger.warning("%s: skipped %d lines that are not metric records (first: line %d)", path, len(bad_lines), bad_lines[0])
    return training, validation


def _curve(records: dict[int, dict], name: str) -> Curve:
    steps = sorted(step for step, record in records.items() if isinstance(record.get(name), (int, float)))
    return Curve(
        steps=np.array(steps, dtype=np.int64),
        values=np.array([records[step][name] for step in steps], dtype=np.float64),
    )


def run_labels(folders: Sequence[str | Path]) -> list[str]:
    """Name each run by the fewest last parts of its resolved path that no other run's path ends with.

    Runs `a/run`, `b/run` and `c/other` get the labels `a/run`, `b/run` and `other`. Raises
    UsageError when two arguments name the same folder, such as `run` and `./run/`.
    """
    resolved = [Path(folder).resolve() for folder in folders]
    _check_distinct_folders(folders, resolved)
    return [_shortest_distinct_suffix(folder, resolved) for folder in resolved]


def _check_distinct_folders(folders: Sequence[str | Path], resolved: list[Path]) -> None:
    first_seen: dict[Path, str | Path] = {}
    for argument, folder in zip(folders, resolved):
        if folder in first_seen:
            spellings = "" if str(first_seen[folder]) == str(argument) else f" (as {first_seen[folder]} and {argument})"
            raise UsageError(f"run folder {folder} is given twice{spellings}: pass each run once")
        first_seen[folder] = argument


def _shortest_distinct_suffix(folder: Path, resolved: list[Path]) -> str:
    """Return the fewest last parts of `folder` that differ from the same number of last parts of every other run.

    Falls back to the whole path. Labels of different lengths cannot be equal, so the labels
    of distinct folders are distinct.
    """
    others = [other for other in resolved if other != folder]
    for depth in range(1, len(folder.parts)):
        label = _path_suffix(folder, depth)
        if all(_path_suffix(other, depth) != label for other in others):
            return label
    return str(folder)


def _path_suffix(folder: Path, depth: int) -> str:
    """Return the last `depth` parts of `folder`, or the whole path when it has fewer parts."""
    return str(Path(*folder.parts[-depth:]))


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Draw loss, validation loss and learning rate by step for each run, overlaid; return `output`.

    The legend names each run by its folder. The output format follows the suffix of `output`
    (.png, .pdf, .svg, ...).
    """
    if not run_dirs:
        raise UsageError("pass at least one run folder to plot")
    output = Path(output)
    check_figure_suffix(output)
    check_output_file(output, "--output")
    labels = run_labels(run_dirs)
    runs = [read_metrics(folder) for folder in run_dirs]

    figure = Figure(figsize=(15, 4.2))
    loss_axes, val_axes, lr_axes = figure.subplots(1, 3)
    for run, label in zip(runs, labels):
        _plot_training_loss(loss_axes, run, label)
        if len(run.val_loss):
            val_axes.plot(run.val_loss.steps, run.val_loss.values, marker="o", markersize=3, label=label)
        lr_axes.plot(run.lr.steps, run.lr.values, label=label)

    _decorate(loss_axes, "training loss: window mean (line), logged step (dots)", "loss")
    _decorate(val_axes, "validation loss", "loss")
    _decorate(lr_axes, "learning rate", "lr")
    _choose_loss_scale(loss_axes, [run.loss.values for run in runs] + [run.loss_mean.values for run in runs])
    _choose_loss_scale(val_axes, [run.val_loss.values for run in runs])
    if not any(len(run.val_loss) for run in runs):
        val_axes.text(0.5, 0.5, "no validation loss recorded\n(--val-fraction 0, or no epoch finished yet)",
                      ha="center", va="center", transform=val_axes.transAxes, fontsize=9, color="gray")
    loss_axes.legend(fontsize=8)

    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    logger.info("plotted %s into %s", ", ".join(labels), output)
    return output


def _plot_training_loss(axes, run: RunMetrics, label: str) -> None:
    """Plot the mean loss as a line, and the loss at each logged step as faint dots of the same color."""
    curve = run.loss_mean if len(run.loss_mean) else run.loss
    (line,) = axes.plot(curve.steps, curve.values, label=label)
    axes.plot(run.loss.steps, run.loss.values, linestyle="none", marker=".", markersize=3, alpha=0.35, color=line.get_color())


def _decorate(axes, title: str, ylabel: str) -> None:
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)


def _choose_loss_scale(axes, curves: list[np.ndarray]) -> None:
    values = np.concatenate([curve for curve in curves if len(curve)] or [np.empty(0)])
    values = values[np.isfinite(values)]
    if len(values) and values.min() > 0 and values.max() / values.min() > LOG_SCALE_RATIO:
        axes.set_yscale("log")
