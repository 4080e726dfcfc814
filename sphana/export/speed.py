"""Throughput and latency of a model on prepared inputs: what ``sphana convert``'s report and
``benchmarks/export_speed.py`` measure (numbers for ratios, measured side by side in one run)."""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def throughput(run: Any, batches: list[dict[str, np.ndarray]], seconds: float) -> float:
    """Inputs per second running whole passes over ``batches`` until ``seconds`` have passed (one
    pass at least; warm ``run`` up first)."""
    done, start = 0, time.perf_counter()
    while not done or time.perf_counter() - start < seconds:
        for batch in batches:
            run(batch)
            done += len(batch["input_ids"])
    return done / (time.perf_counter() - start)


def side_by_side(
    runs: dict[str, Any], batches: list[dict[str, np.ndarray]], seconds: float, rounds: int = 6
) -> dict[str, float]:
    """Inputs per second of each of ``runs`` on ``batches``, about ``seconds`` each: the backends
    take turns in up to ``rounds`` rounds and each keeps its best, so a drift in the machine's
    load slows them alike instead of whichever ran last (their ratios are what to compare).
    Every round runs whole passes over ``batches``, so there are fewer rounds when the slowest
    backend's pass takes longer than ``seconds / rounds``."""
    inputs = sum(len(batch["input_ids"]) for batch in batches)
    slowest = 0.0
    for run in runs.values():  # a warm-up, then one pass: how long a pass takes
        run(batches[0])
        slowest = max(slowest, inputs / throughput(run, batches, 0))
    rounds = max(1, min(rounds, int(seconds / slowest)))
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            rates[name].append(throughput(run, batches, seconds / rounds))
    return {name: max(r) for name, r in rates.items()}


def latency(run: Any, singles: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """p50 and p95 in ms of one input at a time (after ten warm-up runs)."""
    for feed in singles[:10]:
        run(feed)
    times = []
    for feed in singles:
        start = time.perf_counter()
        run(feed)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def torch_runner(model: Any) -> Any:
    """``run(feed) -> np.ndarray`` of a PyTorch module on numpy inputs."""
    import torch

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()

    return run


def onnx_runner(sess: Any) -> Any:
    """``run(feed) -> np.ndarray``: the first output of an ONNX Runtime session."""
    return lambda feed: sess.run(None, feed)[0]


def operator_shares(path: Path, threads: int, batches: list[dict[str, np.ndarray]]) -> dict:
    """Share of an ONNX file's kernel time per operator type, largest first, over a warm-up run
    and one pass of ``batches`` (ONNX Runtime's profiler): where an export's time goes."""
    from sphana.export import session

    with tempfile.TemporaryDirectory() as tmp:
        sess = session(path, threads, profile_prefix=str(Path(tmp) / "profile"))
        for batch in [batches[0], *batches]:  # a warm-up run, then each batch
            sess.run(None, batch)
        events = json.loads(Path(sess.end_profiling()).read_text())
    time_by_op: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            time_by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(time_by_op.values()) or 1
    return {op: round(t / total, 3) for op, t in time_by_op.most_common()}
