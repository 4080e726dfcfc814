"""Throughput and latency of a model on prepared inputs: what ``sphana convert``'s report and
``benchmarks/export_speed.py`` measure (numbers for ratios, measured side by side in one run)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def throughput(run: Any, batches: list[dict[str, np.ndarray]], seconds: float) -> float:
    """Inputs per second running ``batches`` in turn for about ``seconds`` (after one warm-up)."""
    run(batches[0])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in batches:
            run(batch)
            done += len(batch["input_ids"])
    return done / (time.perf_counter() - start)


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
