"""Stage two: train the masked student, from cached targets or with the teacher online.

Launch on one process with `maskdistill pretrain ...`, or on several GPUs or nodes with
`torchrun --nproc_per_node N -m cli pretrain ...` (DDP: nccl on CUDA, gloo on CPU). Only rank 0
logs to the console and writes checkpoints and metrics.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from pipeline import checkpoint as ckpt
from pipeline.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, remove_stale_temps
from pipeline.config import PretrainConfig, config_to_dict
from pipeline.data.order import batches_per_epoch
from pipeline.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    bind_device,
    destroy_process_group,
    init_process_group,
    read_torchrun_env,
    resolve_device,
)
from pipeline.engine import (
    MaskDistillModel,
    NonFiniteLossError,
    StepSettings,
    autocast_dtype_for,
    compute_loss,
    train_step,
)
from pipeline.errors import UsageError
from pipeline.folder_lock import FolderLock
from pipeline.heads import build_head
from pipeline.logs import MetricsLog, ProgressReporter, format_seconds
from pipeline.masking import MaskConfig
from pipeline.optim import Schedule, build_optimizer, fused_adamw_available, set_lr
from pipeline.output_paths import check_output_folder
from pipeline.provenance import run_environment
from pipeline.sources import count_reasons, printable_source
from pipeline.students import build_student
from pipeline.data.sample_log import SampleLog
from pipeline.data.training import TrainingData, build_training_data, order_streams
from stages.plot_runs import PLOT_NAME, plot_runs

try:
    import resource
except ImportError:  # Windows
    resource = None

logger = logging.getLogger(__name__)

VAL_STREAM = 0x56414C
SKIPPED_NAME = "skipped.json"


@dataclass
class RunState:
    step: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0
    saved_step: int | None = None  # step of the newest checkpoint in the run folder
    order_streams: int = 1  # interleaved runs of batches per epoch, fixed for the whole run


def run_pretrain(config: PretrainConfig) -> dict:
    """Train according to `config`; return a summary (steps, last loss, validation loss, run folder).

    Under torchrun every process calls this. A process group joined here is left on return and
    on error, so a failing rank exits instead of waiting for the others.
    """
    _check_config(config)
    info = read_torchrun_env()
    device = resolve_device(config.device, info)
    bind_device(device)
    joined = init_process_group(info, device)
    lock = FolderLock()
    try:
        return _run(config, info, device, lock)
    finally:
        lock.release()
        if joined:
            destroy_process_group()


def _run(config: PretrainConfig, info: DistInfo, device: torch.device, lock: FolderLock) -> dict:
    torch.manual_seed(config.seed + info.rank)

    # every argument is checked before anything is written to the run folder
    run_dir = Path(config.out)
    resume_from = _check_run_dir(run_dir, config, info)

    student = build_student(
        config.student, config.img_size, drop_path_rate=config.drop_path, overrides=config.student_overrides
    )
    mask_config = MaskConfig(*student.grid_size, ratio=config.mask_ratio, min_block=config.min_mask_block)
    data = build_training_data(config, student, mask_config, device)
    head = build_head(config.head, student, data.target_dim, depth=config.head_depth, width=config.head_width)
    model = MaskDistillModel(student, head).to(device)

    no_decay = {f"student.{name}" for name in student.no_weight_decay()}
    no_decay |= {f"head.{name}" for name in getattr(head, "no_weight_decay", lambda: set())()}
    fused = fused_adamw_available(device)
    optimizer = build_optimizer(model, 0.0, config.weight_decay, tuple(config.betas), no_decay, fused=fused)

    state = _plan_steps(config, data, info)
    schedule = _build_schedule(config, state, info)
    _write_run_files(run_dir, config, info, lock)
    if resume_from is not None:
        state.step = state.saved_step = _restore(resume_from, model, optimizer, config, info, state)

    trained = _wrap_model(model, config, device, info)
    settings = StepSettings(
        loss=config.loss,
        smooth_l1_beta=config.smooth_l1_beta,
        target_norm=config.target_norm,
        clip_grad=config.clip_grad,
        autocast_dtype=autocast_dtype_for(config.precision, device),
    )
    _log_start(config, info, model, data, schedule, state, run_dir)
    # a resumed optimizer keeps the "fused" setting of the run that saved it
    logger.info(
        "autocast: %s; AdamW: %s%s",
        "bf16" if settings.autocast_dtype is torch.bfloat16 else "off (float32)",
        "fused" if optimizer.param_groups[0].get("fused") else "per-tensor loop",
        ", model compiled with torch.compile" if config.compile else "",
    )
    summary = _train(config, info, device, trained, model, optimizer, schedule, data, settings, state, run_dir)
    barrier()
    return summary


def _check_config(config: PretrainConfig) -> None:
    if not config.out:
        raise UsageError("missing --out: pass the folder for the run's checkpoints and logs")
    online = config.teacher is not None or config.data is not None
    if config.cache is None and not online:
        raise UsageError("pass --cache CACHE, or --teacher NAME with --data PATH for the online teacher")
    if config.cache is not None and online:
        raise UsageError("--cache cannot be combined with --teacher or --data: pass either the cache or both of them")
    if online and (config.teacher is None or config.data is None):
        raise UsageError("the online teacher needs both --teacher NAME and --data PATH")
    if (config.epochs is None) == (config.steps is None):
        raise UsageError("pass exactly one of --epochs and --steps")
    for name in ("epochs", "steps", "batch_size", "checkpoint_every", "log_every"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0.0 <= config.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must lie in [0, 1), got {config.val_fraction}")
    if config.target_norm not in TARGET_NORMS:
        raise UsageError(f"--target-norm must be one of {', '.join(TARGET_NORMS)}, got {config.target_norm!r}")
    for name in ("lr", "blr"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name} must be positive, got {value}")
    if config.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {config.workers}")
    autocast_dtype_for(config.precision, torch.device("cpu"))  # raises UsageError for an invalid --precision


TARGET_NORMS = ("layernorm", "none")


def _check_run_dir(run_dir: Path, config: PretrainConfig, info: DistInfo) -> Path | None:
    """Check that `--out` is new, or that `--resume` continues the run it contains; return the checkpoint to resume."""
    check_output_folder(run_dir, "--out")
    last = run_dir / ckpt.LAST_NAME
    if last.exists() and not config.resume:
        raise UsageError(
            f"output folder {run_dir} already contains a run ({last.name}); "
            "pass --resume to continue it or choose another --out"
        )
    saved_config = run_dir / "config.yaml"
    if not last.exists() and saved_config.exists() and not config.resume and any(run_dir.glob("checkpoint-*.pt")):
        raise UsageError(f"output folder {run_dir} contains checkpoints of another run; choose another --out")
    if config.resume and saved_config.exists():
        _check_same_run(_read_saved_config(saved_config), config, saved_config)

    if config.resume and not last.exists():
        # Starting fresh is not an error, so that one command line can both start a job and resume it after a kill.
        if info.is_main:
            logger.warning("--resume: %s contains no checkpoint (%s), so training starts from step 0", run_dir, last.name)
        return None
    return last if config.resume else None


def _read_saved_config(path: Path) -> dict:
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"{path} of the run to resume is not valid YAML ({error}); choose another --out") from error
    if not isinstance(saved, dict):
        raise UsageError(f"{path} of the run to resume is not a mapping of settings; choose another --out")
    return saved


def _write_run_files(run_dir: Path, config: PretrainConfig, info: DistInfo, lock: FolderLock) -> None:
    """Create and lock the run folder, then write the resolved config, the environment and the cache manifest used.

    Only rank 0 writes the folder, so it alone holds the lock. A second command on the folder
    stops here, before it writes anything.
    """
    # every rank has read the folder before rank 0 rewrites config.yaml
    barrier()
    if info.is_main:
        lock.acquire(run_dir, "--out")
        remove_stale_temps(run_dir)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=True))
        atomic_write_json(run_dir / "environment.json", run_environment())
        if config.cache is not None:
            atomic_write_bytes(run_dir / "cache-manifest.json", (Path(config.cache) / "manifest.json").read_bytes())
    barrier()


RUN_DEFINING = ("student", "cache", "teacher", "data", "head", "img_size", "mask_ratio", "loss", "target_norm", "seed")


PATH_SETTINGS = ("cache", "data")


def _check_same_run(saved: dict, config: PretrainConfig, path: Path) -> None:
    current = config_to_dict(config)
    for name in RUN_DEFINING:
        if name in PATH_SETTINGS and saved.get(name) and current.get(name):
            # the same folder, named from another working directory or with a trailing slash
            if Path(saved[name]).resolve() == Path(current[name]).resolve():
                continue
        if saved.get(name) != current.get(name):
            raise UsageError(
                f"--resume with {name}={current.get(name)!r}, but the run in {path.parent} was started with "
                f"{name}={saved.get(name)!r}; use the same setting or another --out"
            )


def _plan_steps(config: PretrainConfig, data: TrainingData, info: DistInfo) -> RunState:
    steps_per_epoch = batches_per_epoch(len(data.train_ids), config.batch_size, info.world_size)
    # A global batch larger than the training set would make every step one short batch of it all.
    if steps_per_epoch == 0 or len(data.train_ids) < config.batch_size * info.world_size:
        raise UsageError(
            f"{len(data.train_ids)} training samples cannot fill a batch of --batch-size {config.batch_size} "
            f"on {info.world_size} processes: lower --batch-size, add data or lower --val-fraction"
        )
    total = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    return RunState(
        step=0, total_steps=total, steps_per_epoch=steps_per_epoch, order_streams=order_streams(config.workers)
    )


def _build_schedule(config: PretrainConfig, state: RunState, info: DistInfo) -> Schedule:
    global_batch = config.batch_size * info.world_size
    peak = config.lr if config.lr is not None else config.blr * global_batch / 256
    if config.warmup_steps is not None:
        warmup = config.warmup_steps
    else:
        warmup = int(round(config.warmup_epochs * state.steps_per_epoch))
    warmup = min(warmup, max(0, state.total_steps - 1))
    if peak < config.min_lr and info.is_main:
        source = "--lr" if config.lr is not None else f"--blr {config.blr:.4g} x global batch {global_batch} / 256"
        logger.warning(
            "peak learning rate %.3g (%s) is below --min-lr %.3g, so the rate stays at %.3g after warmup. "
            "Pass a larger --lr or --blr, or a smaller --min-lr", peak, source, config.min_lr, peak,
        )
    return Schedule(peak_lr=peak, min_lr=min(config.min_lr, peak), warmup_steps=warmup, total_steps=state.total_steps)


def _restore(path: Path, model, optimizer, config: PretrainConfig, info: DistInfo, state: RunState) -> int:
    """Load the weights, optimizer and RNG state of a checkpoint; return its step."""
    payload = ckpt.load_checkpoint(path)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    saved_world = payload.get("world_size", 1)
    saved_batch = payload["config"]["batch_size"] * saved_world
    if saved_batch != config.batch_size * info.world_size:
        logger.warning(
            "checkpoint was written with a global batch of %d (%d processes), resuming with %d (%d processes): "
            "the data order and step count no longer continue the run; choose --batch-size so that "
            "batch size x processes = %d to keep them",
            saved_batch, saved_world, config.batch_size * info.world_size, info.world_size, saved_batch,
        )
    elif saved_world != info.world_size:
        logger.info(
            "checkpoint was written by %d processes, resuming with %d at the same global batch of %d",
            saved_world, info.world_size, saved_batch,
        )
    rng = payload.get("rng", {}).get(info.rank)
    if rng is not None and saved_world == info.world_size:
        ckpt.set_rng_state(rng)
    # the batch order depends on the stream count, so a resumed run keeps the one it started with
    state.order_streams = int(payload.get("order_streams", order_streams(payload["config"]["workers"])))
    if state.order_streams != order_streams(config.workers):
        logger.warning(
            "the batch order of this run has %d streams (its loader workers when it started) and --workers %d "
            "differs: the order stays the same, but each worker reads the shards of several streams. "
            "Use --workers %d to read each shard slice once per epoch",
            state.order_streams, config.workers, state.order_streams,
        )
    logger.info("resumed from %s at step %d", path, payload["step"])
    return int(payload["step"])


def _wrap_model(model, config: PretrainConfig, device: torch.device, info: DistInfo):
    """Wrap the model in DDP, then compile it, so that the compiler splits graphs at DDP's gradient buckets."""
    trained = model
    if info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        # the buffers are constants (position indices, attention masks): no broadcast every step
        trained = DistributedDataParallel(trained, device_ids=device_ids, broadcast_buffers=False)
    if config.compile:
        trained = torch.compile(trained)
    return trained


def _log_start(config, info, model, data, schedule, state, run_dir) -> None:
    student_params = sum(p.numel() for p in model.student.parameters())
    head_params = sum(p.numel() for p in model.head.parameters())
    global_batch = config.batch_size * info.world_size
    logger.info("resolved config: %s", config_to_dict(config))
    logger.info(
        "student %s: %.2fM parameters, head %s: %.2fM parameters",
        config.student, student_params / 1e6, config.head, head_params / 1e6,
    )
    logger.info(
        "targets: grid %dx%d, width %d, from %s",
        *model.student.grid_size, data.target_dim, data.description,
    )
    logger.info(
        "global batch %d (%d per process x %d processes); lr %.3g (base lr %.3g per 256 images), "
        "warmup %d steps, %d steps (%d per epoch), starting at step %d",
        global_batch, config.batch_size, info.world_size, schedule.peak_lr, config.blr,
        schedule.warmup_steps, state.total_steps, state.steps_per_epoch, state.step,
    )
    logger.info("training on %d samples, validating on %d; outputs in %s", len(data.train_ids), len(data.val_ids), run_dir)


def _train(config, info, device, trained, model, optimizer, schedule, data, settings, state, run_dir) -> dict:
    # a fresh run starts at step 0, which also clears the records of a run killed before its first checkpoint
    metrics = MetricsLog(run_dir, enabled=info.is_main, start_step=state.step)
    # a bar on a terminal; elsewhere the step lines below are the progress
    progress = ProgressReporter(
        "pretrain", state.total_steps - state.step, unit="step", sample_unit="img", enabled=info.is_main,
        log_lines=False,
    )
    samples = SampleLog(run_dir, info.rank, enabled=config.log_samples, first_step=state.step)
    skipped = SkippedInputs(getattr(getattr(data.dataset, "source", None), "skipped", []))
    process = psutil.Process()
    window_loss = window_samples = 0.0
    last_loss = float("nan")
    val_loss = None
    window_start = time.monotonic()
    data_time = step_time = 0.0

    epoch = state.step // state.steps_per_epoch
    while state.step < state.total_steps:
        skip = state.step - epoch * state.steps_per_epoch
        loader = data.loader(epoch, skip, state.order_streams)
        fetch_start = time.monotonic()
        for batch in _batches(loader):
            if state.step >= state.total_steps:
                break
            skipped.add(batch)
            ready = time.monotonic()
            data_time += ready - fetch_start

            # move the batch, get targets (from the cache or the teacher), update the weights
            lr = schedule.lr_at(state.step)
            set_lr(optimizer, lr)
            images, targets, mask = data.to_device(batch, device, settings)
            trained.train()
            try:
                loss, grad_norm = train_step(trained, optimizer, images, targets, mask, settings, state.step)
            except NonFiniteLossError as error:
                raise _diverged(error, run_dir, state, lr) from error
            state.step += 1
            fetch_start = time.monotonic()
            step_time += fetch_start - ready

            # log every N steps, with the loss and image count of all ranks
            window_loss += loss * images.shape[0]
            window_samples += images.shape[0]
            samples.write(state.step, epoch, data.view_for_epoch(epoch), batch["image_index"].numpy())
            progress.advance(1, extra=f"loss {loss:.4f}", samples=images.shape[0] * info.world_size)
            if state.step % config.log_every == 0 or state.step == state.total_steps:
                last_loss, loss_mean, window_images = _global_losses(
                    loss, images.shape[0], window_loss, window_samples, device
                )
                elapsed = time.monotonic() - window_start
                record = {
                    "epoch": epoch,
                    "loss": last_loss,
                    "loss_mean": loss_mean,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "img_per_s": window_images / elapsed,
                    "img_per_s_per_device": window_images / elapsed / info.world_size,
                    "data_time": data_time,
                    "step_time": step_time,
                    "peak_memory_mb": _peak_memory_mb(device, process),
                    "eta_seconds": progress.eta_seconds(),
                }
                _log_step(state, record)
                metrics.write(state.step, record)
                window_start, window_loss, window_samples, data_time, step_time = time.monotonic(), 0.0, 0.0, 0.0, 0.0

            if state.step % config.checkpoint_every == 0 and state.step < state.total_steps:
                _save(run_dir, model, optimizer, config, info, state, numbered=True)

        if state.step % state.steps_per_epoch == 0 or state.step >= state.total_steps:
            val_loss = _validate(model, data, device, settings, skipped)
            if val_loss is not None:
                logger.info("epoch %d: validation loss %.4f", epoch, val_loss)
                metrics.write(state.step, {"epoch": epoch, "val_loss": val_loss})
        epoch += 1

    progress.close()
    _save(run_dir, model, optimizer, config, info, state, numbered=False)
    if info.is_main:
        skipped.write(run_dir)
    samples.close()
    metrics.close()
    if info.is_main:
        plot_runs([run_dir], run_dir / PLOT_NAME)
    return {
        "steps": state.step,
        "loss": last_loss,
        "val_loss": val_loss,
        "run_dir": str(run_dir),
        "skipped": skipped.count,
    }


class SkippedInputs:
    """Inputs of the online teacher that were skipped: each logged once, all listed at the end.

    NOTE: under torchrun each process sees the images of its own batches, and only rank 0
    writes its list.
    """

    def __init__(self, at_index: list[tuple[str, str]]) -> None:
        self.at_index = [(printable_source(source), reason) for source, reason in at_index]
        self.at_decode: dict[str, str] = {}

    @property
    def count(self) -> int:
        return len(self.at_index) + len(self.at_decode)

    def add(self, batch: dict) -> None:
        """Record the (source, reason) pairs in `batch["skipped"]`, logging each source the first time."""
        for source, reason in batch.get("skipped", ()):
            if source not in self.at_decode:
                self.at_decode[source] = reason
                logger.warning("skipping %s: %s", source, reason)

    def write(self, run_dir: Path) -> None:
        """Log a summary and write RUN/skipped.json, when anything was skipped."""
        entries = self.at_index + list(self.at_decode.items())
        if not entries:
            return
        atomic_write_json(run_dir / SKIPPED_NAME, [{"source": source, "reason": reason} for source, reason in entries])
        logger.warning("skipped %d inputs (%s); %s lists them", len(entries), count_reasons(entries), run_dir / SKIPPED_NAME)


def _batches(loader):
    """Iterate `loader`, re-raising a user error from a worker process with only its own message.

    The DataLoader re-raises a worker's exception with the worker's traceback as its message.
    """
    try:
        yield from loader
    except UsageError as error:
        message = str(error)
        if "Original Traceback" not in message:
            raise
        last_line = message.strip().splitlines()[-1]
        prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
        raise type(error)(last_line.removeprefix(prefix)) from error


def _diverged(error: NonFiniteLossError, run_dir: Path, state: RunState, lr: float) -> NonFiniteLossError:
    """Add the kept checkpoint and what to try next to the message of a non-finite step."""
    if state.saved_step is None:
        kept = "no checkpoint was written yet"
    else:
        kept = f"{run_dir / ckpt.LAST_NAME} keeps the last good weights (step {state.saved_step})"
    return NonFiniteLossError(
        f"{error}; {kept}. Lower the learning rate (now {lr:.3g}; --lr or --blr) or --clip-grad, or check the targets",
        error.step,
    )


def _log_step(state: RunState, record: dict) -> None:
    wait_share = record["data_time"] / max(record["data_time"] + record["step_time"], 1e-9)
    logger.info(
        "step %d/%d  loss %.4f (mean %.4f)  %.1f img/s (%.1f per device)  data wait %.0f%%  lr %.3g  "
        "peak mem %.0f MB  ETA %s",
        state.step, state.total_steps, record["loss"], record["loss_mean"], record["img_per_s"],
        record["img_per_s_per_device"], 100 * wait_share, record["lr"], record["peak_memory_mb"],
        format_seconds(record["eta_seconds"]),
    )


def _global_losses(
    loss: float, batch_size: int, window_loss: float, window_samples: float, device: torch.device
) -> tuple[float, float, int]:
    """Return the loss of the last global batch, the mean loss over the log window, and its image count.

    `loss` and `batch_size` are this rank's last step; `window_loss` sums loss x batch size over
    the window. Every image has the same number of masked patches, so the sample-weighted mean
    of the ranks' losses is the loss that one process computes on the whole global batch.
    """
    sums = torch.tensor([loss * batch_size, batch_size, window_loss, window_samples], dtype=torch.float64, device=device)
    last_sum, last_count, window_sum, window_count = all_reduce_sum(sums).tolist()
    return last_sum / last_count, window_sum / window_count, int(window_count)


def _peak_memory_mb(device: torch.device, process: psutil.Process) -> float:
    """Return the peak memory in MiB: of tensors on a CUDA device, else of this process (max RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if resource is None:
        # NOTE: Windows has no getrusage, so there the figure is the current RSS, not the peak
        return process.memory_info().rss / 2**20
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports ru_maxrss in KiB, macOS in bytes
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 2**10


@torch.no_grad()
def _validate(model, data, device, settings, skipped: SkippedInputs | None = None) -> float | None:
    """Mean validation loss over all ranks; inputs skipped by the loader go to `skipped`.

    `model` is the unwrapped module: a DDP forward could start a collective, and ranks may hold
    different numbers of validation batches.
    """
    if len(data.val_ids) == 0:
        return None
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for batch in _batches(data.val_loader()):
        if skipped is not None:
            skipped.add(batch)
        images, targets, mask = data.to_device(batch, device, settings)
        loss = compute_loss(model, images, targets, mask, settings)
        total += loss * images.shape[0]
        count += images.shape[0]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    model.train()
    return (total / count.clamp(min=1)).item()


def _save(run_dir: Path, model, optimizer, config, info: DistInfo, state: RunState, numbered: bool) -> None:
    """Write RUN/checkpoint-last.pt, and with `numbered` a copy named by the step, from rank 0.

    Every rank checks that the weights are finite, so all of them stop together when they are not.
    """
    rng_states = _gather_rng(info)
    path = run_dir / ckpt.LAST_NAME
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": state.step,
        "epoch": state.step // state.steps_per_epoch,
        "world_size": info.world_size,
        "order_streams": state.order_streams,
        "rng": rng_states,
        "config": config_to_dict(config),
    }
    ckpt.check_finite(payload, path)
    if info.is_main:
        copies = (run_dir / f"checkpoint-{state.step:08d}.pt",) if numbered else ()
        ckpt.save_checkpoint(path, payload, copies)
    state.saved_step = state.step


def _gather_rng(info: DistInfo) -> dict:
    state = ckpt.rng_state()
    if not info.enabled:
        return {0: state}
    gathered = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, state)
    return dict(enumerate(gathered))
