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

from sphana.export import spread


def speed_inputs(
    items: list[Any], length: Any, feed: Any, count: int = 128, size: int = 32
) -> dict[str, Any]:
    """What the speed table times: ``count`` of the eval set's ``items`` at even steps from its
    first to its last (:func:`~sphana.export.spread`), so its mix of lengths, such as short
    queries and long passages, is kept; sorted by ``length`` (as sentence-transformers'
    ``encode`` does) and cut into batches of ``size``; every fourth of them alone for the
    latency. ``feed(chunk)`` makes a model input."""
    sample = sorted(spread(items, count), key=length)
    return {
        "batches": [feed(sample[i : i + size]) for i in range(0, len(sample), size)],
        "singles": [feed([x]) for x in sample[::4]],
    }


def batches_described(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """How many inputs ``batches`` hold, of how many tokens on average, and to how many tokens
    a batch is padded on average."""
    masks = [b["attention_mask"] for b in batches]
    return {
        "inputs": sum(len(m) for m in masks),
        "batch": len(masks[0]),
        "tokens_per_input": round(float(np.mean(np.concatenate([m.sum(1) for m in masks]))), 1),
        "padded_to": round(float(np.mean([m.shape[1] for m in masks])), 1),
    }


def side_by_side(
    runs: dict[str, Any], batches: list[dict[str, np.ndarray]], seconds: float, passes: int = 3
) -> dict[str, float]:
    """Inputs per second of each of ``runs`` on ``batches``: the backends take turns pass by
    pass (each runs a whole pass over ``batches``, then the next backend does), for ``passes``
    rounds (one at least) and on until the slowest backend has spent ``seconds``; each backend's
    rate counts each batch at its median run. A machine whose load drifts during the measurement
    slows the backends alike instead of whichever ran last, an occasional run slowed by another
    process does not count, and a backend whose runs vary is not credited with its luckiest one
    (compare the backends' ratios, not absolute figures). A backend runs its batches back to
    back, as a server does, so its weights stay in the CPU's caches as they would there."""
    for run in runs.values():  # a warm-up each
        run(batches[0])
    took: dict[str, list[list[float]]] = {name: [[] for _ in batches] for name in runs}

    def more() -> bool:  # the passes done (one at least), then the slowest backend's time
        done = len(next(iter(took.values()))[0])
        return done < max(passes, 1) or max(sum(map(sum, t)) for t in took.values()) < seconds

    while more():
        for name, run in runs.items():
            for i, batch in enumerate(batches):
                start = time.perf_counter()
                run(batch)
                took[name][i].append(time.perf_counter() - start)
    inputs = sum(len(batch["input_ids"]) for batch in batches)
    return {name: float(inputs / sum(map(np.median, t))) for name, t in took.items()}


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
