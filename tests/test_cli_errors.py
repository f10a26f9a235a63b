"""Bad arguments through the real command line: one line naming the value and the fix, exit code 2."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.tiny_clip import tiny_overrides
from helpers.tiny_runs import (
    IMG_SIZE,
    REPO,
    STUDENT,
    TEACHER,
    copy_photos,
    run_cli,
    subprocess_env,
    tiny_cache_config,
    write_teacher_checkpoint,
)

from pipeline.config import PretrainConfig
from pipeline.students import STUDENTS
from pipeline.teachers.registry import TEACHERS
from stages.cache_targets import run_cache_targets
from stages.pretrain import run_pretrain

STUDENT_OVERRIDES = {"embed_dim": 64, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-errors")


@pytest.fixture(scope="module")
def teacher_file(work: Path) -> Path:
    return write_teacher_checkpoint(work)


@pytest.fixture(scope="module")
def photos(work: Path) -> Path:
    return copy_photos(work / "photos", 8)


@pytest.fixture(scope="module")
def cache(work: Path, photos: Path, teacher_file: Path) -> Path:
    out = work / "cache"
    run_cache_targets(tiny_cache_config(photos, out, teacher_file, views=1, fidelity_views=2))
    return out


@pytest.fixture(scope="module")
def finished_run(work: Path, cache: Path) -> Path:
    """Return the folder of a finished 1-step run, with its checkpoint and metrics."""
    run_dir = work / "finished-run"
    run_pretrain(
        PretrainConfig(out=str(run_dir), cache=str(cache), student=STUDENT, student_overrides=STUDENT_OVERRIDES,
                       img_size=IMG_SIZE, steps=1, batch_size=2, log_every=1, workers=0, device="cpu")
    )
    return run_dir


@pytest.fixture(scope="module")
def preset(work: Path) -> Path:
    """Return a preset with tiny models and CPU settings for both stages; each test adds paths and the faulty option."""
    path = work / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "cache_targets": {"teacher_overrides": tiny_overrides(), "img_size": IMG_SIZE, "workers": 0,
                                  "device": "cpu", "batch_size": 8, "shard_size": 4, "fidelity_views": 2},
                "pretrain": {"student_overrides": STUDENT_OVERRIDES, "teacher_overrides": tiny_overrides(),
                             "img_size": IMG_SIZE, "steps": 1,
                             "batch_size": 2, "workers": 0, "device": "cpu", "student": STUDENT},
            }
        )
    )
    return path


def run_offline(arguments: list[str], home: Path) -> subprocess.CompletedProcess:
    """Run `python -m cli ARGUMENTS` offline, with an empty Hugging Face cache under `home`."""
    return run_cli(arguments, env=subprocess_env(HF_HOME=str(home / "hf-home")))


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Check exit code 2 and a single `error:` line on stderr that contains every fragment."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[-1]
    return lines[-1]


def cache_targets_arguments(preset: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["cache-targets", "--config", str(preset), "--data", str(data), "--out", str(out), *extra]


def pretrain_arguments(preset: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(preset), "--cache", str(cache), "--out", str(out), *extra]


# Names


def test_unknown_teacher_lists_valid(tmp_path: Path, preset: Path, photos: Path):
    arguments = cache_targets_arguments(preset, photos, tmp_path / "cache", "--teacher", "clip_vit_tiny")
    result = run_offline(arguments, tmp_path)

    line = assert_one_line_error(result, "unknown teacher 'clip_vit_tiny'")
    for name in TEACHERS:
        assert name in line
    assert not (tmp_path / "cache").exists()


def test_unknown_student_lists_valid(tmp_path: Path, preset: Path, cache: Path):
    result = run_offline(pretrain_arguments(preset, cache, tmp_path / "run", "--student", "vit_gigantic"), tmp_path)

    line = assert_one_line_error(result, "unknown student 'vit_gigantic'")
    for name in STUDENTS:
        assert name in line
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_named(tmp_path: Path, cache: Path):
    preset = tmp_path / "typo.yaml"
    preset.write_text(yaml.safe_dump({"pretrain": {"steps": 1, "mask_ration": 0.5}}))

    result = run_offline(pretrain_arguments(preset, cache, tmp_path / "run"), tmp_path)

    line = assert_one_line_error(result, "unknown key 'mask_ration'", str(preset))
    assert "mask_ratio" in line


# Inputs and outputs


def test_missing_data_folder(tmp_path: Path, preset: Path):
    missing = tmp_path / "no-such-folder"
    result = run_offline(cache_targets_arguments(preset, missing, tmp_path / "cache"), tmp_path)

    assert_one_line_error(result, f"input path not found: {missing}")


def test_folder_without_images(tmp_path: Path, preset: Path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no pictures here\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")

    result = run_offline(cache_targets_arguments(preset, folder, tmp_path / "cache"), tmp_path)

    assert_one_line_error(result, f"no images found under {folder}", "2 entries skipped")


def test_online_folder_without_images(tmp_path: Path, preset: Path, teacher_file: Path):
    folder = tmp_path / "empty"
    folder.mkdir()
    arguments = ["pretrain", "--config", str(preset), "--teacher", TEACHER, "--teacher-weights", str(teacher_file),
                 "--data", str(folder), "--out", str(tmp_path / "run")]

    result = run_offline(arguments, tmp_path)

    assert_one_line_error(result, f"no images found under {folder}")
    assert not (tmp_path / "run").exists()


def test_cache_not_fitting_student(tmp_path: Path, preset: Path, cache: Path):
    result = run_offline(pretrain_arguments(preset, cache, tmp_path / "run", "--img-size", "128"), tmp_path)

    assert_one_line_error(result, "6x6 target grid", "8x8 grid", f"--img-size {IMG_SIZE}")
    assert not (tmp_path / "run").exists()


def test_cache_folder_with_other_settings(tmp_path: Path, preset: Path, photos: Path, teacher_file: Path, cache: Path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    arguments = cache_targets_arguments(
        preset, photos, copy, "--teacher", TEACHER, "--teacher-weights", str(teacher_file), "--seed", "7"
    )

    result = run_offline(arguments, tmp_path)

    assert_one_line_error(result, "seed = 0", "seed = 7", "use another cache folder")


def test_out_folder_with_run_needs_resume(tmp_path: Path, preset: Path, cache: Path):
    run_dir = tmp_path / "run"
    run_pretrain(
        PretrainConfig(out=str(run_dir), cache=str(cache), student=STUDENT, student_overrides=STUDENT_OVERRIDES,
                       img_size=IMG_SIZE, steps=1, batch_size=2, workers=0, device="cpu")
    )
    before = (run_dir / "checkpoint-last.pt").read_bytes()

    fresh = run_offline(pretrain_arguments(preset, cache, run_dir), tmp_path)
    other = run_offline(pretrain_arguments(preset, cache, run_dir, "--resume", "--seed", "3"), tmp_path)

    assert_one_line_error(fresh, f"output folder {run_dir} already contains a run", "--resume", "another --out")
    assert_one_line_error(other, "--resume with seed=3", "started with seed=0", "another --out")
    assert (run_dir / "checkpoint-last.pt").read_bytes() == before


OUTPUT_COMMANDS = ["cache-targets", "pretrain", "extract-student", "inspect", "plot"]


def output_arguments(command: str, output: Path, preset: Path, photos: Path, cache: Path, run_dir: Path) -> list[str]:
    """Return the arguments of a `command` run that would write to `output`."""
    if command == "cache-targets":
        return cache_targets_arguments(preset, photos, output)
    if command == "pretrain":
        return pretrain_arguments(preset, cache, output)
    if command == "extract-student":
        return ["extract-student", str(run_dir / "checkpoint-last.pt"), "-o", str(output)]
    if command == "inspect":
        return ["inspect", str(cache), "--show", "2", "-o", str(output)]
    return ["plot", str(run_dir), "-o", str(output)]


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_output_below_file_one_line(
    tmp_path: Path, preset: Path, photos: Path, cache: Path, finished_run: Path, command: str
):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    output = blocker / "outputs" / "result.png"

    result = run_offline(output_arguments(command, output, preset, photos, cache, finished_run), tmp_path)

    option = "--out" if command in ("cache-targets", "pretrain") else "--output"
    assert_one_line_error(result, f"{option} {output} cannot be created", f"{blocker} is a file")
    assert blocker.read_text() == "a file, not a folder\n"


# Values


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--show", "0"], "--show must be at least 1, got 0"),
        (["--show", "2", "--view", "3"], "--view 3 is out of range"),
        (["--show", "2", "--mask-ratio", "1.5"], "--mask-ratio must lie strictly between 0 and 1"),
        (["--show", "2", "--min-mask-block", "0"], "--min-mask-block must be at least 1 patch"),
        (["--show", "2", "--project-images", "0"], "--project-images must be at least 1"),
    ],
    ids=["show", "view", "mask-ratio", "min-mask-block", "project-images"],
)
def test_inspect_bad_show_prints_nothing(tmp_path: Path, cache: Path, extra: list[str], fragment: str):
    picture = tmp_path / "samples.png"
    result = run_offline(["inspect", str(cache), "-o", str(picture), *extra], tmp_path)

    assert_one_line_error(result, fragment)
    assert result.stdout == ""
    assert not picture.exists()


def test_inspect_bad_output_prints_nothing(tmp_path: Path, cache: Path):
    result = run_offline(["inspect", str(cache), "--show", "2", "-o", str(tmp_path / "samples.txt")], tmp_path)

    assert_one_line_error(result, f"cannot write a figure to {tmp_path / 'samples.txt'}", ".png")
    assert result.stdout == ""


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_mask_ratio_outside_open_interval(tmp_path: Path, preset: Path, cache: Path, ratio: str):
    result = run_offline(pretrain_arguments(preset, cache, tmp_path / "run", "--mask-ratio", ratio), tmp_path)

    assert_one_line_error(result, "--mask-ratio must lie strictly between 0 and 1", f"got {float(ratio)}")
    assert not (tmp_path / "run").exists()


def test_batch_larger_than_data(tmp_path: Path, preset: Path, cache: Path):
    result = run_offline(pretrain_arguments(preset, cache, tmp_path / "run", "--batch-size", "64"), tmp_path)

    assert_one_line_error(result, "training samples cannot fill a batch", "--batch-size 64")
    assert not (tmp_path / "run").exists()


def test_zero_steps_rejected(tmp_path: Path, preset: Path, cache: Path):
    result = run_offline(pretrain_arguments(preset, cache, tmp_path / "run", "--steps", "0"), tmp_path)

    assert_one_line_error(result, "--steps must be at least 1, got 0")


@pytest.mark.parametrize("command", ["cache-targets", "pretrain"])
def test_unknown_device_one_line(tmp_path: Path, preset: Path, photos: Path, cache: Path, command: str):
    if command == "cache-targets":
        arguments = cache_targets_arguments(preset, photos, tmp_path / "out", "--device", "gpu")
    else:
        arguments = pretrain_arguments(preset, cache, tmp_path / "out", "--device", "gpu")

    result = run_offline(arguments, tmp_path)

    assert_one_line_error(result, "invalid --device 'gpu'", "auto, cpu, cuda or cuda:N")
    assert not (tmp_path / "out").exists()


def test_cuda_device_without_cuda(tmp_path: Path, preset: Path, cache: Path):
    arguments = pretrain_arguments(preset, cache, tmp_path / "run", "--device", "cuda")
    # an empty CUDA_VISIBLE_DEVICES hides every GPU, so this also holds on a machine with one
    env = subprocess_env(HF_HOME=str(tmp_path / "hf-home"), CUDA_VISIBLE_DEVICES="")

    result = run_cli(arguments, env=env)

    assert_one_line_error(result, "--device cuda", "CUDA is not available", "--device cpu", "--device auto")
    assert not (tmp_path / "run").exists()


def test_published_weights_offline_names_option(tmp_path: Path, preset: Path, photos: Path):
    result = run_offline(cache_targets_arguments(preset, photos, tmp_path / "cache", "--teacher", TEACHER), tmp_path)

    assert_one_line_error(result, "could not fetch the published weights", TEACHER, "--teacher-weights")


@pytest.mark.parametrize("codec", ["FP16", "pca-0", "int8"])
def test_invalid_codec_before_teacher(tmp_path: Path, preset: Path, photos: Path, codec: str):
    # Offline, building the teacher from its published weights fails, so only a check of
    # --codec before the teacher is built can name the codec.
    arguments = cache_targets_arguments(preset, photos, tmp_path / "cache", "--teacher", TEACHER, "--codec", codec)

    result = run_offline(arguments, tmp_path)

    assert_one_line_error(result, codec)
    assert "published weights" not in result.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", ["cache-targets", "pretrain"])
def test_ctrl_c_says_how_to_continue(tmp_path: Path, preset: Path, photos: Path, teacher_file: Path, cache: Path, command: str):
    out = tmp_path / "out"
    if command == "cache-targets":
        # one image per shard, so the run lasts long enough to be interrupted
        arguments = cache_targets_arguments(
            preset, photos, out, "--teacher", TEACHER, "--teacher-weights", str(teacher_file), "--shard-size", "1",
            "--views", "64",
        )
        started = out / "manifest.json"
        hint = "run the same command again"
    else:
        arguments = pretrain_arguments(preset, cache, out, "--steps", "100000", "--log-every", "1")
        started = out / "metrics.jsonl"
        hint = "--resume"
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", *arguments], cwd=REPO, env=subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not started.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.poll() is None, process.stderr.read()[-3000:]
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
        process.wait()

    # a warning printed at interpreter exit may follow the line, so it need not be the last one
    assert process.returncode == 130
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert hint in lines[0]
    assert str(out) in lines[0]
    assert "Traceback" not in stderr


def test_debug_shows_traceback(tmp_path: Path, preset: Path, cache: Path):
    arguments = ["--debug", *pretrain_arguments(preset, cache, tmp_path / "run", "--mask-ratio", "2")]
    result = run_offline(arguments, tmp_path)

    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "UsageError" in result.stderr
