"""Decode speed of the built generator on ONNX Runtime: KV cache vs recomputing the prefix.

Run after `dvc repro` (or `make run`), from the repository root:

    python benchmarks/llm_decode.py [--new-tokens 64] [--threads 2] [--runs 3] [--baseline DIR]
        [--long-prompt 400]

One validation prompt (chat format) is decoded greedily for exactly N new tokens (end tokens are
ignored, so every run does the same work) with ``sphana.generation`` on ``llm_generator.onnx`` and
its INT8 and 4-bit siblings (those the export shipped), with the cache (one step per token) and
without it (the whole sequence every step). Prints tokens/s (best of the runs), the speed-up, the
time to read a ``--long-prompt``-token prompt (the prompt's tokens repeated; ``query`` reads
three passages) and the file sizes. ``--baseline DIR`` (another export's ``onnx`` directory, e.g.
a copy of the previous build's) times its files of the same names right after each of ours:
before and after, side by side in one run. It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from sphana.generation import OnnxGenerator, chat_prompt, generate_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another export's onnx directory")
    parser.add_argument("--long-prompt", type=int, default=400, help="tokens of the long prompt")
    args = parser.parse_args()

    params = yaml.safe_load(Path("params.yaml").read_text())
    paths = params["paths"]
    onnx_dir = Path(paths["artifacts"]) / "llm" / params["llm"]["version"] / "onnx"
    records = [
        json.loads(line)
        for line in (Path(paths["datasets"]) / "llm" / "validation.jsonl").read_text().splitlines()
    ]
    prompt = chat_prompt(next(r["prompt"] for r in records if r["kind"] == "qa"))
    files = ("llm_generator.onnx", "llm_generator.int8.onnx", "llm_generator.int4.onnx")
    dirs = [onnx_dir, *([args.baseline] if args.baseline else [])]
    for file_name, directory in ((f, d) for f in files for d in dirs if (d / f).is_file()):
        gen = OnnxGenerator(directory, file_name, threads=args.threads)
        ids = gen.tokenizer.encode(prompt, add_special_tokens=False).ids
        info = gen.info
        shape = (info["layers"], info["kv_heads"], info["head_dim"])
        rates = {}
        for use_cache in (True, False):
            best = float("inf")
            for _ in range(args.runs):
                start = time.perf_counter()
                generate_ids(
                    gen.step, [ids], args.new_tokens, shape, [], info["pad_token_id"],
                    use_cache=use_cache,
                )  # fmt: skip
                best = min(best, time.perf_counter() - start)
            rates[use_cache] = args.new_tokens / best
        long_ids = (ids * (args.long_prompt // len(ids) + 1))[: args.long_prompt]
        read = float("inf")
        for _ in range(args.runs):
            start = time.perf_counter()
            generate_ids(gen.step, [long_ids], 1, shape, [], info["pad_token_id"])  # the prefill
            read = min(read, time.perf_counter() - start)
        size = (directory / file_name).stat().st_size
        print(
            f"{directory / file_name} ({size / 1e6:.1f} MB), prompt {len(ids)} tokens, "
            f"{args.new_tokens} new: "
            f"cache {rates[True]:.0f} tokens/s, no cache {rates[False]:.0f} tokens/s, "
            f"speed-up {rates[True] / rates[False]:.1f}x; "
            f"a {len(long_ids)}-token prompt read in {read * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
