"""The corpus index and `query` end to end, on the tiny build's real exported models."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sphana import index as index_lib
from sphana import manifest as manifest_lib
from sphana import query
from sphana.errors import InputError, VerifyError
from sphana.io import load_jsonl
from sphana.serving.engine import Engine, SessionSettings


@pytest.fixture(scope="module")
def release(built_tiny) -> tuple[dict[str, Any], Path]:
    """The tiny build as a release manifest (every component, and the index), its root."""
    cfg, results = built_tiny
    artifacts = Path(cfg.paths.artifacts)
    components = {}
    for name in ("embedding", "relation", "gnn", "llm"):
        report = results[f"export_{name}"]
        version = getattr(cfg, name).version
        info = {
            "onnx_dir": artifacts / name / version / "onnx",
            "version": version,
            "evaluation": {},
            "parity": report,
            "model_config": report["model_config"],
        }
        components[name] = manifest_lib.component_entry(name, info, "tiny", artifacts)
    index = manifest_lib.index_entry(artifacts / "index", cfg.embedding.version, artifacts)
    manifest = {
        "version": "0.0.0",
        "components": components,
        "index": index,
        "provenance": {"stages": {}},
    }
    return manifest, artifacts


def engine_of(
    release: tuple[dict[str, Any], Path], *without: str, precision: str = "int8"
) -> Engine:
    manifest, root = copy.deepcopy(release[0]), release[1]
    for name in without:
        if name == "index":
            del manifest["index"]
        else:
            del manifest["components"][name]
    precisions = dict.fromkeys(manifest["components"], precision)
    return Engine(manifest, root, precisions, SessionSettings(intra_op_threads=1))


@pytest.fixture(scope="module")
def engine(release) -> Engine:
    return engine_of(release)


def test_the_index_holds_every_chunk_with_its_vector_and_relations(built_tiny, engine) -> None:
    cfg, results = built_tiny
    chunks = load_jsonl(Path(cfg.paths.ingest) / "chunks.jsonl")
    index = engine.index
    assert len(index) == len(chunks) == results["index"]["passages"]
    assert [p["id"] for p in index.passages] == [c["id"] for c in chunks]
    assert index.vectors.dtype == np.float32 and index.vectors.shape[1] == index.info["dimension"]
    assert np.allclose(np.linalg.norm(index.vectors, axis=1), 1.0, atol=1e-4)
    # row i is passage i, embedded by the shipped model (the server runs INT8: within its gate)
    rows = [0, len(chunks) // 2, len(chunks) - 1]
    served = engine.embedder.run([chunks[i]["text"] for i in rows])
    cosine = np.sum(served * np.asarray(index.vectors[rows]), axis=1)
    assert cosine.min() > 0.95
    # the candidate pairs and relations a server would find in each passage's text
    for record in index.passages[:20]:
        sentences = engine.candidates(record["text"])
        pairs = [p for s in sentences for p in s["pairs"]]
        assert record["pairs"] == pairs
        assert len(record["relations"]) == len(pairs)
    assert results["index"]["pairs"] > 0 and results["index"]["relations"] is True


def test_exact_search_is_the_brute_force_order(engine) -> None:
    index = engine.index
    rng = np.random.default_rng(0)
    for _ in range(5):
        q = rng.normal(size=index.info["dimension"]).astype(np.float32)
        q /= np.linalg.norm(q)
        hits = index.search(q, 7)
        expected = np.argsort(-(np.asarray(index.vectors) @ q), kind="stable")[:7]
        assert [h.row for h in hits] == expected.tolist()
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
    assert len(index.search(q, 10**6)) == len(index)


def test_an_index_of_another_embedding_model_is_refused(release, tmp_path: Path) -> None:
    manifest, root = copy.deepcopy(release[0]), release[1]
    (tmp_path / "embedding").symlink_to(root / "embedding")
    shutil.copytree(root / "index", tmp_path / "index")
    info = json.loads((tmp_path / "index" / index_lib.INFO).read_text())
    info["embedding"]["sha256"] = "sha256:" + "0" * 64  # made (so it says) by another model
    (tmp_path / "index" / index_lib.INFO).write_text(json.dumps(info))
    del manifest["components"]["gnn"], manifest["components"]["llm"]
    del manifest["components"]["relation"]
    with pytest.raises(VerifyError, match="not a file of the embedding model"):
        Engine(manifest, tmp_path, {}, SessionSettings(intra_op_threads=1))


def test_a_query_cites_corpus_passages_reranked_as_rerank_scores_them(built_tiny, release) -> None:
    cfg, _ = built_tiny
    engine = engine_of(release, precision="fp32")  # the index's vectors are the fp32 model's
    chunks = {c["id"]: c for c in load_jsonl(Path(cfg.paths.ingest) / "chunks.jsonl")}
    question = load_jsonl(Path(cfg.paths.ingest) / "questions.jsonl")[0]["question"]
    options = query.QueryOptions(top_k=4, candidates=8)
    result = query.answer(engine, question, options)
    assert result["ranked_by"] == "gnn" and isinstance(result["answer"], str)
    assert result["finish_reason"] in ("eos", "length")
    assert result["context_passages"] == [p["id"] for p in result["passages"][:3]]
    # the generator reads the best passage last, next to the question
    prompt = query.context_prompt(question, result["passages"], 3)
    at = [prompt.index(p["text"]) for p in result["passages"][:3]]
    assert at == sorted(at, reverse=True) and prompt.endswith(f"Question: {question}")
    cited = result["passages"]
    assert len(cited) == 4 and [p["rank"] for p in cited] == [0, 1, 2, 3]
    for p in cited:
        c = chunks[p["id"]]
        assert (p["document"], p["start"], p["end"], p["text"]) == (
            c["doc_id"],
            c["start"],
            c["end"],
            c["text"],
        )
    assert [p["score"] for p in cited] == sorted((p["score"] for p in cited), reverse=True)
    # one implementation: the index's precomputed passages score as /v1/rerank scores the texts
    # it is sent, given the retrieval ranks
    hits = engine.index.search(engine.embedder.run([question])[0], 8)
    texts = [engine.index.passages[h.row]["text"] for h in hits]
    scores, scorer = engine.rerank(question, texts, list(range(8)))
    assert scorer == "gnn"
    by_id = {engine.index.passages[h.row]["id"]: s for h, s in zip(hits, scores, strict=True)}
    for p in cited:
        assert p["score"] == pytest.approx(by_id[p["id"]], abs=1e-5)
    assert set(result["timings_ms"]) == {"embed", "retrieve", "rerank", "generate", "total"}


def test_a_release_without_a_component_degrades_as_documented(release) -> None:
    question = "Where is the Halvard Institute for Tidal Acoustics?"
    no_ranker = query.answer(engine_of(release, "gnn"), question)
    assert no_ranker["ranked_by"] == "embedding"
    assert all(p["score"] == p["retrieval_score"] for p in no_ranker["passages"])
    assert [p["retrieval_rank"] for p in no_ranker["passages"]] == list(range(5))
    no_generator = query.answer(engine_of(release, "llm"), question)
    assert no_generator["answer"] is None and "no generator" in no_generator["answer_skipped"]
    assert no_generator["passages"]
    with pytest.raises(query.QueryUnavailable, match="no corpus index"):
        query.answer(engine_of(release, "index"), question)


def test_int4_is_evaluated_only_where_the_release_has_a_4bit_generator(release) -> None:
    from sphana.pipeline import unavailable

    assert unavailable(engine_of(release, precision="int4"), "int4") is None
    manifest = copy.deepcopy(release[0])
    del manifest["components"]["llm"]["model_config"]["int4_file"]  # export_llm left it out
    precisions = dict.fromkeys(manifest["components"], "int4")
    engine = Engine(manifest, release[1], precisions, SessionSettings(intra_op_threads=1))
    assert engine.models["llm"].precision == "int8"  # what a server would load instead
    assert "no 4-bit generator" in unavailable(engine, "int4")
    assert unavailable(engine_of(release, "llm", precision="int4"), "int4")


def test_evaluate_scores_retrieval_answers_and_latency(engine) -> None:
    passages = engine.index.passages
    questions = [  # the passage's own text as the question: it retrieves itself first
        {
            "id": "a",
            "query": passages[0]["text"],
            "relevant": {passages[0]["id"]: 1.0},
            "answer": passages[0]["text"].split()[0],
        },
        {
            "id": "b",
            "query": passages[5]["text"],
            "relevant": {"not-in-the-corpus": 1.0},
            "answer": None,
        },
    ]
    report = query.evaluate(engine, questions, query.QueryOptions(candidates=10))
    assert report["questions"] == 2
    assert report["recall@5"] == 0.5 and report["recall@1"] <= 0.5
    assert 0 < report["ndcg@10"] <= 0.5  # the second question's passage is never retrieved
    assert report["answers"]["questions"] == 1
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p95"]


def test_bad_chunks_stop_the_index_with_the_line_and_write_nothing(tmp_path: Path) -> None:
    chunks = tmp_path / "chunks.jsonl"
    chunks.write_text('{"id": "a", "doc_id": "d", "text": "A text."}\n{"id": "b"\n')
    out = tmp_path / "index"
    with pytest.raises(InputError, match=r"chunks.jsonl:2: invalid JSON"):
        index_lib.build(
            chunks,
            out,
            embed=lambda texts: np.ones((len(texts), 4), dtype=np.float32) / 2,
            embedding_file=chunks,
            embedding_rel="embedding.onnx",
            candidates=lambda text: [],
            relations=None,
            batch_size=1,
        )
    assert not out.exists() and not list(tmp_path.glob(".index*"))


def test_above_the_threshold_search_uses_an_hnsw_graph_and_reports_its_recall(
    built_tiny, engine, tmp_path: Path
) -> None:
    cfg, _ = built_tiny
    exact = engine.index
    vector_of = {p["text"]: exact.vectors[i] for i, p in enumerate(exact.passages)}
    info = index_lib.build(
        Path(cfg.paths.ingest) / "chunks.jsonl",
        tmp_path / "index",
        embed=lambda texts: np.stack([vector_of[t] for t in texts]),
        embedding_file=Path(cfg.paths.ingest) / "chunks.jsonl",
        embedding_rel="embedding.onnx",
        candidates=lambda text: [],
        relations=None,
        batch_size=64,
        approximate_above=1,
        hnsw_m=16,
        ef_search=64,
    )
    assert info["search"] == "hnsw" and (tmp_path / "index" / index_lib.HNSW).is_file()
    measured = info["approximate"]
    assert measured["recall_queries"] == min(index_lib.RECALL_QUERIES, len(exact))
    assert measured["recall@10"] >= 0.9 and measured["library"].startswith("faiss")
    approximate = index_lib.Index(tmp_path / "index")
    assert approximate.hnsw is not None
    overlap = []
    for row in range(0, len(exact), max(1, len(exact) // 25)):
        q = np.asarray(exact.vectors[row])
        got = [h.row for h in approximate.search(q, 10)]
        assert exact.passages[got[0]]["text"] == exact.passages[row]["text"]  # itself first
        overlap.append(len(set(got) & {h.row for h in exact.search(q, 10)}) / 10)
    assert np.mean(overlap) >= 0.9
