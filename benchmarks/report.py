"""docs/benchmarks.md from the JSON lines of a benchmark run: one table per benchmark, machine, command."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from benchmarks.harness import usable_cores


@dataclass
class BenchmarkResult:
    """Output of one benchmark module: its records, exit code and run time."""

    name: str
    title: str
    description: str
    command: str
    records: list[dict] = field(default_factory=list)
    returncode: int = 0
    seconds: float = 0.0
    error: str = ""


def machine_description() -> dict[str, Any]:
    """Describe the CPU, its usable cores, the memory and the GPUs (by nvidia-smi name) of this machine."""
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpus": _gpu_names(),
        "load_average": round(os.getloadavg()[0], 2),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_names() -> list[str]:
    if not torch.cuda.is_available():
        return []
    if shutil.which("nvidia-smi"):
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        if result.returncode == 0 and result.stdout.strip():
            return [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]


def render_markdown(
    results: list[BenchmarkResult],
    machine: dict[str, Any],
    command: str,
    date: str,
    revision: str | None,
    quick: bool,
) -> str:
    """Return the whole benchmarks page."""
    lines = [
        "# Benchmarks",
        "",
        "This page is written by `make bench` (`python -m benchmarks.run_all`); do not edit it by hand.",
        "Each benchmark measures a ratio within one run: the two sides alternate for several rounds on the",
        "same machine, so that load from other processes slows both alike, and each side's figure is the",
        "median of its rounds. Run one benchmark alone with `python -m benchmarks.<name>`; add `--quick` for",
        "a seconds-long check of the code path with tiny models, whose numbers mean nothing. Bytes per view",
        "and fidelity of each target codec are on their own page, [codecs.md](codecs.md)",
        "(`python -m benchmarks.run_all --codec-table` rewrites it too).",
        "",
        *_run_section(results, machine, command, date, revision, quick),
        "",
        "## Summary",
        "",
        "| benchmark | case | ratio | goal | result | spread |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        lines.extend(_summary_rows(result))
    for result in results:
        lines.extend(["", *_benchmark_section(result)])
    return "\n".join(lines) + "\n"


def _run_section(results, machine, command, date, revision, quick) -> list[str]:
    devices = sorted({record["setup"]["device"] for result in results for record in result.records})
    gpus = ", ".join(machine["gpus"]) or "none"
    lines = [
        "## Run",
        "",
        f"- Date: {date}",
        f"- Command: `{command}`",
        f"- Code: git revision {revision or 'unknown'}",
        f"- Machine: {machine['cpu']}, {machine['usable_cores']} usable of {machine['logical_cores']} logical cores, "
        f"{machine['memory_gib']} GiB memory; GPUs: {gpus}",
        f"- Software: Python {machine['python']}, torch {machine['torch']}, {machine['os']}",
        f"- Devices measured: {', '.join(devices) or 'none'}",
    ]
    if "load_average_start" in machine:
        lines.append(
            f"- CPU load (1-minute load average of all processes): {machine['load_average_start']} at the start, "
            f"{machine['load_average']} at the end. Other work on the same cores slows both sides of a ratio, "
            "but adds noise: the spread column is the largest max/min over the rounds of one side."
        )
    if devices and all(device == "cpu" for device in devices):
        lines.append(
            "- Every figure below was measured on CPU. GPU numbers were not measured because this machine "
            "has no GPU. On a GPU the student step and the teacher get far faster while JPEG and target "
            "decoding stay on the CPU, so the loader-bound ratios will differ."
        )
    if quick:
        lines.append("- Scale: `--quick` (tiny models and inputs): these numbers check the code path and measure nothing.")
    return lines


def _summary_rows(result: BenchmarkResult) -> list[str]:
    if result.returncode != 0:
        return [f"| {result.name} | - | - | - | failed (exit code {result.returncode}) | - |"]
    return [
        f"| {result.name} | {record['case']} | {_number(record['ratio'])} | {_goal(record['goal'])} | "
        f"{_verdict(record)} | {_round_spread(record)} |"
        for record in result.records
    ]


def _round_spread(record: dict) -> str:
    """Return the largest max/min over the per-round series of the raw figures, or "-" without any."""
    spreads = [
        max(values) / min(values)
        for key, values in record["raw"].items()
        if key.endswith("_rounds") and values and min(values) > 0
    ]
    return f"{max(spreads):.2f}" if spreads else "-"


def _benchmark_section(result: BenchmarkResult) -> list[str]:
    lines = [f"## {result.title} (`{result.name}`)", "", result.description, "", f"Command: `{result.command}`"]
    lines.append(f"Run time: {result.seconds:.0f} s.")
    if result.returncode != 0:
        lines.extend(["", f"**The benchmark failed** with exit code {result.returncode}:", "", "```", result.error, "```"])
        return lines

    lines.extend(["", "| case | ratio | goal | result | spread | raw figures |", "|---|---|---|---|---|---|"])
    for record in result.records:
        lines.append(
            f"| {record['case']} | {_number(record['ratio'])} | {_goal(record['goal'])} | {_verdict(record)} | "
            f"{_round_spread(record)} | {_figures(record['raw'])} |"
        )

    lines.extend(["", *_verdict_sentences(result.records), "", "Setup:", ""])
    for case, setup in _distinct_setups(result.records):
        lines.append(f"- {case}: {_figures(setup)}")
    return lines


def _verdict_sentences(records: list[dict]) -> list[str]:
    missed = [record for record in records if not record["passed"]]
    if not missed:
        return [f"Goal met in every case ({len(records)} of {len(records)})."]
    sentences = [f"**Goal not met** in {len(missed)} of {len(records)} cases:"]
    for record in missed:
        goal = record["goal"]
        sentences.append(
            f"- {record['case']}: measured {_number(record['ratio'])}, goal {goal['op']} {_number(goal['value'])}."
        )
    return sentences


def _distinct_setups(records: list[dict]) -> list[tuple[str, dict]]:
    """Return (case label, setup) pairs, merging cases whose setups differ only in the codec or case name."""
    setups: list[tuple[str, dict]] = []
    for record in records:
        setup = {key: value for key, value in record["setup"].items() if key != "codec"}
        for index, (label, known) in enumerate(setups):
            if known == setup:
                setups[index] = (f"{label}, {record['case']}", known)
                break
        else:
            setups.append((record["case"], setup))
    return setups


def _verdict(record: dict) -> str:
    return "pass" if record["passed"] else "**fail**"


def _goal(goal: dict) -> str:
    return f"{goal['op']} {_number(goal['value'])}"


def _figures(values: dict) -> str:
    return "; ".join(f"{key}: {_value(value)}" for key, value in values.items() if value is not None)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _number(value: float) -> str:
    """Format with 3 significant digits, or as a whole number at 1000 and above."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"
