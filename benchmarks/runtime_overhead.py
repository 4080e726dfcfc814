"""Training throughput of `train_embedding` on the default config: the shared runtime in fp32 and
bf16 against a plain reference loop (same model, data, batch size, optimizer, loss):

    python benchmarks/runtime_overhead.py [--steps 20]

Run after `dvc repro build_datasets`. Prints samples/s of each, the runtime's overhead and the
time spent writing checkpoints. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
import yaml

from sphana import runtime as rt
from sphana.config import Precision, Resume, validate
from sphana.embedding import load_encoder, pair_loss, training_job
from sphana.entry import quiet_libraries
from sphana.io import load_jsonl


def plain_loop(cfg, pairs: list[dict]) -> float:
    """The textbook loop: no checkpoints, no logging, no progress. Returns samples/s."""
    torch.manual_seed(cfg.runtime.seed)
    encoder, tokenizer = load_encoder(cfg.embedding)
    loss_fn = pair_loss(tokenizer, cfg.embedding)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.embedding.lr)
    # the runtime's batches, so both loops see the same paddings
    batches = rt.epoch_batches(len(pairs), cfg.embedding.batch_size, cfg.runtime.seed, 0)
    encoder.train()
    start = time.perf_counter()
    for batch in batches:
        loss = loss_fn(encoder, [pairs[j] for j in batch], torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.embedding.grad_clip)
        optimizer.step()
    return len(pairs) / (time.perf_counter() - start)


def runtime_loop(cfg, pairs: list[dict], precision: Precision, tmp: Path) -> rt.FitResult:
    cfg.runtime.precision = precision
    cfg.runtime.resume = Resume.never
    device = rt.setup(cfg.runtime)
    encoder, tokenizer = load_encoder(cfg.embedding)
    cfg.embedding.epochs = 1
    job = training_job(cfg.embedding, encoder, tokenizer, pairs, [])
    return rt.fit(job, cfg.runtime, device, tmp / "ckpt", tmp / "live", tmp / "prof")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    quiet_libraries()
    cfg = validate(yaml.safe_load(Path("params.yaml").read_text()))
    all_pairs = load_jsonl(Path(cfg.paths.datasets) / "embedding/train.jsonl")
    pairs = random.Random(0).sample(all_pairs, args.steps * cfg.embedding.batch_size)
    print(
        f"{len(pairs)} pairs, batch {cfg.embedding.batch_size}, {args.steps} steps, "
        f"{torch.get_num_threads()} threads; checkpoint every "
        f"{cfg.runtime.checkpoint_every_steps} steps and at the epoch end"
    )
    plain_loop(cfg, pairs[: 2 * cfg.embedding.batch_size])  # warm-up: first-call costs
    plain = plain_loop(cfg, pairs)
    print(f"  plain loop          {plain:7.2f} samples/s")
    with tempfile.TemporaryDirectory() as tmp:
        for precision in (Precision.fp32, Precision.bf16):
            result = runtime_loop(cfg, pairs, precision, Path(tmp) / precision.value)
            train_seconds = result.seconds - result.checkpoint_seconds
            rate = result.samples / result.seconds
            print(
                f"  runtime {precision.value:5s}       {rate:7.2f} samples/s "
                f"(overhead vs plain {plain / rate - 1:+.1%}; without checkpoint writes "
                f"{result.samples / train_seconds:7.2f} samples/s, "
                f"{plain * train_seconds / result.samples - 1:+.1%}); "
                f"checkpoint writes {result.checkpoint_seconds:.2f} s"
            )


if __name__ == "__main__":
    main()
