"""Retrieval through the corpus index on real text nobody here wrote: the held-out half of the
standard-library docstring set (summary paragraph -> the rest of its docstring, as the
out-of-domain check of ``train_embedding``), embedded by the exported fp32 and INT8 embedding
models with the index stage's code (:func:`sphana.index.build`) and searched with
:class:`sphana.index.Index`, next to what ``train_embedding`` measured in PyTorch.

    python benchmarks/index_real_text.py   # after `make run`

Prints recall@1/5/10 per file; asserts nothing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from sphana import general_eval
from sphana import index as index_lib
from sphana.serving.engine import Embedder, Model, SessionSettings


def main() -> None:
    onnx = Path("target/artifacts/embedding/0.1.0/onnx")
    config = json.loads(Path("target/metrics/export_embedding.json").read_text())["model_config"]
    trained = json.loads(Path("target/metrics/train_embedding.json").read_text())
    pairs = general_eval.build(800).report
    with tempfile.TemporaryDirectory() as tmp:
        chunks = Path(tmp) / "chunks.jsonl"
        chunks.write_text(
            "".join(
                json.dumps({"id": p.id, "doc_id": p.id, "text": p.passage}) + "\n" for p in pairs
            )
        )
        for name in ("embedding.onnx", "embedding.int8.onnx"):
            model = Model(
                "embedding", "", name, onnx / name, config, SessionSettings(1).session(onnx / name)
            )
            embedder = Embedder(model, onnx)
            out = Path(tmp) / name
            index_lib.build(
                chunks,
                out,
                embed=embedder.run,
                embedding_file=onnx / name,
                embedding_rel=name,
                candidates=lambda text: [],
                relations=None,
                batch_size=64,
            )
            index = index_lib.Index(out)
            hits = [[h.row for h in index.search(embedder.run([p.query])[0], 10)] for p in pairs]
            recall = {k: np.mean([i in h[:k] for i, h in enumerate(hits)]) for k in (1, 5, 10)}
            print(
                f"{name}: {len(pairs)} stdlib docstrings, recall@1 {recall[1]:.3f}, "
                f"@5 {recall[5]:.3f}, @10 {recall[10]:.3f}"
            )
    for kind in ("base", "shipped"):
        figures = trained["out_of_domain"].get(kind, {}).get("report")
        if figures:
            print(f"train_embedding, {kind} (PyTorch): {json.dumps(figures)}")


if __name__ == "__main__":
    main()
