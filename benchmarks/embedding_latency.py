"""Single-sentence latency of the built embedding model: PyTorch vs ONNX fp32 vs ONNX INT8.

Run after `dvc repro` (or `make run`), from the repository root:

    python benchmarks/embedding_latency.py [--threads 2] [--runs 300]

Prints p50/p95 latency per backend, file sizes, and the INT8 parity figures recorded by the
export stage. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from sphana.embedding import load_trained, tokenize
from sphana.entry import quiet_libraries
from sphana.export import session


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()

    params = yaml.safe_load(Path("params.yaml").read_text())
    root = Path(params["paths"]["artifacts"]) / "embedding" / params["embedding"]["version"]
    max_len = params["embedding"]["max_seq_length"]
    validation = [
        json.loads(line)["query"]
        for line in (Path(params["paths"]["datasets"]) / "embedding/validation.jsonl").open()
    ]
    rng = random.Random(0)
    sentences = [rng.choice(validation) for _ in range(args.runs)]

    torch.set_num_threads(args.threads)
    encoder, tokenizer = load_trained(root / "pytorch")
    fp32 = session(root / "onnx/embedding.onnx", args.threads)
    int8 = session(root / "onnx/embedding.int8.onnx", args.threads)

    def torch_run(feed):
        with torch.inference_mode():
            return encoder(**feed)

    backends = {
        "pytorch": (torch_run, lambda enc: enc),
        "onnx_fp32": (
            lambda feed: fp32.run(None, feed),
            lambda enc: {k: v.numpy() for k, v in enc.items()},
        ),
        "onnx_int8": (
            lambda feed: int8.run(None, feed),
            lambda enc: {k: v.numpy() for k, v in enc.items()},
        ),
    }
    print(f"single sentence, {args.threads} threads, {args.runs} runs (tokenization excluded)")
    for name, (fn, convert) in backends.items():
        feeds = [convert(tokenize(tokenizer, [s], max_len)) for s in sentences]
        for feed in feeds[:20]:  # warm-up
            fn(feed)
        times = []
        for feed in feeds:
            start = time.perf_counter()
            fn(feed)
            times.append((time.perf_counter() - start) * 1000)
        print(
            f"  {name:10s} p50 {percentile(times, 50):6.2f} ms"
            f"   p95 {percentile(times, 95):6.2f} ms"
            f"   mean {statistics.fmean(times):6.2f} ms"
        )
    for name in ("embedding.onnx", "embedding.int8.onnx"):
        print(f"  size {name:22s} {(root / 'onnx' / name).stat().st_size / 2**20:7.1f} MiB")
    report = json.loads((Path(params["paths"]["metrics"]) / "export_embedding.json").read_text())
    i8 = report["int8"]
    print(
        f"  fp32 max abs diff {report['fp32']['max_abs_diff']:.2e}; INT8 mean cosine "
        f"{i8['mean_cosine']:.4f} (min {i8['min_cosine']:.4f}); recall@5 PyTorch "
        f"{i8['pytorch_recall@5']:.4f} INT8 {i8['recall@5']:.4f}"
        f" retention {i8['recall_retention']:.2%}"
    )


if __name__ == "__main__":
    main()
