"""Corpus index search: exact (one matrix-vector product) against the HNSW graph the index
switches to above ``index.approximate_above`` passages, at growing corpus sizes, in one run.

    python benchmarks/index_search.py [--index target/artifacts/index] [--sizes 10000 100000]

The corpus of each size is the built index's real vectors repeated with Gaussian noise and
renormalized (clustered as real embeddings are; random unit vectors would be the worst case for a
graph). Per size: build time of the graph, its recall@10 against exact search on 1000 queries (as
the ``index`` stage measures it), and the search latency of both, one query at a time on one
thread. Asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from sphana.index import Index, approximate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=Path("target/artifacts/index"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.05)
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(1)
    base = np.asarray(Index(args.index).vectors)
    rng = np.random.default_rng(0)
    for size in args.sizes:
        rows = base[rng.integers(0, len(base), size)]
        matrix = rows + rng.normal(0, args.noise, rows.shape).astype(np.float32)
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            info = approximate(matrix, Path(tmp) / "hnsw.faiss", args.m, args.ef_search)
            built = time.perf_counter() - start
            graph = faiss.read_index(str(Path(tmp) / "hnsw.faiss"))
            graph.hnsw.efSearch = args.ef_search
        queries = matrix[rng.integers(0, size, 200)]
        start = time.perf_counter()
        for q in queries:
            np.argpartition(-(matrix @ q), 10)[:10]
        exact_ms = (time.perf_counter() - start) / len(queries) * 1000
        start = time.perf_counter()
        for q in queries:
            graph.search(q[None, :], 10)
        hnsw_ms = (time.perf_counter() - start) / len(queries) * 1000
        print(
            f"{size:>8d} passages x {matrix.shape[1]}: exact {exact_ms:.2f} ms/query | HNSW "
            f"(M={args.m}, efSearch={args.ef_search}) {hnsw_ms:.3f} ms/query, recall@10 "
            f"{info['recall@10']:.4f}, built in {built:.1f} s"
        )


if __name__ == "__main__":
    main()
