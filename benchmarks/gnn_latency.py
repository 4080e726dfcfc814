"""Ranking latency of the built graph ranker: one query with N candidates, PyTorch vs ONNX.

Run after `dvc repro` (or `make run`), from the repository root:

    python benchmarks/gnn_latency.py [--candidates 20] [--threads 2] [--runs 300]

The candidates are real validation subgraphs (cycled to reach N). Prints p50/p95 latency per
backend, graph size, file sizes and the nDCG@10 figures recorded by train/export. It measures;
it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from sphana.entry import quiet_libraries
from sphana.export import session
from sphana.gnn import collate, load_split, load_trained


def timed(fn, runs: int) -> tuple[float, float]:
    for _ in range(10):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 95))


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()

    params = yaml.safe_load(Path("params.yaml").read_text())
    paths, version = params["paths"], params["gnn"]["version"]
    base = Path(paths["artifacts"]) / "gnn" / version
    _, validation = load_split(Path(paths["datasets"]) / "gnn")
    pool = [c for q in validation for c in q["candidates"]]
    query = {"candidates": [pool[i % len(pool)] for i in range(args.candidates)]}
    inputs, _, _ = collate([query])
    torch.set_num_threads(args.threads)
    model, _ = load_trained(base / "pytorch")
    feed = {k: v.numpy() for k, v in inputs.items()}
    print(
        f"one query, {args.candidates} candidates: {feed['node_features'].shape[0]} nodes, "
        f"{feed['edge_index'].shape[1]} edges, {feed['node_features'].shape[1]} features"
    )
    with torch.inference_mode():
        p50, p95 = timed(lambda: model(**inputs), args.runs)
    print(f"{'pytorch':>12}: p50 {p50:.2f} ms  p95 {p95:.2f} ms")
    for name in ("gnn_ranker.onnx", "gnn_ranker.int8.onnx"):
        path = base / "onnx" / name
        if not path.is_file():
            print(f"{name:>12}: not shipped (see the manifest's quantization.skipped)")
            continue
        sess = session(path, args.threads)
        p50, p95 = timed(lambda s=sess: s.run(None, feed), args.runs)
        size = path.stat().st_size / 2**20
        print(f"{name:>12}: p50 {p50:.2f} ms  p95 {p95:.2f} ms  ({size:.2f} MiB)")
    train = json.loads((Path(paths["metrics"]) / "train_gnn.json").read_text())
    export = json.loads((Path(paths["metrics"]) / "export_gnn.json").read_text())
    print(
        f"validation nDCG@10: GNN {train['validation']['ndcg@10']:.4f} (ONNX fp32 "
        f"{export['fp32']['metrics']['ndcg@10']:.4f}) vs embedding similarity "
        f"{train['baseline_embedding_similarity']['ndcg@10']:.4f}"
    )


if __name__ == "__main__":
    main()
