"""Benchmarks at their quick size: each prints JSON lines with the fields run_all reads; the page renders them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import cached_efficiency, loader, memory, offline_vs_online, run_all, stage_one_efficiency
from benchmarks.harness import Goal, interleave
from benchmarks.report import BenchmarkResult, render_markdown

SETUP_KEYS = {"device", "device_name", "threads", "torch", "scale"}


@pytest.fixture(autouse=True)
def keep_threads():
    """Restore torch's thread count, which a benchmark sets for its own process."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_quick(module, tmp_path: Path, capsys) -> list[dict]:
    """Run `module` at its quick size on CPU; return the JSON lines it printed."""
    returned = module.main(["--quick", "--device", "cpu", "--workdir", str(tmp_path / "work")])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == json.loads(json.dumps(returned))
    return printed


def check_record(record: dict, name: str) -> None:
    assert record["benchmark"] == name
    assert isinstance(record["case"], str) and record["case"]
    assert isinstance(record["ratio"], float)
    assert math.isfinite(record["ratio"])
    assert record["ratio"] > 0
    assert record["goal"]["op"] in (">=", "<=")
    assert record["passed"] == Goal(record["goal"]["op"], record["goal"]["value"]).passed(record["ratio"])
    assert record["raw"]
    assert SETUP_KEYS <= set(record["setup"])
    assert record["setup"]["device"] == "cpu"
    assert record["setup"]["scale"] == "quick"
    assert record["setup"]["torch"] == torch.__version__


def test_loader_reports_every_codec(tmp_path: Path, capsys):
    records = run_quick(loader, tmp_path, capsys)
    assert [record["case"] for record in records] == list(loader.CODECS)
    for record in records:
        check_record(record, "loader")
        raw = record["raw"]
        assert record["ratio"] == raw["samples_per_s"]
        assert raw["jpeg_decode_per_s"] > 0
        assert raw["share_of_jpeg_decode_rate"] == pytest.approx(raw["samples_per_s"] / raw["jpeg_decode_per_s"])
        assert raw["target_bytes_per_sample"] > 0
        assert raw["shard_read_per_s"] > 0
        assert record["setup"]["threads"] == 1
        assert record["setup"]["codec"] == record["case"]
    sizes = {record["case"]: record["raw"]["target_bytes_per_sample"] for record in records}
    assert sizes["int8-channel"] < sizes["fp16"]
    assert sizes["pca-64"] <= sizes["int8-token"]


def test_cached_efficiency_ratio_of_rates(tmp_path: Path, capsys):
    (record,) = run_quick(cached_efficiency, tmp_path, capsys)
    check_record(record, "cached_efficiency")
    raw = record["raw"]
    assert record["ratio"] == pytest.approx(raw["trainer_img_per_s"] / raw["bare_step_img_per_s"])
    assert 0 <= raw["trainer_data_wait_share"] <= 1
    assert record["setup"]["batch_size"] == cached_efficiency.SCALES["quick"].batch_size
    assert not (tmp_path / "work" / "run").exists()


def test_offline_vs_online_goal_follows_ideal(tmp_path: Path, capsys):
    (record,) = run_quick(offline_vs_online, tmp_path, capsys)
    check_record(record, "offline_vs_online")
    raw = record["raw"]
    assert record["ratio"] == pytest.approx(raw["cached_img_per_s"] / raw["online_img_per_s"])
    assert raw["ideal"] > 1
    assert record["goal"] == {"op": ">=", "value": pytest.approx(0.95 * raw["ideal"])}
    assert record["setup"]["teacher"] == "clip_vit_base_patch16"
    assert record["setup"]["teacher_weights"] == "random"


def test_stage_one_efficiency_decode_rates(tmp_path: Path, capsys):
    (record,) = run_quick(stage_one_efficiency, tmp_path, capsys)
    check_record(record, "stage_one_efficiency")
    raw = record["raw"]
    assert record["ratio"] == pytest.approx(raw["cache_targets_views_per_s"] / raw["teacher_forward_views_per_s"])
    assert raw["render_views_per_s_per_core_draft"] > 0
    assert raw["render_views_per_s_per_core_full_size"] > 0
    assert raw["stage_one_item_views_per_s_per_core"] > 0


def test_full_size_decoding_restores_draft_mode():
    import pipeline.images

    before = pipeline.images.DRAFT_REDUCTIONS
    with stage_one_efficiency.full_size_decoding():
        assert pipeline.images.DRAFT_REDUCTIONS == (1,)
    assert pipeline.images.DRAFT_REDUCTIONS == before


def test_memory_peaks_of_both_sizes(tmp_path: Path, capsys):
    (record,) = run_quick(memory, tmp_path, capsys)
    check_record(record, "memory")
    raw = record["raw"]
    assert record["ratio"] == pytest.approx(raw["peak_rss_mib_10n"] / raw["peak_rss_mib_n"])
    assert raw["peak_rss_mib_n"] > 50
    assert raw["tree_peak_rss_mib_n"] >= raw["peak_rss_mib_n"] * 0.9
    assert raw["cache_bytes_10n"] > 5 * raw["cache_bytes_n"]


def test_memory_failed_run_raises_with_log(tmp_path: Path):
    preset = memory.write_preset(tmp_path / "preset.yaml", memory.SCALES["quick"], "cpu")
    with pytest.raises(RuntimeError) as error:
        memory.measure_pretrain(preset, tmp_path / "missing-cache", tmp_path / "run", tmp_path / "run.log")
    assert "exited with code 2" in str(error.value)
    assert "missing-cache" in str(error.value)


def test_interleave_alternates_sides():
    calls = []
    sides = {"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}
    values = interleave(sides, rounds=2, warmup_rounds=1)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert values == {"a": [1.0, 1.0], "b": [2.0, 2.0]}


def test_goal_bounds():
    assert Goal(">=", 0.95).passed(0.95)
    assert not Goal(">=", 0.95).passed(0.94)
    assert Goal("<=", 1.1).passed(1.05)
    assert not Goal("<=", 1.1).passed(1.2)
    with pytest.raises(ValueError):
        Goal(">", 1.0)


def sample_record(case: str, ratio: float, passed: bool) -> dict:
    return {
        "benchmark": "loader",
        "case": case,
        "ratio": ratio,
        "goal": {"op": ">=", "value": 800.0},
        "passed": passed,
        "raw": {"samples_per_s": ratio, "samples_per_s_rounds": [ratio, 1.25 * ratio], "jpeg_decode_per_s": 2100.0},
        "setup": {"device": "cpu", "threads": 1, "torch": "2.x", "codec": case},
    }


def test_page_states_failures_and_machine():
    machine = {"cpu": "Test CPU", "logical_cores": 2, "usable_cores": 2, "memory_gib": 8.0,
               "os": "Linux", "python": "3.11", "torch": "2.x", "gpus": [], "load_average": 3.5,
               "load_average_start": 1.25}
    results = [
        BenchmarkResult("loader", "Loader throughput per core", "What it measures.", "python -m benchmarks.loader",
                        records=[sample_record("fp16", 912.0, True), sample_record("pca-64", 640.4, False)]),
        BenchmarkResult("memory", "Peak memory", "Peak RSS.", "python -m benchmarks.memory",
                        returncode=1, error="Traceback: boom"),
    ]
    page = render_markdown(results, machine, "python -m benchmarks.run_all", "2026-01-01 00:00 UTC", "abc123", False)

    assert "| loader | fp16 | 912 | >= 800 | pass | 1.25 |" in page
    assert "| loader | pca-64 | 640 | >= 800 | **fail** | 1.25 |" in page
    assert "- pca-64: measured 640, goal >= 800." in page
    assert "| memory | - | - | - | failed (exit code 1) | - |" in page
    assert "Traceback: boom" in page
    assert "Test CPU, 2 usable of 2 logical cores" in page
    assert "1.25 at the start, 3.5 at the end" in page
    assert "GPU numbers were not measured" in page
    assert "Command: `python -m benchmarks.run_all`" in page
    assert "- fp16, pca-64: device: cpu" in page


def test_run_all_writes_page(tmp_path: Path, capsys):
    page_path, jsonl_path = tmp_path / "benchmarks.md", tmp_path / "records.jsonl"
    returncode = run_all.main(["--quick", "--only", "loader", "--device", "cpu", "--doc", str(page_path),
                               "--jsonl", str(jsonl_path)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    stored = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    page = page_path.read_text()

    assert returncode == 0
    assert [record["case"] for record in printed] == list(loader.CODECS)
    assert stored == printed
    assert "## Loader throughput per core (`loader`)" in page
    assert "Command: `python -m benchmarks.loader --device cpu --quick`" in page
    assert "| loader | fp16 |" in page
    assert "Scale: `--quick`" in page
