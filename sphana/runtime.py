"""The shared training runtime: every component trains through :func:`fit`.

What it gives a component, which only supplies a model, its examples and a loss:

- a deterministic data order (epoch ``e`` is shuffled by ``Random(seed + e)``, independent of
  history) and seeded torch RNG, so the same data, params and seed give the same bytes;
- checkpoints every ``runtime.checkpoint_every_steps`` steps and at every epoch end, written
  atomically to ``<paths.checkpoints>/<component>/step-NNNNNNN/`` (outside DVC's outputs, so a
  killed run's checkpoints survive the rerun) with a ``SHA256SUMS`` file; ``runtime.resume=auto``
  continues from the newest valid one whose config and data fingerprint match;
- DDP when launched by ``torchrun`` with ``runtime.ddp=true`` (gloo on CPU, nccl on GPU): every
  rank takes its share of each global batch and only rank 0 writes; on resume rank 0 picks the
  checkpoint and every rank loads it (with rank 0's RNG state: a resumed multi-process run is
  not bit-identical to an uninterrupted one, a single-process run is);
- autocast in ``runtime.precision`` (bf16 on CPU or GPU, fp16 on GPU with a grad scaler);
- DVCLive step metrics (loss, learning rate, samples/s, epoch time, memory) for ``dvc plots``,
  a rich progress bar on a terminal, optional PyTorch profiler traces;
- quality gates (:func:`check_gate`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sphana.config import PathsConfig, Precision, Resume, RuntimeConfig
from sphana.errors import ConfigError, GateError
from sphana.io import atomic_dir, sha256_file, write_json_atomic

CHECKPOINT_PREFIX = "step-"
SUMS_FILE = "SHA256SUMS"
BEST_DIR = "best"  # weights of the best epoch so far (Job.select_metric), beside the checkpoints


def log(message: str) -> None:
    """Runtime messages go to stderr (rank 0 only), so stage output stays readable."""
    if rank() == 0:
        print(f"[runtime] {message}", file=sys.stderr, flush=True)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Job:
    """What a component hands the runtime."""

    name: str  # component name: checkpoint directory, progress label, metric prefix
    model: nn.Module
    examples: list[Any]  # training examples, in a fixed order
    loss: Callable[[nn.Module, list[Any], torch.device], torch.Tensor]  # mean loss of one batch
    batch_size: int  # global batch (split across DDP ranks)
    epochs: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    grad_clip: float
    fingerprint: dict[str, Any]  # params that define the run; a change starts fresh
    data_files: list[Path] = field(default_factory=list)  # their bytes are fingerprinted too
    min_batch: int = 1  # examples each rank needs per batch (2 for in-batch negatives); a
    # last partial batch smaller than min_batch x world size is skipped by every rank
    # Validation at every epoch end (rank 0): with ``select_metric`` the weights of the best epoch
    # (highest value) are what fit returns, and with ``patience`` > 0 training stops after that
    # many epochs without improvement (early stopping).
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    select_metric: str | None = None
    patience: int = 0

    @classmethod
    def for_component(cls, name: str, cfg: Any, ignore: tuple[str, ...] = (), **fields: Any) -> Job:
        """A job for component ``name`` whose optimisation settings are the same-named fields of
        its config ``cfg`` (``batch_size``, ``epochs``, ``lr``, ``weight_decay``,
        ``warmup_ratio``, ``grad_clip``, ``patience``) and whose fingerprint is every field of
        ``cfg`` but ``version`` and ``ignore`` (the ones that do not change training)."""
        from sphana.config import to_plain

        settings = ("batch_size", "epochs", "lr", "weight_decay", "warmup_ratio", "grad_clip")
        return cls(
            name=name,
            **{k: getattr(cfg, k) for k in settings},
            patience=getattr(cfg, "patience", 0),
            fingerprint={k: v for k, v in to_plain(cfg).items() if k not in ("version", *ignore)},
            **fields,
        )


@dataclass
class FitResult:
    model: nn.Module  # unwrapped, on the training device, in eval mode
    steps: int
    samples: int
    seconds: float
    resumed_from: int | None  # step of the checkpoint the run continued from
    checkpoint_seconds: float  # wall time spent writing checkpoints
    history: list[dict[str, float]]
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # per epoch, with "epoch"
    best_epoch: int | None = None  # epoch whose weights were returned (select_metric)
    stopped_early: bool = False


# --- device, precision, distributed --------------------------------------------------------------


def setup(runtime: RuntimeConfig) -> torch.device:
    """Seed, determinism, threads, device and (under torchrun) the process group."""
    if world_size() > 1 and not runtime.ddp:
        raise ConfigError(
            "launched by torchrun with WORLD_SIZE>1 but runtime.ddp=false; set runtime.ddp=true"
        )
    use_cuda = runtime.device.value == "cuda" or (
        runtime.device.value == "auto" and torch.cuda.is_available()
    )
    if runtime.device.value == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda but no CUDA device is visible; use auto or cpu")
    if runtime.precision == Precision.fp16 and not use_cuda:
        raise ConfigError(
            "runtime.precision=fp16 needs a CUDA device (grad scaling on GPU); "
            "use bf16 or fp32 on CPU"
        )
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if runtime.ddp and world_size() > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    random.seed(runtime.seed)
    np.random.seed(runtime.seed)
    torch.manual_seed(runtime.seed)
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    torch.use_deterministic_algorithms(runtime.deterministic, warn_only=True)
    if use_cuda and runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return device


def autocast(runtime: RuntimeConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if runtime.precision == Precision.fp32:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if runtime.precision == Precision.bf16 else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --- checkpoints ---------------------------------------------------------------------------------


def data_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def architecture(model: nn.Module) -> str:
    """A digest of the model's parameter names and shapes: a checkpoint of another architecture
    (the code changed) is never resumed."""
    spec = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every shared tensor once (tied input/output embeddings): safetensors
    refuses aliases. :func:`_load_weights` restores the ties."""
    seen: set[int] = set()
    weights = {}
    for name, value in model.state_dict().items():
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            weights[name] = value.detach().cpu().contiguous()
    return weights


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load what :func:`_weights` saved: an alias reads the tensor saved under its first name."""
    first: dict[int, str] = {}
    state = model.state_dict()
    for name, value in state.items():
        first.setdefault(value.data_ptr(), name)
    model.load_state_dict({name: weights[first[v.data_ptr()]] for name, v in state.items()})


def _write_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer,
    scheduler,
    scaler,
    state: dict[str, Any],
) -> Path:
    from safetensors.torch import save_file

    final = directory / f"{CHECKPOINT_PREFIX}{step:07d}"
    with atomic_dir(final) as tmp:
        save_file(_weights(model), str(tmp / "model.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
            },
            tmp / "optimizer.pt",
        )
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        write_json_atomic(tmp / "state.json", state)
        sums = "".join(f"{sha256_file(p)}  {p.name}\n" for p in sorted(tmp.iterdir()))
        (tmp / SUMS_FILE).write_text(sums, encoding="utf-8")
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    return final


def _write_best(directory: Path, model: nn.Module) -> str:
    """Save the weights of the best epoch so far; returns their sha256."""
    from safetensors.torch import save_file

    with atomic_dir(directory / BEST_DIR) as tmp:
        save_file(_weights(model), str(tmp / "model.safetensors"))
    return sha256_file(directory / BEST_DIR / "model.safetensors")


def _check_sums(path: Path) -> str | None:
    """Why the checkpoint at ``path`` is unusable, or None when every file matches its sha256."""
    sums = path / SUMS_FILE
    if not sums.is_file():
        return f"no {SUMS_FILE}"
    expected = {}
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        expected[name] = digest
    for name in ("model.safetensors", "optimizer.pt", "rng.safetensors", "state.json"):
        if name not in expected or not (path / name).is_file():
            return f"{name} missing"
        if sha256_file(path / name) != expected[name]:
            return f"{name} does not match its sha256 (truncated or corrupt)"
    return None


def checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
    )


def _prune(directory: Path, keep: int) -> None:
    for old in checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def clear_checkpoints(directory: Path, name: str) -> None:
    """Remove a component's checkpoints once its finished model is written."""
    if rank() == 0:
        shutil.rmtree(directory / name, ignore_errors=True)


def _diff_keys(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in _diff_keys(saved.get(k), current.get(k), f"{prefix}{k}.")]
    return [] if saved == current else [prefix.rstrip(".")]


def load_latest(directory: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The newest valid checkpoint matching ``fingerprint``, loaded; None to start fresh.

    A checkpoint whose files do not match their sha256, or whose ``optimizer.pt`` is not a plain
    weights-only file (a pickle payload), is skipped with a warning, and the previous one tried.
    """
    for path in reversed(checkpoints(directory)):
        problem = _check_sums(path)
        if problem:
            log(f"warning: skipping checkpoint {path}: {problem}")
            continue
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        changed = _diff_keys(state.get("fingerprint"), fingerprint)
        if changed:
            log(
                f"starting fresh: checkpoint {path.name} was made with different "
                f"{', '.join(changed[:5])}"
            )
            return None
        best = state.get("best")
        best_file = directory / BEST_DIR / "model.safetensors"
        if best and not (best_file.is_file() and sha256_file(best_file) == best["sha256"]):
            log(f"warning: skipping checkpoint {path}: best-epoch weights missing or altered")
            continue
        try:
            return load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any refusal means "unusable"
            log(
                f"warning: refusing checkpoint {path}: optimizer.pt is not a weights-only file "
                f"({type(e).__name__})"
            )
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint directory; tensors only (safetensors, ``weights_only`` torch.load)."""
    from safetensors.torch import load_file

    return {
        "path": path,
        "state": json.loads((path / "state.json").read_text(encoding="utf-8")),
        "optim": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "model": load_file(str(path / "model.safetensors")),
        "rng": load_file(str(path / "rng.safetensors")),
    }


# --- the loop ------------------------------------------------------------------------------------


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


def _is_tty() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextlib.contextmanager
def _profiler(steps: int, trace_dir: Path) -> Iterator[Any]:
    if steps <= 0 or rank() != 0:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    trace_dir.mkdir(parents=True, exist_ok=True)

    def on_ready(prof: Any) -> None:
        prof.export_chrome_trace(str(trace_dir / "trace.json"))

    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
        on_trace_ready=on_ready,
    ) as prof:
        yield prof


def fit_stage(
    job: Job, runtime: RuntimeConfig, device: torch.device, paths: PathsConfig
) -> FitResult:
    """:func:`fit` in the pipeline's directories: checkpoints under ``paths.checkpoints``, the
    live log in ``paths.live/train_<job.name>``, profiles under ``paths.profiles``."""
    live = Path(paths.live) / f"train_{job.name}"
    return fit(job, runtime, device, Path(paths.checkpoints), live, Path(paths.profiles))


def fit(
    job: Job,
    runtime: RuntimeConfig,
    device: torch.device,
    checkpoint_dir: Path,
    live_dir: Path,
    profile_dir: Path,
) -> FitResult:
    """Train ``job.model`` for ``job.epochs`` epochs; resumable, distributed, logged."""
    from transformers import get_linear_schedule_with_warmup

    model = job.model.to(device)
    world, me = world_size(), rank()
    fingerprint = {
        "job": job.fingerprint,
        "seed": runtime.seed,
        "precision": runtime.precision.value,
        "device": device.type,
        "deterministic": runtime.deterministic,
        "world_size": world,
        "data": data_fingerprint(job.data_files),
        "model": architecture(model),
    }
    if job.batch_size < job.min_batch * world:
        raise ConfigError(
            f"{job.name}.batch_size={job.batch_size} is too small: every one of the {world} "
            f"process(es) needs at least {job.min_batch} examples per batch"
        )
    batches_per_epoch = usable_batches(len(job.examples), job.batch_size, job.min_batch * world)
    if batches_per_epoch == 0:
        raise ConfigError(f"{job.name}: {len(job.examples)} examples make no training batch")
    total_steps = batches_per_epoch * job.epochs
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": job.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=job.lr,
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(job.warmup_ratio * total_steps), total_steps
    )
    scaler = torch.amp.GradScaler("cuda") if runtime.precision == Precision.fp16 else None

    step, history, resumed_from = 0, [], None
    evaluations: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None  # {"epoch", "value", "sha256"}
    stopped = False
    ckpt_dir = checkpoint_dir / job.name
    if runtime.resume == Resume.auto:
        loaded = _agree_on_checkpoint(ckpt_dir, fingerprint)
        if loaded is not None:
            _load_weights(model, loaded["model"])
            optimizer.load_state_dict(loaded["optim"]["optimizer"])
            scheduler.load_state_dict(loaded["optim"]["scheduler"])
            if scaler is not None and loaded["optim"]["scaler"] is not None:
                scaler.load_state_dict(loaded["optim"]["scaler"])
            torch.set_rng_state(loaded["rng"]["torch"])
            if "cuda" in loaded["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state(loaded["rng"]["cuda"])
            step = resumed_from = loaded["state"]["step"]
            history = loaded["state"]["history"]
            evaluations = loaded["state"].get("evaluations", [])
            best, stopped = loaded["state"].get("best"), loaded["state"].get("stopped", False)
            log(f"resumed from checkpoint {loaded['path']} (step {step} of {total_steps})")
    elif checkpoints(ckpt_dir):
        log("runtime.resume=never: ignoring existing checkpoints, starting fresh")
    if resumed_from is None and me == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()  # nobody reads checkpoints rank 0 may be deleting

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    live = _live(live_dir, history, evaluations) if me == 0 else None
    every = runtime.checkpoint_every_steps
    samples, loop_start, checkpoint_seconds = 0, time.perf_counter(), 0.0

    def save(epoch: int, batch_index: int) -> None:
        nonlocal checkpoint_seconds
        if me != 0:
            return
        start = time.perf_counter()
        state = {
            "step": step,
            "epoch": epoch,
            "batch": batch_index,
            "fingerprint": fingerprint,
            "history": history,
            "evaluations": evaluations,
            "best": best,
            "stopped": stopped,
        }
        _write_checkpoint(ckpt_dir, step, model, optimizer, scheduler, scaler, state)
        _prune(ckpt_dir, runtime.keep_checkpoints)
        checkpoint_seconds += time.perf_counter() - start

    with (
        _progress(_is_tty() and me == 0) as progress,
        _profiler(runtime.profile_steps, profile_dir / job.name) as prof,
    ):
        task = progress.add_task(job.name, total=total_steps, completed=step)
        for epoch in range(step // batches_per_epoch, job.epochs if not stopped else 0):
            train_model.train()
            epoch_start, epoch_samples = time.perf_counter(), 0
            batches = epoch_batches(len(job.examples), job.batch_size, runtime.seed, epoch)
            for b in range(step - epoch * batches_per_epoch, batches_per_epoch):
                local = [job.examples[i] for i in batches[b][me::world]]
                step_start = time.perf_counter()
                loss_value = _train_step(
                    job, train_model, local, device, runtime, optimizer, scheduler, scaler
                )
                step += 1
                n = len(batches[b])
                samples += n
                epoch_samples += n
                seconds = time.perf_counter() - step_start
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": round(n / seconds, 2) if seconds else 0.0,
                }
                history.append(record)
                if live is not None:
                    _log_step(live, record)
                progress.update(
                    task, advance=1, description=f"{job.name} epoch {epoch} loss {loss_value:.4f}"
                )
                if prof is not None:
                    prof.step()
                if every and step % every == 0 and b + 1 < batches_per_epoch:
                    save(epoch, b + 1)
            epoch_seconds = time.perf_counter() - epoch_start
            history[-1].update(
                epoch_seconds=round(epoch_seconds, 3), memory_mb=round(_memory_mb(device), 1)
            )
            if live is not None:
                live.log_metric("train/epoch_seconds", epoch_seconds, plot=False)
                live.log_metric("train/memory_mb", _memory_mb(device), plot=False)
            if job.evaluate is not None:
                best, stopped = _evaluate_epoch(
                    job, model, epoch, step, evaluations, best, ckpt_dir
                )
                if live is not None:
                    _log_evaluation(live, evaluations[-1])
            save(epoch + 1, 0)
            if stopped:
                log(
                    f"early stop after epoch {epoch}: {job.select_metric} has not improved for "
                    f"{job.patience} epoch(s); keeping epoch {best['epoch']}"
                )
                break
    seconds = time.perf_counter() - loop_start
    if live is not None:
        live.log_metric("train/samples_per_s", samples / seconds if seconds else 0.0, plot=False)
        live.end()
    if best is not None and me == 0:
        from safetensors.torch import load_file

        _load_weights(model, load_file(str(ckpt_dir / BEST_DIR / "model.safetensors")))
    model.eval()
    return FitResult(
        model=model,
        steps=step,
        samples=samples,
        seconds=seconds,
        resumed_from=resumed_from,
        checkpoint_seconds=checkpoint_seconds,
        history=history,
        evaluations=evaluations,
        best_epoch=best["epoch"] if best else None,
        stopped_early=stopped,
    )


def _evaluate_epoch(
    job: Job,
    model: nn.Module,
    epoch: int,
    step: int,
    evaluations: list[dict[str, Any]],
    best: dict[str, Any] | None,
    ckpt_dir: Path,
) -> tuple[dict[str, Any] | None, bool]:
    """Validate at an epoch end (rank 0; the others wait for its stop decision)."""
    stop = False
    if rank() == 0:
        assert job.evaluate is not None
        scores = job.evaluate(model)
        evaluations.append({"epoch": epoch, "step": step, **scores})
        if job.select_metric is not None:
            if job.select_metric not in scores:
                raise ConfigError(
                    f"{job.name}: validation metric {job.select_metric!r} is not one of "
                    f"{sorted(scores)}"
                )
            value = scores[job.select_metric]
            if best is None or value > best["value"]:
                best = {"epoch": epoch, "value": value, "sha256": _write_best(ckpt_dir, model)}
            stop = job.patience > 0 and epoch - best["epoch"] >= job.patience
        log(f"epoch {epoch} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    model.train()
    if world_size() > 1:
        shared = [stop, best]
        torch.distributed.broadcast_object_list(shared, src=0)
        stop, best = shared
    return best, stop


def usable_batches(n: int, batch_size: int, min_size: int) -> int:
    """Batches per epoch: full ones, plus the last partial one if it has ``min_size`` examples.

    Every rank computes the same number, so all of them skip the same (too small) last batch.
    """
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= min_size else 0)


def _agree_on_checkpoint(directory: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """Rank 0 chooses the checkpoint to resume from; every rank loads that one."""
    chosen = load_latest(directory, fingerprint) if rank() == 0 else None
    if world_size() == 1:
        return chosen
    shared = [str(chosen["path"]) if chosen else None]
    torch.distributed.broadcast_object_list(shared, src=0)
    if rank() != 0 and shared[0] is not None:
        chosen = load_checkpoint(Path(shared[0]))
    return chosen


def _train_step(
    job: Job,
    model: nn.Module,
    local: list[Any],
    device: torch.device,
    runtime: RuntimeConfig,
    optimizer,
    scheduler,
    scaler,
) -> float:
    """One optimizer step on this rank's share of the batch; returns the loss (mean over ranks)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(runtime, device):
        loss = job.loss(model, local, device)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if job.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), job.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    value = loss.detach().float()
    if world_size() > 1:
        torch.distributed.all_reduce(value)
        value /= world_size()
    return round(value.item(), 6)


def _live(live_dir: Path, history: list[dict[str, Any]], evaluations: list[dict[str, Any]]):
    """A DVCLive logger that starts from ``history`` and ``evaluations`` (replayed after a
    resume)."""
    from dvclive import Live

    shutil.rmtree(live_dir, ignore_errors=True)
    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    by_step = {e["step"]: e for e in evaluations}
    for record in history:
        _log_step(live, record)
        if record["step"] in by_step:
            _log_evaluation(live, by_step[record["step"]])
    return live


def _log_evaluation(live: Any, record: dict[str, Any]) -> None:
    """Epoch-end validation metrics, plotted against the step they were measured at."""
    step = live.step
    live.step = record["step"]
    for key, value in record.items():
        if key not in ("epoch", "step") and isinstance(value, int | float):
            live.log_metric(f"validation/{key}", value)
    live.step = step


def _log_step(live: Any, record: dict[str, Any]) -> None:
    live.step = record["step"]
    for key in ("loss", "lr", "samples_per_s"):
        live.log_metric(f"train/{key}", record[key])
    live.next_step()


def summary(result: FitResult, runtime: RuntimeConfig, metric: str | None = None) -> dict:
    """What every train stage reports about its run (its ``train`` metrics); with ``metric``
    (the job's ``select_metric``), the per-epoch validation figures and early stopping too."""
    out: dict[str, Any] = {
        "steps": result.steps,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "precision": runtime.precision.value,
        "world_size": world_size(),
        "seconds": round(result.seconds, 2),
        "samples_per_s": round(result.samples / result.seconds, 2) if result.seconds else None,
        "checkpoint_seconds": round(result.checkpoint_seconds, 3),
        "resumed_from_step": result.resumed_from,
    }
    if metric is not None:
        out.update(
            {
                "epochs_run": len(result.evaluations),
                "best_epoch": result.best_epoch,
                "stopped_early": result.stopped_early,
                f"epoch_{metric}": [e[metric] for e in result.evaluations],
            }
        )
    return out


def check_gate(
    component: str, metrics: dict[str, float], metric: str, threshold: float | None
) -> None:
    """Fail the stage when ``metrics[metric] < threshold``.

    Raises:
        GateError: naming the metric, its value and the threshold key.
    """
    if threshold is None:
        return
    if not metrics:
        raise ConfigError(
            f"{component}.metric_threshold is set but there is no validation split "
            "to measure it on; set dataset.validation_fraction > 0 or the threshold "
            "to null"
        )
    if metric not in metrics:
        raise ConfigError(
            f"{component}.gate_metric={metric!r} is not a validation metric; "
            f"choose one of {sorted(metrics)}"
        )
    value = metrics[metric]
    if value < threshold:
        raise GateError(
            f"{component} quality gate failed: validation {metric} = {value:.4f} "
            f"< {component}.metric_threshold = {threshold}; nothing was written"
        )
