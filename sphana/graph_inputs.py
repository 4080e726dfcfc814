"""The graph ranker's inputs, shared by the build (:func:`sphana.gnn.build` writes them as
``gnn/{train,validation}.jsonl``) and a runtime: numpy only (no torch, no torch_geometric).

A runtime re-ranks a query's candidate passages as the build does:

1. each passage's entities and relations: :func:`passage` from the candidate pairs detected in
   its own text (:func:`sphana.entities.detect`, with ``ingest``'s parser and
   ``ingest.max_pair_chars``: the build does it per chunk, never from the section around it,
   which a runtime does not see) and the relation the extractor finds for each
   (:func:`sphana.relation_inputs.pair_relations`; ``None`` for all when the release has no
   relation extractor, ``relation_nodes: false`` in ``gnn.json``);
2. one graph per candidate: :func:`query_graphs` (the build: :func:`candidate_graphs`, with the
   vectors it computed for the whole split);
3. the model inputs of those graphs: :func:`ranker_inputs` -> one score per candidate.

**A candidate's graph** (:func:`candidate_graph`):

- node 0: the passage, node 1: the query, nodes 2…: the passage's entities (those also named in
  the query first, :func:`named_in`), at most ``max_entities``, then one node per relation between
  two of them (its label as words, :func:`relation_text`, e.g. "works at");
- edges (``edge_index`` as ``[src, dst]`` pairs) query→passage, passage→entity, query→entity (for
  an entity named in the query), subject→relation→object; every edge also appears reversed, with
  ``edge_directions`` 1 (0 = as stated);
- node features (``feature_dim`` = the embedding size + :data:`EXTRA_FEATURES`, each rounded to 4
  decimals): the embedding model's vector of the node's text (L2-normalized), a node-type one-hot
  (:data:`NODE_TYPES`), the cosine to the query (:data:`COSINE`), whether the query names it, and
  the passage's retrieval rank as ``1/(1+rank)`` (:data:`RANK`; 0 = the most similar passage);
- ``label`` (build only): 1.0 for a relevant passage, else 0.0.

**Model inputs** (:func:`ranker_inputs`): the disjoint union of a query's candidate graphs,
``node_features`` float32 ``[nodes, feature_dim]``, ``edge_index`` int64 ``[2, edges]``,
``edge_directions`` int64 ``[edges]``, ``readout_index`` int64 ``[candidates]`` (the passage node
of each candidate) -> ``scores`` float32 ``[candidates]`` of ``gnn_ranker.onnx``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sphana.relation_inputs import Relation

NODE_TYPES = ("passage", "query", "entity", "relation")
EXTRA_FEATURES = len(NODE_TYPES) + 3  # type one-hot, cosine to the query, named in query, rank
COSINE = -3  # position of the cosine-to-query feature, from the end of a node's features
RANK = -1  # position of the passage's first-stage rank feature 1/(1+rank)
DECIMALS = 4  # node features are rounded to this many decimals
INPUT_NAMES = ("node_features", "edge_index", "edge_directions", "readout_index")


@dataclass
class Passage:
    id: str
    doc_id: str
    text: str
    entities: list[str]  # distinct entity texts, in order of first mention
    relations: list[tuple[str, str, str]]  # (subject, object, label), in order of statement


def passage(
    id: str,
    text: str,
    pairs: Sequence[dict[str, Any]],
    relations: Sequence[Relation | None] | None = None,
    *,
    doc_id: str = "",
) -> Passage:
    """The passage ``text`` (a chunk of ``chunks.jsonl``, or a candidate sent to a server) with
    the entities of the candidate ``pairs`` detected in it (``{"e1", "e2"}`` entity spans in
    ``text``: :func:`sphana.entities.detect` of ``text``) and the ``relations`` the extractor
    found (one per pair, ``None`` for none; ``relations`` None: no extractor), both in text
    order whatever the order of the pairs: the same text gives the same graph, node for node."""
    first: dict[str, int] = {}  # entity text -> its first mention
    stated: dict[tuple[str, str, str], tuple[int, int]] = {}  # relation -> where it is stated
    if relations is None:
        relations = [None] * len(pairs)
    for pair, relation in zip(pairs, relations, strict=True):
        for e in (pair["e1"], pair["e2"]):
            first[e["text"]] = min(first.get(e["text"], e["start"]), e["start"])
        if relation is not None:
            key = (relation[0]["text"], relation[1]["text"], relation[2])
            at = (relation[0]["start"], relation[1]["start"])
            stated[key] = min(stated.get(key, at), at)
    entities = sorted(first, key=lambda e: (first[e], e))
    return Passage(id, doc_id, text, entities, sorted(stated, key=lambda r: (stated[r], r)))


def first_stage_rank(candidate: dict[str, Any]) -> int:
    """The retrieval rank a built candidate graph carries in its passage node (:data:`RANK`)."""
    return round(1 / candidate["node_features"][0][RANK] - 1)


def named_in(query: str, entity: str) -> bool:
    """Whether ``query`` names ``entity`` (as whole words, case-sensitive)."""
    return re.search(rf"(?<!\w){re.escape(entity)}(?!\w)", query) is not None


def relation_text(label: str) -> str:
    """What a relation node's vector embeds: its label as words (``works_at`` -> "works at")."""
    return label.replace("_", " ")


def node_texts(passages: Sequence[Passage]) -> list[str]:
    """The texts of the entity and relation nodes of ``passages``, sorted: those whose vectors
    :func:`candidate_graph` reads from ``text_vecs``."""
    return sorted(
        {e for p in passages for e in p.entities}
        | {relation_text(r[2]) for p in passages for r in p.relations}
    )


def candidate_graph(
    query: str,
    query_vec: np.ndarray,
    passage: Passage,
    passage_vec: np.ndarray,
    text_vecs: dict[str, np.ndarray],
    rank: int,
    max_entities: int,
    label: float | None = None,
    decimals: int = DECIMALS,
) -> dict[str, Any]:
    """One candidate's graph (see the module docstring for its layout): ``{"id",
    "node_features", "edge_index", "edge_directions"}`` as lists, plus ``"label"`` when given."""
    in_query = {e: named_in(query, e) for e in passage.entities}
    entities = sorted(passage.entities, key=lambda e: not in_query[e])[:max_entities]
    index = {e: i + 2 for i, e in enumerate(entities)}

    def node(vec: np.ndarray, kind: str, named: bool, rank_feature: float) -> list[float]:
        onehot = [float(kind == t) for t in NODE_TYPES]
        cosine = float(np.dot(vec, query_vec))
        values = [*vec.tolist(), *onehot, cosine, float(named), rank_feature]
        return [round(v, decimals) for v in values]

    features = [
        node(passage_vec, "passage", False, 1.0 / (1 + rank)),
        node(query_vec, "query", True, 0.0),
        *(node(text_vecs[e], "entity", in_query[e], 0.0) for e in entities),
    ]
    edges = [(1, 0)]
    edges += [(0, index[e]) for e in entities]
    edges += [(1, index[e]) for e in entities if in_query[e]]
    for subject, obj, relation in passage.relations:  # subject -> relation node -> object
        if subject in index and obj in index:
            features.append(node(text_vecs[relation_text(relation)], "relation", False, 0.0))
            edges += [(index[subject], len(features) - 1), (len(features) - 1, index[obj])]
    edge_index = [[s, d] for s, d in edges] + [[d, s] for s, d in edges]
    graph: dict[str, Any] = {
        "id": passage.id,
        "node_features": features,
        "edge_index": edge_index,
        "edge_directions": [0] * len(edges) + [1] * len(edges),
    }
    if label is not None:
        graph["label"] = label
    return graph


def candidate_graphs(
    query: str,
    query_vec: np.ndarray,
    passages: Sequence[Passage],
    passage_vecs: np.ndarray | Sequence[np.ndarray],
    text_vecs: dict[str, np.ndarray],
    ranks: Sequence[int],
    max_entities: int,
    labels: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """The graphs of a query's candidate ``passages`` (their vectors ``passage_vecs`` and
    retrieval ``ranks``; ``text_vecs`` holds the vector of every :func:`node_texts` text)."""
    return [
        candidate_graph(
            query,
            query_vec,
            p,
            passage_vecs[i],
            text_vecs,
            ranks[i],
            max_entities,
            None if labels is None else labels[i],
        )
        for i, p in enumerate(passages)
    ]


def query_graphs(
    query: str,
    passages: Sequence[Passage],
    ranks: Sequence[int],
    embed: Callable[[list[str]], np.ndarray],
    max_entities: int,
    *,
    query_vec: np.ndarray | None = None,
    passage_vecs: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The graphs of a query's candidate ``passages`` (``ranks``: their retrieval ranks in the
    pool, 0 = the most similar), as the build makes them: ``embed(texts) -> [len(texts), dim]``
    gives the embedding model's (L2-normalized) vectors, called once for the passages (unless
    ``passage_vecs`` are given), their entity and relation texts and the query (unless
    ``query_vec`` is given). ``max_entities``: ``gnn.graph.max_entities`` of the build."""
    texts = node_texts(passages)
    wanted = [
        *([] if passage_vecs is not None else [p.text for p in passages]),
        *texts,
        *([] if query_vec is not None else [query]),
    ]
    vectors = np.asarray(embed(wanted)) if wanted else np.zeros((0, 0), dtype=np.float32)
    if len(vectors) != len(wanted):
        raise ValueError(f"embed returned {len(vectors)} vectors for {len(wanted)} texts")
    if passage_vecs is None:
        passage_vecs, vectors = vectors[: len(passages)], vectors[len(passages) :]
    text_vecs = dict(zip(texts, vectors[: len(texts)], strict=True))
    if query_vec is None:
        query_vec = vectors[len(texts)]
    return candidate_graphs(
        query, query_vec, passages, passage_vecs, text_vecs, ranks, max_entities
    )


def ranker_inputs(candidates: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The model inputs of ``candidates`` (graphs of :func:`candidate_graph`, lists or arrays):
    their disjoint union, each graph's node indices offset by the nodes before it."""
    if not candidates:
        raise ValueError("no candidate graphs: the ranker scores one or more candidates")
    features, edges, directions, readout = [], [], [], []
    offset = 0
    for c in candidates:
        x = np.asarray(c["node_features"], dtype=np.float32)
        features.append(x)
        edges.append(np.asarray(c["edge_index"], dtype=np.int64).reshape(-1, 2) + offset)
        directions.append(np.asarray(c["edge_directions"], dtype=np.int64))
        readout.append(offset)  # node 0 is the passage
        offset += len(x)
    return {
        "node_features": np.concatenate(features),
        "edge_index": np.concatenate(edges).T.copy(),
        "edge_directions": np.concatenate(directions),
        "readout_index": np.array(readout, dtype=np.int64),
    }


def ranking_metrics(
    scores: list[np.ndarray], labels: list[np.ndarray], k: int = 10
) -> dict[str, float]:
    """Mean nDCG@k and MRR (binary or graded gains, ties broken by candidate order)."""
    ndcg, rr = [], []
    for s, y in zip(scores, labels, strict=True):
        order = np.argsort(-s, kind="stable")
        gains = (2.0 ** y[order] - 1)[:k]
        discounts = 1.0 / np.log2(np.arange(2, len(gains) + 2))
        ideal = (np.sort(2.0**y - 1)[::-1][:k] * discounts).sum()
        ndcg.append(float((gains * discounts).sum() / ideal) if ideal > 0 else 0.0)
        hits = np.flatnonzero(y[order] > 0)
        rr.append(1.0 / (hits[0] + 1) if len(hits) else 0.0)
    return {f"ndcg@{k}": round(float(np.mean(ndcg)), 6), "mrr": round(float(np.mean(rr)), 6)}
