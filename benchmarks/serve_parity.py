"""Serving parity: what ``sphana serve`` answers on the build's validation data, next to what the
build's export gates measured (``target/metrics/export_*.json``), in one run.

Run from a built repository (after ``make run``)::

    python benchmarks/serve_parity.py [--release target/manifests/latest.tar.gz]
        [--precision embedding=fp32] [--only gnn]

- embedding: the served vectors (``/v1/embeddings``) of the validation queries and passages
  against the same file run in process with the build's transformers tokenizer (max abs
  difference, next to the fp32 gate), and the retrieval metrics recomputed from the served
  vectors next to the export's INT8 figures;
- relation: each validation example sent with its two entity spans (``/v1/relations``), the
  served label of the reading with the example's subject first, macro-F1 and accuracy next to
  the export's;
- ranker: each validation query's candidates (their chunk texts and first-stage ranks) sent to
  ``/v1/rerank``; nDCG@10 and MRR next to the export's, and the share of queries ranked exactly
  as the build's graphs are (and up to ties: the served order never puts a candidate above one
  the build scored more than ``TIE`` higher; node features are rounded to 4 decimals, so two
  runtimes may break near-ties differently);
- generator: greedy generations of the export's parity prompts, served against in process.

It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import httpx
import numpy as np

from sphana.io import load_jsonl
from sphana.serving import parity
from sphana.serving.engine import parse_precision


def start(release: Path, precision: list[str]) -> tuple[subprocess.Popen, str]:
    """The server on ``release``, as the build evaluates: long passages truncated."""
    from serve_load import start_server

    flags = ["--max-inputs", "4096", "--auto-truncate", *(f"--precision={p}" for p in precision)]
    proc, port, _ = start_server(release, 0, *flags)
    return proc, f"http://127.0.0.1:{port}"


def served_embed(url: str):
    def embed(texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), 64):
            r = httpx.post(f"{url}/v1/embeddings", json={"input": texts[i : i + 64]}, timeout=120)
            r.raise_for_status()
            out.extend(d["embedding"] for d in r.json()["data"])
        return np.asarray(out, dtype=np.float32)

    return embed


def embedding(url: str, target: Path, manifest: dict, precision: str) -> None:
    from sphana.embedding import ValidationSet

    entry = manifest["components"]["embedding"]
    validation = ValidationSet.load(target / "datasets/embedding")
    served = validation.evaluate(served_embed(url))
    model = parity.model_file(target, entry, precision)
    texts = [r["query"] for r in load_jsonl(target / "datasets/embedding/validation.jsonl")][:256]
    reference = in_process_embed(model, entry["model_config"]["max_seq_length"])(texts)
    diff = float(np.abs(served_embed(url)(texts) - reference).max())
    print(
        f"embedding: served vs in process (same file, transformers tokenizer), {len(texts)} "
        f"queries: max abs diff {diff:.2e} (fp32 gate {entry['parity']['fp32']['threshold']})"
    )
    shipped = parity.exported(target, "export_embedding", entry, precision)
    for k in ("recall@5", "recall@10", "mrr"):
        print(f"  {k:10s} served {served[k]:.4f}   export {shipped[k]:.4f}")


def in_process_embed(model: Path, max_length: int):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from sphana.export.embedding import ort_embed

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return ort_embed(session, AutoTokenizer.from_pretrained(str(model.parent)), max_length)


def relation(url: str, target: Path, manifest: dict, precision: str) -> None:
    r = parity.relation(poster(url), target, manifest, precision)
    print(
        f"relation: {r['examples']} validation examples ({r['unpaired']} not paired by the "
        f"server): macro-F1 served {r['served']['macro_f1']:.4f} export "
        f"{r['export']['macro_f1']:.4f}; accuracy served {r['served']['accuracy']:.4f} export "
        f"{r['export']['accuracy']:.4f}"
    )


def ranker(url: str, target: Path, manifest: dict, precision: str) -> None:
    r = parity.ranker(poster(url), target, manifest, precision)
    n, served, export = r["queries"], r["served"], r["export"]
    print(
        f"ranker: {n} validation queries: nDCG@10 served {served['ndcg@10']:.4f} export "
        f"{export['ndcg@10']:.4f}; MRR served {served['mrr']:.4f} export {export['mrr']:.4f}; "
        f"rankings identical to the build's graphs: {r['identical'] / n:.1%}, up to ties "
        f"(build scores within {parity.TIE}): {r['identical_up_to_ties'] / n:.1%}"
    )


def poster(url: str):
    client = httpx.Client(base_url=url, timeout=120)

    def post(path: str, body: dict):
        response = client.post(path, json=body)
        response.raise_for_status()
        return response.json()

    return post


def generator(url: str, target: Path, manifest: dict, precision: str) -> None:
    from sphana.generation import OnnxGenerator
    from sphana.samples import PROMPTS

    entry = manifest["components"]["llm"]
    path = target / "artifacts" / entry["path"]
    local = OnnxGenerator(path.parent, path.name)
    same = 0
    for prompt in PROMPTS:
        body = {"prompt": prompt, "chat": False, "max_new_tokens": 16}
        served = httpx.post(f"{url}/v1/generate", json=body, timeout=300).json()["generated_text"]
        same += served == local.generate([prompt], 16)[0]
    print(f"generator: greedy generations identical to in process: {same}/{len(PROMPTS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, default=Path("target/manifests/latest.tar.gz"))
    parser.add_argument("--target", type=Path, default=Path("target"))
    parser.add_argument(
        "--precision",
        action="append",
        default=[],
        help="passed to sphana serve, e.g. embedding=fp32 (the build's graphs "
        "hold vectors of the PyTorch encoder)",
    )
    parser.add_argument("--only", action="append", choices=["embedding", "relation", "gnn", "llm"])
    args = parser.parse_args()
    manifest = json.loads((args.target / "manifests/latest.json").read_text())
    precision = parse_precision(args.precision)
    proc, url = start(args.release, args.precision)
    try:
        for name, check in (
            ("embedding", embedding),
            ("relation", relation),
            ("gnn", ranker),
            ("llm", generator),
        ):
            if name in manifest["components"] and (not args.only or name in args.only):
                check(url, args.target, manifest, precision[name])
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
