"""Run every benchmark, print its JSON lines and rewrite docs/benchmarks.md.

`make bench` runs `python -m benchmarks.run_all`. Each benchmark runs in its own Python process,
so that one benchmark's threads, memory and imports do not change the next one's numbers. A
benchmark that fails is reported as failed in the page and the exit code; the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.harness import REPO, configure_logging, logger
from benchmarks.report import BenchmarkResult, machine_description, render_markdown
from pipeline.provenance import git_revision

BENCHMARKS = ("loader", "cached_efficiency", "offline_vs_online", "stage_one_efficiency", "memory")
DOC = REPO / "docs" / "benchmarks.md"
CODEC_DOC = REPO / "docs" / "codecs.md"
ERROR_TAIL_LINES = 20


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Tiny models and inputs: checks the code path in seconds.")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="Run only these benchmarks.")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto).")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"Page to rewrite (default: {DOC.relative_to(REPO)}).")
    parser.add_argument("--jsonl", type=Path, help="Also write every JSON line to this file.")
    parser.add_argument(
        "--codec-table",
        action="store_true",
        help=f"Also run benchmarks.codec_table, which rewrites {CODEC_DOC.relative_to(REPO)} (several minutes).",
    )
    return parser.parse_args(argv)


def benchmark_command(name: str, quick: bool, device: str) -> list[str]:
    command = [sys.executable, "-m", f"benchmarks.{name}", "--device", device]
    return command + ["--quick"] if quick else command


def run_benchmark(name: str, quick: bool, device: str) -> BenchmarkResult:
    """Run one benchmark module in a subprocess and collect its JSON lines; its log goes to stderr."""
    module = importlib.import_module(f"benchmarks.{name}")
    command = benchmark_command(name, quick, device)
    display_command = " ".join(["python", *command[1:]])
    logger.info("running %s", display_command)

    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout:
        # stdout goes to a file, so that only stderr is read while the benchmark runs
        process = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=subprocess.PIPE, text=True)
        error_tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
        for line in process.stderr:
            sys.stderr.write(line)
            error_tail.append(line.rstrip("\n"))
        returncode = process.wait()
        stdout.seek(0)
        output = stdout.read()

    result = BenchmarkResult(
        name=name,
        title=module.TITLE,
        description=module.DESCRIPTION,
        command=display_command,
        returncode=returncode,
        seconds=time.perf_counter() - start,
    )
    for line in output.splitlines():
        if line.startswith("{"):
            result.records.append(json.loads(line))
    if returncode != 0:
        result.error = "\n".join(error_tail)
        logger.error("%s failed with exit code %d", name, returncode)
    elif not result.records:
        result.returncode, result.error = 1, "the benchmark printed no JSON line"
        logger.error("%s printed no JSON line", name)
    return result


def run_codec_table(quick: bool) -> int:
    """Run the codec table (on CPU) in a subprocess; at full scale it rewrites its own page. Return its exit code."""
    command = [sys.executable, "-m", "benchmarks.codec_table"]
    command += ["--quick"] if quick else ["--doc", str(CODEC_DOC)]
    logger.info("running %s", " ".join(["python", *command[1:]]))
    returncode = subprocess.run(command, cwd=REPO).returncode
    if returncode != 0:
        logger.error("codec_table failed with exit code %d", returncode)
    return returncode


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = parse_args(argv)
    names = args.only or BENCHMARKS
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_average_start = round(os.getloadavg()[0], 2)
    # read before the run, because other commits may land in this checkout while it runs
    revision = git_revision(REPO)

    results = []
    for name in names:
        result = run_benchmark(name, args.quick, args.device)
        for record in result.records:
            print(json.dumps(record), flush=True)
        results.append(result)

    if args.jsonl is not None:
        args.jsonl.write_text("".join(json.dumps(record) + "\n" for result in results for record in result.records))

    command = shlex.join(["python", "-m", "benchmarks.run_all", *(argv if argv is not None else sys.argv[1:])])
    machine = {**machine_description(), "load_average_start": load_average_start}
    page = render_markdown(results, machine, command, date, revision, args.quick)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(page)
    logger.info("wrote %s", args.doc)

    failed = [result.name for result in results if result.returncode != 0]
    if args.codec_table and run_codec_table(args.quick) != 0:
        failed.append("codec_table")
    if failed:
        logger.error("failed benchmarks: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
