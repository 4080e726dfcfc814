"""Speed of the built text encoders: PyTorch vs ONNX fp32 vs ONNX INT8, side by side in one run.

Run after `dvc repro` (or `make run`), from the repository root:

    python benchmarks/export_speed.py [--threads 2] [--seconds 6] [--runs 200] [--profile]

For the embedding model (on real English text nobody here wrote: the paragraphs of the licenses
in /usr/share/common-licenses, ~70 tokens, and the passages of the general out-of-domain set,
Python's standard-library docstrings, ~100 tokens) and the relation extractor (on its validation
examples, and on the candidate pairs ingest's entity detector finds in those license sentences,
~70 tokens), it prints batch-32 throughput, single-input latency p50/p95 (tokenization excluded),
file sizes, agreement with PyTorch (mean cosine / label agreement), the fused operators in the
graph and the INT8 recipe the export chose; ``--profile`` adds each ONNX file's share of kernel
time per operator on the same batches (ONNX Runtime's profiler). Each set of real text is
measured twice: batches in the text's own order (padded to their longest text: the worst case)
and sorted by length first, as ``sphana serve``'s batcher forms them. Backends take turns pass
by pass, three passes at least, and each batch counts at its median run, so a noisy machine
slows them alike: compare ratios, not absolute figures. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sphana import general_eval
from sphana.entry import quiet_libraries
from sphana.export import session
from sphana.export.speed import (
    batches_described,
    latency,
    onnx_runner,
    operator_shares,
    side_by_side,
    torch_runner,
)
from sphana.vectors import row_cosines


def backends(model: Any, onnx_dir: Path, files: dict[str, str], threads: int) -> dict[str, Any]:
    out = {"pytorch": torch_runner(model)}
    for name, file in files.items():
        out[f"onnx {name}"] = onnx_runner(session(onnx_dir / file, threads))
    return out


def profile(onnx_dir: Path, files: dict[str, str], threads: int, batches: list[Any]) -> None:
    for name, file in files.items():
        shares = operator_shares(onnx_dir / file, threads, batches)
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(shares.items())[:6])
        print(f"  time by operator, onnx {name}: {top}")


def compare(
    title: str,
    runs: dict[str, Any],
    batches: list[Any],
    singles: list[Any],
    agreement: Any,
    seconds: float,
) -> None:
    shape = batches_described(batches)
    print(
        f"{title}: batch {shape['batch']}, {shape['tokens_per_input']:.0f} tokens per input "
        f"(padded to {shape['padded_to']:.0f})"
    )
    rates = side_by_side(runs, batches, seconds)
    reference = np.concatenate([runs["pytorch"](b) for b in batches])
    base = rates["pytorch"]
    for name, run in runs.items():
        rate = rates[name]
        single = ""
        if singles:
            p50, p95 = latency(run, singles)
            single = f"single p50 {p50:6.2f} ms  p95 {p95:6.2f} ms   "
        got = np.concatenate([run(b) for b in batches])
        print(
            f"  {name:10s} {rate:7.1f}/s ({rate / base:4.2f}x PyTorch)   "
            f"{single}{agreement(reference, got)}"
        )


def measure_orders(
    title: str,
    runs: dict[str, Any],
    items: list[Any],
    feed: Any,
    length: Any,
    agreement: Any,
    args: Any,
    profiled: tuple[Path, dict[str, str]],
    sort: bool = True,
) -> None:
    """:func:`compare` on ``items`` batched in their own order (with single-input latency) and,
    with ``sort``, sorted by ``length`` first; ``feed(chunk)`` makes a batch."""
    orders = [("own order", items)] + ([("sorted", sorted(items, key=length))] if sort else [])
    for order, ordered in orders:
        batches = [feed(ordered[i : i + args.batch]) for i in range(0, len(items), args.batch)]
        singles = [feed([x]) for x in (items * 4)[: args.runs]] if order == "own order" else []
        compare(f"{title}, {order}", runs, batches, singles, agreement, args.seconds)
        if args.profile:
            profile(*profiled, args.threads, batches)


def license_paragraphs() -> list[str]:
    """The paragraphs (at least 8 words, whitespace collapsed) of the licenses Debian installs
    in /usr/share/common-licenses, each once, in file order; [] where there are none."""
    root, paragraphs = Path("/usr/share/common-licenses"), {}
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.is_file() and not path.is_symlink():
            for paragraph in re.split(r"\n\s*\n", path.read_text(errors="replace")):
                paragraph = " ".join(paragraph.split())
                if len(paragraph.split()) >= 8:
                    paragraphs[paragraph] = None
    return list(paragraphs)


def license_pairs(max_pair_chars: int, count: int) -> list[dict[str, Any]]:
    """``count`` candidate pairs spread evenly over those ``ingest``'s entity detector
    (:func:`sphana.entities.detect`) finds in the sentences of :func:`license_paragraphs`, as the
    relation extractor reads them; [] where there are none."""
    from sphana.datasets import pair_example
    from sphana.entities import detect

    pairs = [
        pair_example(pair)
        for paragraph in license_paragraphs()
        for sentence in detect(paragraph, max_pair_chars)
        for pair in sentence["pairs"]
    ]
    return pairs[:: max(len(pairs) // count, 1)][:count]


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0, help="the slowest backend's, per set")
    parser.add_argument("--runs", type=int, default=200, help="single-input latency runs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="time by operator of each file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    params = yaml.safe_load(Path("params.yaml").read_text())
    artifacts, metrics = Path(params["paths"]["artifacts"]), Path(params["paths"]["metrics"])

    def report_of(component: str) -> dict[str, str]:
        """The ONNX files the export wrote ({"fp32", "int8"}), after printing its fusion and
        INT8 recipe."""
        report = json.loads((metrics / f"export_{component}.json").read_text())
        q, fusion = report["quantization"], report.get("fusion", {})
        fused = ", ".join(f"{n} {op}" for op, n in fusion.get("fused_operators", {}).items() if n)
        print(
            f"{component}: fused operators: {fused or 'none'}; INT8 recipe {q['preset']} "
            f"(tried {[t['preset'] for t in q.get('tried', [])]})"
        )
        return report["files"]

    def sizes(onnx_dir: Path, files: dict[str, str]) -> None:
        for file in files.values():
            print(f"  size {file:28s} {(onnx_dir / file).stat().st_size / 2**20:6.1f} MiB")

    from sphana.embedding import load_trained as load_encoder
    from sphana.embedding import tokenize as tokenize_texts

    root = artifacts / "embedding" / params["embedding"]["version"]
    files = report_of("embedding")
    encoder, tokenizer = load_encoder(root / "pytorch")
    max_len = params["embedding"]["max_seq_length"]
    runs = backends(encoder, root / "onnx", files, args.threads)

    def feed(chunk: list[str]) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in tokenize_texts(tokenizer, chunk, max_len).items()}

    def tokens(text: str) -> int:
        return len(tokenizer(text, truncation=True, max_length=max_len)["input_ids"])

    text_sets = {
        "license paragraphs": license_paragraphs()[: 8 * args.batch],
        "docstring passages": [p.passage for p in general_eval.build(400).selection][
            : 4 * args.batch
        ],
    }
    for set_name, texts in text_sets.items():
        if not texts:
            print(f"embedding, {set_name}: none on this machine, skipped")
            continue
        measure_orders(
            f"embedding, {set_name}",
            runs,
            texts,
            feed,
            tokens,
            lambda ref, got: f"mean cosine {row_cosines(ref, got).mean():.4f}",
            args,
            (root / "onnx", files),
        )
    sizes(root / "onnx", files)

    from sphana.relation import load_split
    from sphana.relation import load_trained as load_relation
    from sphana.relation import tokenize as tokenize_examples

    root = artifacts / "relation" / params["relation"]["version"]
    files = report_of("relation")
    model, tokenizer, meta = load_relation(root / "pytorch")
    runs = backends(model, root / "onnx", files, args.threads)
    _, validation, _ = load_split(Path(params["paths"]["datasets"]) / "relation")

    def feed_examples(chunk: list[dict]) -> dict[str, np.ndarray]:
        inputs = tokenize_examples(tokenizer, chunk, meta["max_seq_length"])
        return {k: v.numpy() for k, v in inputs.items()}

    def marked_tokens(example: dict) -> int:
        return int(feed_examples([example])["attention_mask"].sum())

    example_sets = {
        "validation": validation[: 4 * args.batch],
        "license sentences' candidate pairs": license_pairs(
            params["ingest"]["max_pair_chars"], 8 * args.batch
        ),
    }
    for set_name, examples in example_sets.items():
        if not examples:
            print(f"relation, {set_name}: none on this machine, skipped")
            continue
        measure_orders(
            f"relation, {set_name}",
            runs,
            examples,
            feed_examples,
            marked_tokens,
            lambda ref, got: f"label agreement {np.mean(ref.argmax(1) == got.argmax(1)):.4f}",
            args,
            (root / "onnx", files),
            sort=set_name != "validation",  # templated, of even length: nothing to sort
        )
    sizes(root / "onnx", files)


if __name__ == "__main__":
    main()
