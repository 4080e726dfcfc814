"""A question answered end to end on a loaded release (:class:`sphana.serving.engine.Engine`):
embed it, retrieve from the corpus index, re-rank the candidates with the graph ranker, and
generate the answer from the best passages in the chat template the generator was trained on.

Each step is the code the build measured: the embedding model's own tokenizer and graph, the
index's precomputed entity pairs and relations (:mod:`sphana.index`) turned into the ranker's
graphs by :mod:`sphana.graph_inputs`, and the prompt of the question-answer examples
(:func:`sphana.generation.qa_prompt`). A release without a component degrades:

- no ranker (``gnn``): passages in order of cosine similarity (``ranked_by: "embedding"``);
- no generator (``llm``): the cited passages and ``answer: null``;
- no index or no embedding model: :class:`QueryUnavailable` (nothing to retrieve from).

``sphana query`` and the server's ``POST /v1/query`` call :func:`answer`; the ``evaluate``
stage runs it on the held-out questions (:func:`evaluate`). Nothing here imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CANDIDATES = 20  # passages retrieved for the ranker to re-rank
CONTEXT_PASSAGES = 3  # the best passages given to the generator as its context
ANSWER_TOKENS = 32  # as the build's answer scores (sphana.llm.ANSWER_TOKENS)


class QueryUnavailable(Exception):
    """The release cannot answer queries (no index or no embedding model): what to load."""


@dataclass(frozen=True)
class QueryOptions:
    top_k: int = 5  # passages cited in the answer
    candidates: int = CANDIDATES
    context_passages: int = CONTEXT_PASSAGES
    max_new_tokens: int = ANSWER_TOKENS

    def __post_init__(self) -> None:
        from sphana.errors import ConfigError

        for name in ("top_k", "candidates", "context_passages", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)}; give 1 or more")


def check(engine: Any) -> None:
    if engine.index is None:
        raise QueryUnavailable(
            "the release has no corpus index; build one with `dvc repro index` (the manifest "
            "lists it under `index`) and load the release or the embedding bundle that has it"
        )
    if engine.embedder is None:
        raise QueryUnavailable("the release has no embedding model to embed the question with")


def ranker_passages(engine: Any, rows: Sequence[int]) -> list[Any]:
    """The index's passages at ``rows`` as the ranker's graphs read them: their precomputed
    entity pairs, and their relations where the ranker was trained with relation nodes."""
    from sphana.graph_inputs import passage
    from sphana.index import relations_of

    index = engine.index
    with_relations = engine.ranker_reads_relations and index.info["relations"]
    return [
        passage(r["id"], r["text"], r["pairs"], relations_of(r) if with_relations else None)
        for r in (index.passages[i] for i in rows)
    ]


def retrieve(engine: Any, question: str, options: QueryOptions = QueryOptions()) -> dict[str, Any]:
    """The passages :func:`answer` cites for ``question`` (best first), what ranked them and the
    time of each step in milliseconds; no answer."""

    check(engine)
    index = engine.index
    timings: dict[str, float] = {}
    clock = start = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = round((now - clock) * 1000, 3)
        clock = now

    query_vec = engine.embedder.run([question])[0]
    lap("embed")
    hits = index.search(query_vec, max(options.candidates, options.top_k))
    lap("retrieve")
    scores = [h.score for h in hits]
    ranked_by = "embedding"
    if "gnn" in engine.models and hits:
        passages = ranker_passages(engine, [h.row for h in hits])
        vectors = np.asarray(index.vectors[[h.row for h in hits]])
        scores = engine.graph_scores(question, query_vec, passages, vectors, range(len(hits)))
        ranked_by = "gnn"
        lap("rerank")
    order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))[: options.top_k]
    cited = []
    for rank, i in enumerate(order):
        record = index.passages[hits[i].row]
        cited.append(
            {
                "rank": rank,
                "id": record["id"],
                "document": record["doc_id"],
                "title": record.get("title"),
                "section": record.get("section"),
                "start": record.get("start"),
                "end": record.get("end"),
                "text": record["text"],
                "score": round(scores[i], 6),
                "retrieval_score": round(hits[i].score, 6),
                "retrieval_rank": i,
            }
        )
    timings["total"] = round((time.perf_counter() - start) * 1000, 3)
    return {"query": question, "passages": cited, "ranked_by": ranked_by, "timings_ms": timings}


def context_text(passages: Sequence[dict[str, Any]], count: int) -> str:
    """The best ``count`` of ``passages`` (best first) as the generator's context, one per line,
    in reverse: the best passage last, next to the question. A small model reads the passage
    nearest the question best ("lost in the middle"): the fine-tuned SmolLM2 answers 0.707 of the
    validation questions from its 3 best passages in this order and 0.677 best first, 0.805 and
    0.636 of the training questions (``benchmarks/query_answers.py``)."""
    return "\n".join(p["text"] for p in reversed(passages[:count]))


def context_prompt(question: str, passages: Sequence[dict[str, Any]], count: int) -> str:
    """The generator's user turn: the best ``count`` passages as context (:func:`context_text`)
    and the question, as the question-answer examples it was trained on."""
    from sphana.generation import qa_prompt

    return qa_prompt(context_text(passages, count), question)


def answer(engine: Any, question: str, options: QueryOptions = QueryOptions()) -> dict[str, Any]:
    """The answer to ``question`` with the passages it cites (:func:`retrieve`) and the time of
    each step in milliseconds."""
    found = retrieve(engine, question, options)
    result: dict[str, Any] = {"query": question, "answer": None, **found}
    timings = result.pop("timings_ms")
    cited = found["passages"]
    if engine.generator is not None and cited:
        start = time.perf_counter()
        prompt = context_prompt(question, cited, options.context_passages)
        decoding = engine.decoding(prompt, max_new_tokens=options.max_new_tokens)
        for _ in decoding:
            pass
        result["answer"] = decoding.text.strip()
        result["finish_reason"] = decoding.finish_reason
        result["context_passages"] = [p["id"] for p in cited[: options.context_passages]]
        generate = round((time.perf_counter() - start) * 1000, 3)
        total = timings.pop("total")  # the total last
        timings = {**timings, "generate": generate, "total": round(total + generate, 3)}
    else:
        result["answer_skipped"] = "the release has no generator (llm)"
    result["timings_ms"] = timings
    return result


def evaluate(
    engine: Any, questions: Sequence[dict[str, Any]], options: QueryOptions
) -> dict[str, Any]:
    """:func:`answer` for each question (``{"id", "query", "relevant": {passage id: gain}, "answer"
    (gold, or None)}``): retrieval after re-ranking (recall@1/5: a relevant passage among the
    first k; nDCG@10 over all relevant passages, those never retrieved counted as missed), answer
    scores (:func:`sphana.generation.answer_scores`) where there is a gold answer and a
    generator, and latency per question."""
    from sphana.generation import answer_scores
    from sphana.graph_inputs import ranking_metrics

    options = QueryOptions(**{**options.__dict__, "top_k": max(options.top_k, 10)})
    scores, labels, hits_at = [], [], {1: [], 5: []}
    latency, predictions, golds = [], [], []
    for q in questions:
        result = answer(engine, q["query"], options)
        latency.append(result["timings_ms"]["total"])
        cited = [p["id"] for p in result["passages"]]
        gains = [float(q["relevant"].get(pid, 0.0)) for pid in cited]
        seen = set(cited)
        missed = [g for pid, g in q["relevant"].items() if pid not in seen]
        labels.append(np.array(gains + missed, dtype=np.float64))
        scores.append(np.array([-float(r) for r in range(len(gains))] + [-np.inf] * len(missed)))
        for k, found in hits_at.items():
            found.append(any(g > 0 for g in gains[:k]))
        if q.get("answer") is not None and result["answer"] is not None:
            predictions.append(result["answer"])
            golds.append(q["answer"])
    out: dict[str, Any] = {
        "questions": len(questions),
        "recall@1": round(float(np.mean(hits_at[1])), 6) if questions else None,
        "recall@5": round(float(np.mean(hits_at[5])), 6) if questions else None,
        "ndcg@10": ranking_metrics(scores, labels)["ndcg@10"] if questions else None,
        "ranked_by": result["ranked_by"] if questions else None,
        "answers": {
            "questions": len(golds),
            **(answer_scores(predictions, golds) if golds else {}),
        },
        "latency_ms": {
            "p50": round(float(np.percentile(latency, 50)), 3) if latency else None,
            "p95": round(float(np.percentile(latency, 95)), 3) if latency else None,
        },
    }
    return out


def rerank_candidates(engine: Any, questions: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The ranker on each question's own candidate list (``candidates``: ``(passage id,
    first-stage rank, label)``, as ``build_graphs`` chose them), through the query path's
    re-ranking with the index's passages: nDCG@10 and MRR, what ``train_gnn`` and ``export_gnn``
    measure on the same lists."""
    from sphana.graph_inputs import ranking_metrics

    index = engine.index
    row_of = {p["id"]: i for i, p in enumerate(index.passages)}
    scores, labels = [], []
    for q in questions:
        rows = [row_of[pid] for pid, _, _ in q["candidates"]]
        passages = ranker_passages(engine, rows)
        query_vec = engine.embedder.run([q["query"]])[0]
        vectors = np.asarray(index.vectors[rows])
        ranks = [rank for _, rank, _ in q["candidates"]]
        found = engine.graph_scores(q["query"], query_vec, passages, vectors, ranks)
        scores.append(np.array(found))
        labels.append(np.array([label for _, _, label in q["candidates"]]))
    return ranking_metrics(scores, labels)
