"""Per-rank record of the samples each training step used (`--log-samples`), for auditing.

Every process appends one JSON line per step to `RUN/samples/rank<r>.jsonl`:

    {"step": 7, "epoch": 1, "view": 1, "rank": 0, "image_index": [12, 3, ...]}

`step` counts optimizer steps from 1, as in `metrics.jsonl`. A resumed run first drops the lines
of steps after its checkpoint, so each step appears once per rank even after a crash.
Each rank writes its own file, the one exception to "only rank 0 writes to the run folder".
`read_sample_log` joins the files of all ranks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import IO

import numpy as np

from pipeline.atomic import atomic_write_text

logger = logging.getLogger(__name__)

FOLDER = "samples"


def sample_log_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / FOLDER / f"rank{rank}.jsonl"


class SampleLog:
    """Appends the image indices of each step of one rank; does nothing when disabled.

    `first_step` is the number of steps already taken: the resumed step, or 0. Records of later
    steps in an existing file are dropped, because the run repeats those steps.
    """

    def __init__(self, run_dir: Path, rank: int, enabled: bool, first_step: int = 0) -> None:
        self.rank = rank
        self.path = sample_log_path(run_dir, rank)
        self._stream: IO[str] | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _drop_steps_after(self.path, first_step)
        self._stream = self.path.open("a")

    def write(self, step: int, epoch: int, view: int, image_index: np.ndarray) -> None:
        """Record the samples of `step`; `image_index` is int [B], in batch order."""
        if self._stream is None:
            return
        record = {
            "step": step,
            "epoch": epoch,
            "view": view,
            "rank": self.rank,
            "image_index": [int(i) for i in image_index],
        }
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _drop_steps_after(path: Path, step: int) -> None:
    """Rewrite `path` without the records of steps after `step`, which the resumed run repeats."""
    lines = path.read_text().splitlines()
    remaining = [line for line in lines if line and json.loads(line)["step"] <= step]
    if len(remaining) < len(lines):
        logger.info("dropping %d records after step %d from %s", len(lines) - len(remaining), step, path)
        atomic_write_text(path, "".join(line + "\n" for line in remaining))


def read_sample_log(run_dir: Path) -> list[dict]:
    """Return the records of every rank of a run, sorted by step, then rank."""
    files = sorted((Path(run_dir) / FOLDER).glob("rank*.jsonl"))
    records = [json.loads(line) for path in files for line in path.read_text().splitlines() if line]
    return sorted(records, key=lambda record: (record["step"], record["rank"]))
