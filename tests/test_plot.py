"""`plot_runs`: loss, validation loss and lr curves of run folders, read from their metrics files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import UsageError
from pipeline.logs import MetricsLog
from stages.plot_runs import plot_runs, read_metrics, run_labels

# matplotlib's first two default line colors (tab:blue, tab:orange)
FIRST_COLOR = (31, 119, 180)
SECOND_COLOR = (255, 127, 14)


def write_run(folder: Path, steps: int, start_loss: float, peak_lr: float, val_every: int = 10) -> Path:
    """Write a run's metrics the way pretrain does: a training record per step, validation every few."""
    folder.mkdir(parents=True)
    metrics = MetricsLog(folder, enabled=True)
    for step in range(1, steps + 1):
        loss = start_loss * np.exp(-step / 30) + 0.02 * np.sin(step)
        lr = peak_lr * min(1.0, step / 5) * (0.5 + 0.5 * np.cos(np.pi * step / steps))
        metrics.write(step, {"epoch": step // val_every, "loss": loss, "loss_mean": loss, "lr": lr})
        if step % val_every == 0:
            metrics.write(step, {"epoch": step // val_every, "val_loss": loss + 0.05})
    metrics.close()
    return folder


def read_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def count_near(pixels: np.ndarray, color: tuple[int, int, int], tolerance: int = 12) -> int:
    distance = np.abs(pixels.astype(np.int16) - np.array(color, dtype=np.int16)).max(axis=-1)
    return int((distance <= tolerance).sum())


def test_plot_two_runs_png(tmp_path):
    first = write_run(tmp_path / "base-lr", steps=60, start_loss=1.0, peak_lr=1e-3)
    second = write_run(tmp_path / "high-lr", steps=40, start_loss=0.8, peak_lr=3e-3)
    output = plot_runs([first, second], tmp_path / "plots" / "compare.png")

    pixels = read_pixels(output)
    assert output == tmp_path / "plots" / "compare.png"
    assert pixels.shape[1] >= 1000
    assert pixels.shape[0] >= 300
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert count_near(pixels, FIRST_COLOR) > 300
    assert count_near(pixels, SECOND_COLOR) > 300


def test_plot_single_run_uses_one_color(tmp_path):
    run = write_run(tmp_path / "run", steps=30, start_loss=1.0, peak_lr=1e-3)
    pixels = read_pixels(plot_runs([run], tmp_path / "one.png"))
    assert count_near(pixels, FIRST_COLOR) > 300
    assert count_near(pixels, SECOND_COLOR) == 0


def test_plot_other_format(tmp_path):
    run = write_run(tmp_path / "run", steps=10, start_loss=1.0, peak_lr=1e-3)
    output = plot_runs([run], tmp_path / "curves.pdf")
    assert output.read_bytes().startswith(b"%PDF")


def test_read_metrics_curves(tmp_path):
    run = write_run(tmp_path / "run", steps=25, start_loss=1.0, peak_lr=1e-3)
    metrics = read_metrics(run)
    assert metrics.loss.steps.tolist() == list(range(1, 26))
    assert metrics.lr.steps.tolist() == list(range(1, 26))
    assert metrics.val_loss.steps.tolist() == [10, 20]
    assert metrics.val_loss.values[0] == pytest.approx(metrics.loss.values[9] + 0.05)


def test_read_metrics_resumed_run_keeps_later_record(tmp_path):
    run = write_run(tmp_path / "run", steps=6, start_loss=1.0, peak_lr=1e-3)
    # steps 5 and 6 recorded twice, as an append-only writer leaves a run resumed from step 4
    metrics = MetricsLog(run, enabled=True)
    for step in (5, 6):
        metrics.write(step, {"loss": 10.0 + step, "loss_mean": 10.0 + step, "lr": 1e-4})
    metrics.close()

    curves = read_metrics(run)
    assert curves.loss.steps.tolist() == [1, 2, 3, 4, 5, 6]
    assert curves.loss.values[4:].tolist() == [15.0, 16.0]
    assert curves.lr.values[-1] == 1e-4


def test_read_metrics_skips_torn_line(tmp_path, caplog):
    run = write_run(tmp_path / "run", steps=4, start_loss=1.0, peak_lr=1e-3)
    with (run / "metrics.jsonl").open("a") as stream:
        stream.write('{"step": 5, "loss": 0.3, "lr')

    curves = read_metrics(run)
    assert curves.loss.steps.tolist() == [1, 2, 3, 4]
    assert "skipped 1 lines" in caplog.text
    assert "line 5" in caplog.text


def test_plot_folder_without_metrics_rejected(tmp_path):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(UsageError) as error:
        plot_runs([empty], tmp_path / "out.png")
    assert str(empty) in str(error.value)
    assert "metrics.jsonl" in str(error.value)
    assert not (tmp_path / "out.png").exists()


def test_plot_missing_folder_rejected(tmp_path):
    with pytest.raises(UsageError) as error:
        plot_runs([tmp_path / "typo"], tmp_path / "out.png")
    assert f"run folder {tmp_path / 'typo'} not found" in str(error.value)


def test_plot_metrics_without_loss_rejected(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "val_loss": 0.5}) + "\n")
    with pytest.raises(UsageError) as error:
        plot_runs([run], tmp_path / "out.png")
    assert "no training loss records" in str(error.value)


def test_plot_unknown_suffix_rejected(tmp_path):
    run = write_run(tmp_path / "run", steps=4, start_loss=1.0, peak_lr=1e-3)
    with pytest.raises(UsageError) as error:
        plot_runs([run], tmp_path / "curves.txt")
    assert "curves.txt" in str(error.value)
    assert ".png" in str(error.value)


def test_plot_without_runs_rejected(tmp_path):
    with pytest.raises(UsageError):
        plot_runs([], tmp_path / "out.png")


def test_run_labels_cases(tmp_path):
    assert run_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
    assert run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run"]) == ["x/run", "y/run"]
    assert run_labels([tmp_path / "run"]) == ["run"]


def test_run_labels_shortest_suffix_per_run(tmp_path):
    runs = [tmp_path / "x" / "a" / "run", tmp_path / "y" / "a" / "run", tmp_path / "c" / "other"]
    assert run_labels(runs) == ["x/a/run", "y/a/run", "other"]


def test_run_labels_path_inside_other():
    # every suffix of /r/run is also a suffix of /x/r/run, so only its whole path distinguishes them
    assert run_labels([Path("/r/run"), Path("/x/r/run")]) == ["/r/run", "x/r/run"]


def test_run_labels_relative_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_labels(["a/run", "b/run"]) == ["a/run", "b/run"]


def test_run_labels_same_folder_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()

    with pytest.raises(UsageError) as error:
        run_labels(["run", tmp_path / "run"])

    message = str(error.value)
    assert f"run folder {tmp_path / 'run'} is given twice" in message
    assert f"as run and {tmp_path / 'run'}" in message
    assert "pass each run once" in message


def test_plot_same_run_twice_rejected(tmp_path):
    run = write_run(tmp_path / "run", steps=4, start_loss=1.0, peak_lr=1e-3)

    with pytest.raises(UsageError) as error:
        plot_runs([run, run], tmp_path / "out.png")

    assert f"run folder {run} is given twice: pass each run once" == str(error.value)
    assert not (tmp_path / "out.png").exists()


def test_plot_legend_names_distinct_runs(tmp_path, caplog):
    first = write_run(tmp_path / "a" / "run", steps=4, start_loss=1.0, peak_lr=1e-3)
    second = write_run(tmp_path / "b" / "run", steps=4, start_loss=2.0, peak_lr=1e-3)

    with caplog.at_level(logging.INFO, logger="stages.plot_runs"):
        plot_runs([first, second], tmp_path / "out.png")

    assert "plotted a/run, b/run into" in caplog.text
