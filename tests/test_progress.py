"""Console output of the stages: progress, start and step logs, metrics files, the run folder, --version.

The command-line tests run the real `maskdistill` commands in subprocesses with piped output,
as a batch job or `| tee` would, with the pixel teacher and a tiny student on a few real photos.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.tiny_runs import IMG_SIZE, STUDENT, STUDENT_OVERRIDES, copy_photos, read_metrics, run_cli
from PIL import Image
from rich.console import Console

import pipeline.logs as logs
from pipeline.logs import MetricsLog, ProgressReporter, format_seconds

ANSI_ESCAPE = "\x1b"
STEPS = 3
PRESET = {
    "cache_targets": {
        "teacher": "pixel", "img_size": IMG_SIZE, "shard_size": 4, "workers": 0, "device": "cpu",
        "batch_size": 8, "fidelity_views": 2,
    },
    "pretrain": {
        "student": STUDENT, "student_overrides": STUDENT_OVERRIDES,
        "img_size": IMG_SIZE, "steps": STEPS, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "val_fraction": 0.2,
        "workers": 0, "device": "cpu", "log_every": 1, "checkpoint_every": 2,
    },
}
TRAINING_FIELDS = (
    "step", "time", "epoch", "loss", "loss_mean", "lr", "grad_norm", "img_per_s", "img_per_s_per_device",
    "data_time", "step_time", "peak_memory_mb", "eta_seconds",
)


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory) -> dict:
    """Run cache-targets, then pretrain, through the command line with piped output."""
    root = tmp_path_factory.mktemp("piped")
    photos = copy_photos(root / "photos", 8)
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump(PRESET))

    cache, run = root / "cache", root / "run"
    stage_one = run_cli(["cache-targets", "--config", str(preset), "--data", str(photos), "--out", str(cache)])
    assert stage_one.returncode == 0, stage_one.stderr
    stage_two = run_cli(["pretrain", "--config", str(preset), "--cache", str(cache), "--out", str(run)])
    assert stage_two.returncode == 0, stage_two.stderr
    return {"cache": cache, "run": run, "stage_one": stage_one, "stage_two": stage_two}


@pytest.fixture
def plain_console(monkeypatch):
    monkeypatch.setattr(logs, "stderr_is_terminal", lambda: False)


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


# ---- logging setup and the progress reporter in process


def format_warning(handler: logging.Handler) -> str:
    return handler.format(logging.LogRecord("stage", logging.WARNING, __file__, 1, "slow disk", None, None))


def test_setup_logging_rank_zero_info(plain_console, restore_logging):
    logs.setup_logging(rank=0)
    root = logging.getLogger()
    assert root.level == logging.INFO
    assert len(root.handlers) == 1
    assert format_warning(root.handlers[0]).endswith(" WARNING stage: slow disk")
    assert "[rank" not in format_warning(root.handlers[0])


def test_setup_logging_other_ranks_warnings(plain_console, restore_logging):
    logs.setup_logging(rank=3, debug=True)
    root = logging.getLogger()
    assert root.level == logging.WARNING
    assert format_warning(root.handlers[0]).endswith(" [rank 3] WARNING stage: slow disk")



def test_reporter_logs_lines_off_terminal(plain_console, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.logs")
    progress = ProgressReporter("stage", total=10, interval=0.0)
    progress.advance(4, extra="shards 1/3")
    progress.advance(6)
    progress.close()

    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("stage: 4/10 img (40%)")
    assert "img/s" in lines[0]
    assert "ETA" in lines[0]
    assert lines[1].startswith("stage: 10/10 img (100%)")
    assert lines[1].endswith("; shards 1/3")


def test_reporter_sample_rate_in_lines(plain_console, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.logs")
    progress = ProgressReporter("pretrain", total=4, unit="step", sample_unit="img", interval=0.0)
    progress.advance(1, samples=8)

    line = caplog.records[0].getMessage()
    assert line.startswith("pretrain: 1/4 step (25%)")
    assert re.search(r", [0-9.]+ img/s,", line)
    assert "step/s" not in line
    assert progress.sample_rate > progress.rate


def test_reporter_final_line_logged_once(plain_console, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.logs")
    progress = ProgressReporter("stage", total=5, interval=3600.0)
    progress.advance(5)
    progress.advance(0, extra="shards 2/2, 1.0 MiB written")
    progress.close()
    progress.close()

    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1
    assert lines[0].startswith("stage: 5/5 img (100%)")
    assert lines[0].endswith("; shards 2/2, 1.0 MiB written")


def test_reporter_without_log_lines_is_silent(plain_console, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.logs")
    progress = ProgressReporter("pretrain", total=8, interval=0.0, log_lines=False)
    progress.advance(4)
    progress.close()
    assert caplog.records == []
    assert progress.done == 4


def test_reporter_disabled_still_counts(plain_console, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.logs")
    progress = ProgressReporter("stage", total=8, enabled=False, interval=0.0)
    progress.advance(2)
    progress.close()
    assert caplog.records == []
    assert progress.done == 2
    assert progress.rate > 0
    assert 0 < progress.eta_seconds() < float("inf")


def test_reporter_eta_unknown_before_work(plain_console):
    progress = ProgressReporter("stage", total=8, enabled=False)
    assert progress.eta_seconds() == float("inf")
    assert format_seconds(progress.eta_seconds()) == "unknown"


def test_reporter_bar_on_terminal(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(logs, "stderr_is_terminal", lambda: True)
    monkeypatch.setattr(logs, "CONSOLE", Console(file=stream, force_terminal=True, width=160))
    progress = ProgressReporter("cache-targets", total=10)
    progress.advance(5, extra="shards 1/2, 0.5 MiB written")
    progress.advance(5)
    progress.close()

    output = stream.getvalue()
    assert "cache-targets" in output
    assert "10/10" in output
    assert "img/s" in output
    assert "shards 1/2, 0.5 MiB written" in output
    assert ANSI_ESCAPE in output


def test_format_seconds_cases():
    assert format_seconds(0) == "0:00:00"
    assert format_seconds(59.9) == "0:00:59"
    assert format_seconds(3 * 3600 + 62) == "3:01:02"
    assert format_seconds(float("inf")) == "unknown"
    assert format_seconds(float("nan")) == "unknown"


def test_metrics_log_writes_jsonl_and_tensorboard(tmp_path):
    metrics = MetricsLog(tmp_path)
    metrics.write(1, {"loss": 0.5, "lr": 1e-3, "note": "text"})
    metrics.write(2, {"val_loss": 0.4})
    metrics.close()

    records = read_metrics(tmp_path)
    assert [record["step"] for record in records] == [1, 2]
    assert records[0]["loss"] == 0.5
    assert records[0]["note"] == "text"
    assert records[1]["val_loss"] == 0.4
    assert all("time" in record for record in records)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_metrics_log_start_step_drops_later(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    killed = MetricsLog(tmp_path)
    for step in range(1, 7):
        killed.write(step, {"loss": 1.0 / step})
    killed.close()
    with (tmp_path / "metrics.jsonl").open("a") as stream:
        stream.write('{"step": 7, "lo')

    resumed = MetricsLog(tmp_path, start_step=4)
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2, 3, 4]
    for step in (5, 6):
        resumed.write(step, {"loss": 10.0 + step})
    resumed.close()

    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [scalar.step for scalar in scalars] == [1, 2, 3, 4, 5, 6]
    assert [scalar.value for scalar in scalars][4:] == [15.0, 16.0]


def test_metrics_log_without_start_step_appends(tmp_path):
    first = MetricsLog(tmp_path)
    first.write(3, {"loss": 0.5})
    first.close()

    second = MetricsLog(tmp_path)
    second.write(2, {"loss": 0.4})
    second.close()

    assert [record["step"] for record in read_metrics(tmp_path)] == [3, 2]


def test_metrics_log_disabled_writes_nothing(tmp_path):
    metrics = MetricsLog(tmp_path, enabled=False)
    metrics.write(1, {"loss": 0.5})
    metrics.close()
    assert list(tmp_path.iterdir()) == []


# ---- the real commands with piped output


def test_piped_cache_targets_progress_is_line_based(piped_run):
    stderr = piped_run["stage_one"].stderr
    assert "\r" not in stderr
    assert ANSI_ESCAPE not in stderr
    progress = [line for line in stderr.splitlines() if "cache-targets: " in line]
    assert progress
    assert re.search(r"8/8 img \(100%\), [0-9.]+ img/s", progress[-1])
    assert "shards 2/2" in progress[-1]
    assert "MiB written" in progress[-1]


def test_piped_pretrain_steps_are_line_based(piped_run):
    stderr = piped_run["stage_two"].stderr
    assert "\r" not in stderr
    assert ANSI_ESCAPE not in stderr
    steps = [line for line in stderr.splitlines() if re.search(r"step \d+/3 ", line)]
    assert len(steps) == STEPS
    for line in steps:
        assert re.search(r"loss [0-9.]+ \(mean [0-9.]+\)", line)
        assert re.search(r"[0-9.]+ img/s \([0-9.]+ per device\)", line)
        assert re.search(r"data wait \d+%", line)
        assert re.search(r"lr [0-9.e-]+", line)
        assert re.search(r"peak mem \d+ MB", line)
        assert re.search(r"ETA \d+:\d\d:\d\d", line)


def test_piped_pretrain_logs_start_summary(piped_run):
    stderr = piped_run["stage_two"].stderr
    assert "resolved config: {" in stderr
    assert "'mask_ratio': 0.4" in stderr
    assert "global batch 4 (4 per process x 1 processes)" in stderr
    assert "lr 0.001 (base lr" in stderr
    assert re.search(r"student vit_tiny_patch16: [0-9.]+M parameters, head fc: [0-9.]+M parameters", stderr)
    assert "targets: grid 6x6, width 768" in stderr
    assert f"outputs in {piped_run['run']}" in stderr


def test_piped_pretrain_result_on_stdout(piped_run):
    stdout = piped_run["stage_two"].stdout
    assert f"finished {STEPS} steps" in stdout
    assert "INFO" not in stdout


def test_run_folder_contents(piped_run):
    run, cache = piped_run["run"], piped_run["cache"]

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["cache"] == str(cache)
    assert config["steps"] == STEPS
    assert config["student_overrides"] == PRESET["pretrain"]["student_overrides"]

    assert json.loads((run / "cache-manifest.json").read_text()) == json.loads((cache / "manifest.json").read_text())

    environment = json.loads((run / "environment.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", environment["git_revision"])
    assert environment["packages"]["torch"] == torch.__version__.split("+")[0]
    assert "pretrain" in environment["command"]

    checkpoint = torch.load(run / "checkpoint-last.pt", weights_only=True)
    assert checkpoint["step"] == STEPS
    assert (run / "checkpoint-00000002.pt").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    with Image.open(run / "plot.png") as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 300
    assert pixels.std() > 20


def test_run_metrics_fields(piped_run):
    lines = (piped_run["run"] / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    training = [record for record in records if "loss" in record]
    validation = [record for record in records if "val_loss" in record]

    assert [record["step"] for record in training] == list(range(1, STEPS + 1))
    for record in training:
        assert set(TRAINING_FIELDS) <= set(record)
        assert np.isfinite(record["loss"])
        assert record["img_per_s"] > 0
    assert training[-1]["eta_seconds"] == 0
    assert validation
    assert np.isfinite(validation[-1]["val_loss"])


def test_config_unknown_key_rejected(tmp_path):
    preset = tmp_path / "typo.yaml"
    preset.write_text(yaml.safe_dump({"pretrain": {"mask_ration": 0.5}}))
    result = run_cli(["pretrain", "--config", str(preset), "--cache", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.returncode == 2
    assert "unknown key 'mask_ration'" in result.stderr
    assert str(preset) in result.stderr
    assert "Traceback" not in result.stderr


# ---- version and shell completion


def test_version_option():
    result = run_cli(["--version"])
    assert result.returncode == 0
    assert re.fullmatch(r"maskdistill \d+\.\d+\.\d+\S*\n", result.stdout)


def test_help_lists_completion_options():
    result = run_cli(["--help"])
    assert result.returncode == 0
    assert "--install-completion" in result.stdout
    assert "--show-completion" in result.stdout


def test_completion_completes_command_names(tmp_path):
    program = Path(sys.executable).parent / "maskdistill"
    environment = {**os.environ, "_MASKDISTILL_COMPLETE": "complete_bash", "COMP_WORDS": "maskdistill ins", "COMP_CWORD": "1"}
    result = subprocess.run([str(program)], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.split() == ["inspect"]


def test_peak_memory_on_cpu_keeps_freed_peak():
    import psutil

    from stages.pretrain import _peak_memory_mb

    process = psutil.Process()
    before = _peak_memory_mb(torch.device("cpu"), process)
    # grow the process beyond its earlier peak by 256 MiB, then free the buffer again
    size_mib = int(max(0.0, before - process.memory_info().rss / 2**20)) + 256
    buffer = np.ones(size_mib * 2**20, dtype=np.uint8)
    del buffer
    after = _peak_memory_mb(torch.device("cpu"), process)

    assert after >= before + 200
    assert after > process.memory_info().rss / 2**20 + 200
