"""The training runtime: resume after SIGKILL, checkpoint integrity, DDP, precision, gates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import GROUPS, copy_repo, dvc, run, sphana
from torch import nn

from sphana import runtime as rt
from sphana.config import Device, Precision, RuntimeConfig, validate
from sphana.errors import ConfigError, GateError

# A run long enough to be killed mid-epoch: 2 epochs x 32 steps, a checkpoint every 4 steps.
LONG = [
    "embedding.epochs=2",
    "embedding.max_train_pairs=256",
    "embedding.batch_size=8",
    "runtime.checkpoint_every_steps=4",
]


@pytest.fixture(scope="module")
def stage_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository copy with tiny params and its datasets built by the real stages."""
    repo = copy_repo(tmp_path_factory.mktemp("runtime-repo"))
    sphana("params", *[f"{g}=tiny" for g in GROUPS], *LONG, cwd=repo)
    for stage in ("ingest", "build_datasets"):
        run([sys.executable, f"stages/{stage}.py"], cwd=repo)
    return repo


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "stages/train_embedding.py", *overrides]


def outputs(repo: Path) -> tuple[dict, bytes]:
    metrics = json.loads((repo / "target/metrics/train_embedding.json").read_text())
    weights = next((repo / "target/artifacts/embedding").glob("*/pytorch/model.safetensors"))
    return metrics, weights.read_bytes()


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(stage_repo: Path) -> None:
    run(train_cmd(), cwd=stage_repo)
    expected_metrics, expected_weights = outputs(stage_repo)
    checkpoints = stage_repo / "target/checkpoints/embedding"
    assert not checkpoints.exists(), "a finished run clears its checkpoints"

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(
        train_cmd(), cwd=stage_repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(
            p.name >= "step-0000008" and "tmp" not in p.name
            for p in (checkpoints.iterdir() if checkpoints.is_dir() else [])
        ):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    left = rt.checkpoints(checkpoints)
    assert left, "checkpoints survive the kill"
    killed_at = max(int(p.name.removeprefix("step-")) for p in left)
    assert 8 <= killed_at < 64 and killed_at % 32 != 0, "killed mid-epoch"

    resumed = run(train_cmd(), cwd=stage_repo)
    assert "resumed from checkpoint" in resumed.stderr
    metrics, weights = outputs(stage_repo)
    assert metrics["train"]["resumed_from_step"] >= 8
    assert metrics["fine_tuned"] == expected_metrics["fine_tuned"]
    assert metrics["train"]["final_loss"] == expected_metrics["train"]["final_loss"]
    assert weights == expected_weights


def test_changed_config_starts_fresh_saying_why(stage_repo: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    checkpoints = stage_repo / "target/checkpoints/embedding"
    proc = subprocess.Popen(
        train_cmd(), cwd=stage_repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while proc.poll() is None and not rt.checkpoints(checkpoints):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = run(train_cmd("embedding.lr=0.002", "embedding.epochs=1"), cwd=stage_repo)
    assert "starting fresh" in again.stderr and "job.lr" in again.stderr
    assert "resumed" not in again.stderr


def tiny_job(tmp_path: Path, epochs: int = 2, **kwargs) -> tuple[rt.Job, RuntimeConfig]:
    torch.manual_seed(0)
    xs = [torch.randn(4) for _ in range(24)]
    data = [(x, x.sum(dim=0, keepdim=True)) for x in xs]  # learnable: y = sum(x)

    def loss(model: nn.Module, batch: list, device: torch.device) -> torch.Tensor:
        x = torch.stack([b[0] for b in batch]).to(device)
        y = torch.stack([b[1] for b in batch]).to(device)
        return nn.functional.mse_loss(model(x), y)

    job = rt.Job(
        name="toy",
        model=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)),
        examples=data,
        loss=loss,
        batch_size=4,
        epochs=epochs,
        lr=1e-2,
        weight_decay=0.0,
        warmup_ratio=0.0,
        grad_clip=1.0,
        fingerprint={"toy": 1},
    )
    runtime = RuntimeConfig(checkpoint_every_steps=2, keep_checkpoints=3, **kwargs)
    return job, runtime


def fit(tmp_path: Path, job: rt.Job, runtime: RuntimeConfig) -> rt.FitResult:
    device = rt.setup(runtime)
    return rt.fit(job, runtime, device, tmp_path / "ckpt", tmp_path / "live", tmp_path / "prof")


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path, capsys) -> None:
    job, runtime = tiny_job(tmp_path)
    fit(tmp_path, job, runtime)
    kept = rt.checkpoints(tmp_path / "ckpt/toy")
    assert len(kept) == 3, "pruned to keep_checkpoints"
    newest = kept[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])  # truncated
    fingerprint = json.loads((kept[-2] / "state.json").read_text())["fingerprint"]
    loaded = rt.load_latest(tmp_path / "ckpt/toy", fingerprint)
    assert loaded is not None and loaded["path"] == kept[-2]
    assert "does not match its sha256" in capsys.readouterr().err


class Tied(nn.Module):
    """Input and output share one weight, as a causal LM ties its embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4, bias=False)
        self.out = nn.Linear(4, 4, bias=False)
        self.out.weight = self.inp.weight
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.out(torch.relu(self.inp(x))))


def test_tied_weights_checkpoint_resume_and_best_epoch(tmp_path: Path) -> None:
    job, runtime = tiny_job(tmp_path, epochs=2)
    torch.manual_seed(0)
    job.model = Tied()
    job.evaluate = lambda m: {"score": -float(m.head.bias)}
    job.select_metric = "score"
    result = fit(tmp_path, job, runtime)  # checkpoints and the best epoch hold the tie once
    assert result.model.out.weight is result.model.inp.weight
    first = {k: v.clone() for k, v in result.model.state_dict().items()}

    job.epochs = 3  # resumes from the last checkpoint of the 2-epoch run
    torch.manual_seed(1)
    job.model = Tied()
    resumed = fit(tmp_path, job, runtime)
    assert resumed.resumed_from is not None
    assert resumed.model.out.weight is resumed.model.inp.weight
    assert not torch.equal(resumed.model.inp.weight, first["inp.weight"])  # trained on


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_payload_in_a_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    job, runtime = tiny_job(tmp_path)
    fit(tmp_path, job, runtime)
    kept = rt.checkpoints(tmp_path / "ckpt/toy")
    torch.save({"optimizer": Payload()}, kept[-1] / "optimizer.pt")
    sums = "".join(
        f"{rt.sha256_file(p)}  {p.name}\n"
        for p in sorted(kept[-1].iterdir())
        if p.name != rt.SUMS_FILE
    )
    (kept[-1] / rt.SUMS_FILE).write_text(sums)  # an attacker can recompute the sums
    fingerprint = json.loads((kept[-1] / "state.json").read_text())["fingerprint"]
    loaded = rt.load_latest(tmp_path / "ckpt/toy", fingerprint)
    assert loaded is not None and loaded["path"] == kept[-2]
    assert "not a weights-only file" in capsys.readouterr().err


def test_bf16_trains_on_cpu(tmp_path: Path) -> None:
    job, runtime = tiny_job(tmp_path, precision=Precision.bf16, device=Device.cpu)
    result = fit(tmp_path, job, runtime)
    assert result.steps == 12
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    first, last = result.history[:6], result.history[-6:]
    assert sum(h["loss"] for h in last) < sum(h["loss"] for h in first)


def test_bf16_embedding_stage_on_cpu(stage_repo: Path) -> None:
    proc = run(train_cmd("runtime.precision=bf16", "embedding.epochs=1"), cwd=stage_repo)
    assert "train_embedding" in proc.stderr
    metrics, _ = outputs(stage_repo)
    assert metrics["train"]["precision"] == "bf16"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"runtime": {"precision": "fp16", "device": "cpu"}}, "fp16 needs"),
        ({"runtime": {"precision": "int4"}}, "runtime.precision"),
        ({"embedding": {"gate_metric": "accuracy"}}, "embedding.gate_metric"),
    ],
)
def test_wrong_runtime_combinations_are_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(overrides)


def test_fp16_without_a_gpu_is_a_config_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        rt.setup(RuntimeConfig(precision=Precision.fp16))


def test_gate() -> None:
    rt.check_gate("embedding", {"recall@5": 0.9}, "recall@5", 0.8)
    with pytest.raises(GateError, match=r"recall@5 = 0\.7000 < embedding\.metric_threshold = 0\.8"):
        rt.check_gate("embedding", {"recall@5": 0.7}, "recall@5", 0.8)
    with pytest.raises(ConfigError, match="no validation split"):
        rt.check_gate("embedding", {}, "recall@5", 0.8)


def torchrun(repo: Path, port: int, *overrides: str, check: bool = True):
    """`torchrun --nproc_per_node=2 stages/train_embedding.py ...` (gloo on CPU)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "stages/train_embedding.py",
        *overrides,
    ]
    return run(cmd, cwd=repo, check=check)


def test_torchrun_two_processes_train_and_write_once(stage_repo: Path) -> None:
    proc = torchrun(
        stage_repo,
        29517,
        "runtime.ddp=true",
        "embedding.epochs=1",
        "embedding.max_train_pairs=250",  # last batch of 2: too small for 2 ranks, skipped
    )
    assert (
        proc.stderr.count("train_embedding done") + proc.stdout.count("train_embedding done") == 1
    )
    metrics, _ = outputs(stage_repo)
    assert metrics["train"]["world_size"] == 2
    out = next((stage_repo / "target/artifacts/embedding").glob("*/pytorch"))
    assert (out / "model.safetensors").is_file()
    assert not list(out.parent.glob(".pytorch*")), "no half-written output"


def test_torchrun_without_ddp_flag_is_refused(stage_repo: Path) -> None:
    proc = torchrun(stage_repo, 29518, check=False)
    assert proc.returncode != 0
    assert "runtime.ddp=true" in proc.stderr


def test_failed_gate_fails_dvc_repro_and_exports_nothing(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    sphana("params", *[f"{g}=tiny" for g in GROUPS], "embedding.metric_threshold=1.5", cwd=repo)
    proc = dvc("repro", cwd=repo, check=False)
    assert proc.returncode != 0
    assert "quality gate failed" in proc.stdout + proc.stderr
    assert "embedding.metric_threshold = 1.5" in proc.stdout + proc.stderr
    assert "Running stage 'export_embedding'" not in proc.stdout
    assert not (repo / "target/artifacts/embedding").exists() or not list(
        (repo / "target/artifacts/embedding").glob("*/*")
    )


def test_profile_steps_write_a_trace(tmp_path: Path) -> None:
    job, runtime = tiny_job(tmp_path, epochs=1, profile_steps=2)
    fit(tmp_path, job, runtime)
    trace = json.loads((tmp_path / "prof/toy/trace.json").read_text())
    assert trace["traceEvents"], "a chrome trace with events"


def test_dvclive_logs_every_step(tmp_path: Path) -> None:
    job, runtime = tiny_job(tmp_path, epochs=1)
    fit(tmp_path, job, runtime)
    loss = (tmp_path / "live/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert loss[0].split("\t") == ["step", "loss"] and len(loss) == 1 + 6
    summary = json.loads((tmp_path / "live/metrics.json").read_text())
    assert {"loss", "lr", "samples_per_s", "epoch_seconds", "memory_mb"} <= set(summary["train"])


def test_a_too_small_last_batch_is_skipped_by_every_rank() -> None:
    assert rt.usable_batches(250, 8, 2 * 2) == 31  # 31 full, last of 2 < 2 per rank x 2 ranks
    assert rt.usable_batches(252, 8, 2 * 2) == 32  # last of 4: 2 per rank
    assert rt.usable_batches(10, 5, 2) == 2


def test_batch_too_small_for_the_ranks_is_a_config_error(tmp_path: Path) -> None:
    job, runtime = tiny_job(tmp_path)
    job.batch_size, job.min_batch = 1, 2
    with pytest.raises(ConfigError, match="toy.batch_size=1 is too small"):
        fit(tmp_path, job, runtime)
