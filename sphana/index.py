"""The corpus index: every chunk of the corpus with its embedding by the shipped embedding model
and what the graph ranker needs of it at query time (its candidate entity pairs and the relations
the shipped relation extractor finds between them), so a query embeds one text and scores no
passage twice.

Written by the ``index`` stage into ``<paths.artifacts>/index/`` and listed, checksummed, under
the manifest's ``index`` (not a component: every component is an ONNX model a consumer loads):

- ``vectors.npy``: ``float32 [passages, dimension]``, L2-normalized, row ``i`` is line ``i`` of
- ``passages.jsonl``: ``{"id", "doc_id", "title", "section", "start", "end", "text", "pairs",
  "relations"}`` (``pairs`` as :func:`sphana.entities.detect` gives them, ``relations`` one per
  pair: ``[subject, object, label]`` or null; null throughout without a relation extractor);
- ``index.json``: counts, the search, and the embedding file that made the vectors (its sha256:
  an index is only valid with that model, :meth:`Index.check_embedding`).

- ``hnsw.faiss``: above ``index.approximate_above`` passages only, an HNSW graph (faiss,
  inner product) searched instead of the matrix; its recall@10 against exact search, measured
  on passages as queries when it is built, is in ``index.json``.

Search is exact below ``index.approximate_above`` (100k) passages: one matrix-vector product,
about 12 ms a query at 100k passages of 384 dimensions on these 2 cores, against 0.25 ms for the
HNSW graph at recall@10 0.9996 (``benchmarks/index_search.py``). Nothing here imports torch:
the build and the server both use this module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sphana.errors import InputError, VerifyError
from sphana.io import atomic_dir, dumps_json, load_jsonl, read_jsonl, sha256_file

VECTORS = "vectors.npy"
PASSAGES = "passages.jsonl"
INFO = "index.json"
HNSW = "hnsw.faiss"
FILES = (INFO, PASSAGES, VECTORS)
RECALL_QUERIES = 1000  # passages searched for to measure an approximate index's recall@10


@dataclass
class Hit:
    row: int
    score: float  # cosine similarity to the query


class Index:
    """A loaded index (:func:`build` wrote it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.info = json.loads((directory / INFO).read_text(encoding="utf-8"))
        self.vectors = np.load(directory / VECTORS, mmap_mode="r")
        self.passages = load_jsonl(directory / PASSAGES)
        if len(self.passages) != len(self.vectors):
            raise VerifyError(
                f"{directory}: {len(self.passages)} passages but {len(self.vectors)} vectors; "
                "rebuild the index (`dvc repro index`)"
            )
        self.hnsw = None
        if self.info["search"] == "hnsw":
            faiss = _faiss()
            self.hnsw = faiss.read_index(str(directory / HNSW), faiss.IO_FLAG_MMAP)
            self.hnsw.hnsw.efSearch = int(self.info["approximate"]["ef_search"])

    def __len__(self) -> int:
        return len(self.passages)

    def check_embedding(self, sha256s: Sequence[str]) -> None:
        """Refuse to serve with an embedding model other than the one that made the vectors."""
        made_by = self.info["embedding"]["sha256"]
        if made_by not in sha256s:
            raise VerifyError(
                f"{self.directory}: the index was embedded by {self.info['embedding']['file']} "
                f"({made_by}), which is not a file of the embedding model loaded with it; load "
                "the index built with that model (the embedding bundle carries its index)"
            )

    def search(self, query_vec: np.ndarray, k: int) -> list[Hit]:
        """The ``k`` passages most similar to ``query_vec`` (L2-normalized), best first: exact,
        or by the HNSW graph where the index has one."""
        query_vec = np.asarray(query_vec, dtype=np.float32)
        if self.hnsw is not None:
            scores, rows = self.hnsw.search(query_vec[None, :], min(k, len(self)))
            found = zip(rows[0], scores[0], strict=True)
            return [Hit(int(r), float(s)) for r, s in found if r >= 0]
        scores = np.asarray(self.vectors @ query_vec)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]  # by score, ties by row: deterministic
        return [Hit(int(i), float(scores[i])) for i in top]


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise InputError(
            "faiss",
            "an approximate (HNSW) corpus index needs faiss: pip install faiss-cpu "
            "(in sphana's serve extra)",
        ) from None
    return faiss


def approximate(
    matrix: np.ndarray, out: Path, m: int, ef_search: int, seed: int = 0
) -> dict[str, Any]:
    """Write an HNSW graph of ``matrix``'s rows (inner product, ``m`` links per node) to
    ``out`` and return its settings and its recall@10 against exact search, measured on up to
    :data:`RECALL_QUERIES` rows (seeded) as queries. Built on one thread: the same vectors give
    the same graph."""
    faiss = _faiss()
    faiss.omp_set_num_threads(1)
    graph = faiss.IndexHNSWFlat(matrix.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = max(2 * m, ef_search)
    graph.add(matrix)
    graph.hnsw.efSearch = ef_search
    rows = np.random.default_rng(seed).choice(len(matrix), min(RECALL_QUERIES, len(matrix)), False)
    k = min(10, len(matrix))
    found = graph.search(matrix[rows], k)[1]
    exact = np.argsort(-(matrix[rows] @ matrix.T), axis=1, kind="stable")[:, :k]
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact, strict=True)])
    faiss.write_index(graph, str(out))
    return {
        "library": f"faiss {faiss.__version__}",
        "m": m,
        "ef_search": ef_search,
        "recall@10": round(float(recall), 6),
        "recall_queries": len(rows),
    }


def relations_of(record: dict[str, Any]) -> list[Any] | None:
    """A passage's relations as :func:`sphana.graph_inputs.passage` takes them (None: the index
    was built without a relation extractor)."""
    found = record["relations"]
    if found is None:
        return None
    return [None if r is None else tuple(r) for r in found]


def build(
    chunks_file: Path,
    out_dir: Path,
    *,
    embed: Callable[[list[str]], np.ndarray],
    embedding_file: Path,
    embedding_rel: str,
    candidates: Callable[[str], list[dict[str, Any]]],
    relations: Callable[[list[dict[str, Any]]], list[Any]] | None,
    batch_size: int,
    approximate_above: int = 0,
    hnsw_m: int = 32,
    ef_search: int = 64,
) -> dict[str, Any]:
    """Index every chunk of ``chunks_file`` into ``out_dir`` (whole or not at all).

    Args:
        embed: texts -> L2-normalized vectors (the shipped embedding model).
        embedding_file, embedding_rel: the ONNX file ``embed`` runs, and its path in a release.
        candidates: a passage's text -> its candidate pairs (:func:`sphana.entities.detect`).
        relations: pairs -> the relation each states or None (the relation extractor), or None
            when the release has no extractor.
        approximate_above: from this many passages on, also an HNSW graph (:func:`approximate`,
            ``hnsw_m``, ``ef_search``) that search uses; 0: exact search at any size.
    """
    start = time.perf_counter()
    count = pair_count = relation_count = 0
    vectors: list[np.ndarray] = []
    with atomic_dir(out_dir) as tmp, open(tmp / PASSAGES, "w", encoding="utf-8") as out:
        batch: list[dict[str, Any]] = []

        def flush() -> None:
            nonlocal count, pair_count, relation_count
            vectors.append(np.asarray(embed([c["text"] for c in batch]), dtype=np.float32))
            for c in batch:
                pairs = [p for s in candidates(c["text"]) for p in s["pairs"]]
                found = relations(pairs) if relations is not None else None
                pair_count += len(pairs)
                relation_count += sum(r is not None for r in found or [])
                record = {k: c.get(k) for k in ("id", "doc_id", "title", "section", "start", "end")}
                record |= {
                    "text": c["text"],
                    "pairs": pairs,
                    "relations": None
                    if found is None
                    else [None if r is None else list(r) for r in found],
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += len(batch)
            batch.clear()

        for line_no, chunk in read_jsonl(chunks_file):
            missing = [k for k in ("id", "doc_id", "text") if k not in chunk]
            if missing:
                raise InputError(chunks_file, f"chunk without {', '.join(missing)}", line=line_no)
            batch.append(chunk)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        if not count:
            raise InputError(chunks_file, "no chunks to index; check what `ingest` reported")
        matrix = np.concatenate(vectors)
        dimension = int(matrix.shape[1])
        np.save(tmp / VECTORS, matrix)
        hnsw = None
        if approximate_above and count >= approximate_above:
            hnsw = approximate(matrix, tmp / HNSW, hnsw_m, ef_search)
        info = {
            "passages": count,
            "dimension": dimension,
            "search": "exact" if hnsw is None else "hnsw",
            **({"approximate": hnsw} if hnsw is not None else {}),
            "metric": "cosine",
            "embedding": {"file": embedding_rel, "sha256": f"sha256:{sha256_file(embedding_file)}"},
            "relations": relations is not None,
            "pairs": pair_count,
            "relations_found": relation_count,
        }
        (tmp / INFO).write_text(dumps_json(info), encoding="utf-8")
    return {**info, "seconds": round(time.perf_counter() - start, 2)}
