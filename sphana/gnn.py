"""Graph ranker: re-ranks a query's candidate passages with a gated graph neural network (GGNN)
over the entity/relation graph around each candidate.

**Candidate subgraphs** (:func:`build`). For every gold question (training: the questions held
out from embedding training, ``held_out.jsonl``; validation) — or, on a corpus without questions,
every pseudo-query (a sentence or heading whose own passage is the positive) — the candidates are
the top ``gnn.graph.top_k`` passages of its pool by embedding similarity plus ``hard_negatives``
non-relevant passages of the documents that hold the answer (the usual confusers). Each candidate
is a small graph, made by :mod:`sphana.graph_inputs` (its docstring has the layout), the
torch-free code a runtime builds its graphs with, so training and serving cannot drift apart:

- node 0: the passage, node 1: the query, nodes 2…: the entities the parser found in the
  passage (the detected candidate pairs of ``relations.jsonl``), at most ``max_entities``, then
  one node per relation the trained relation extractor finds in the passage between two of them
  (entity nodes only when the release has no relation extractor: ``relation_nodes: false`` in
  ``gnn.json``); gold relation labels are never used, so training sees the graphs a deployed
  system builds;
- node features: the trained embedding model's vector of the node's text, a node-type one-hot, the
  cosine to the query, whether the query names it, and the passage's retrieval rank as 1/(1+rank);
- label 1.0 for a relevant passage (gold question → passage annotations), else 0.0.

**Model** (:class:`GraphRanker`). A linear input projection to ``hidden``, ``GatedGraphConv``
(``layers`` propagation steps, messages along an edge weighted by a learned scalar per direction,
so direction matters), and a readout MLP on the passage node's final and initial states: one score
per candidate. Trained with the ListNet loss over each query's candidates.

A batch of candidates is one disjoint union of their graphs
(:func:`sphana.graph_inputs.ranker_inputs`): ``node_features [nodes, F]``, ``edge_index [2,
edges]``, ``edge_directions [edges]`` and ``readout_index [candidates]`` (the passage node of each
candidate) -> ``scores [candidates]``: the ONNX signature too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sphana.config import GnnConfig, GraphConfig, IngestConfig, PathsConfig, RuntimeConfig
from sphana.errors import InputError
from sphana.graph_inputs import (
    COSINE,
    EXTRA_FEATURES,
    NODE_TYPES,
    RANK,
    Passage,
    candidate_graphs,
    node_texts,
    passage,
    ranker_inputs,
    ranking_metrics,
)
from sphana.io import atomic_dir, load_jsonl, read_jsonl, read_skipped, write_json_atomic
from sphana.relation_inputs import NO_RELATION, Relation

MODEL_FILE = "model.safetensors"
META_FILE = "gnn.json"
# beside the graph datasets: whether they hold relation nodes (no extractor in the release: entity
# nodes only) and where their queries came from; train copies it into gnn.json for runtimes
GRAPHS_FILE = "graphs.json"


# --- graph construction --------------------------------------------------------------------------


def detected_pairs(relations_file: Path) -> list[dict[str, Any]]:
    """The candidate pairs of ``relations.jsonl`` whose entities the parser found: all a deployed
    system sees (gold pairs it missed, ``detected: false``, exist only for training)."""
    return [r for _, r in read_jsonl(relations_file) if r["detected"]]


def passage_pairs(ingest: IngestConfig) -> Callable[[str], list[dict[str, Any]]]:
    """The candidate entity pairs of a passage's text, found as ``sphana serve`` finds them in a
    candidate: :func:`sphana.entities.detect` with ``ingest``'s parser and
    ``ingest.max_pair_chars``."""
    from sphana.entities import detect, load_parser

    parser = load_parser(ingest.parser, ingest.spacy_model)

    def pairs_of(text: str) -> list[dict[str, Any]]:
        return [p for s in detect(text, ingest.max_pair_chars, parser) for p in s["pairs"]]

    return pairs_of


def passages_with_entities(
    chunks_file: Path,
    pairs_of: Callable[[str], list[dict[str, Any]]],
    relation_dir: Path | None,
    batch_size: int,
) -> tuple[dict[str, Passage], int, int]:
    """Every ingested passage with its entities and relations found as a runtime finds them in a
    candidate's text: the candidate pairs ``pairs_of(text)`` detects in the passage itself (the
    server's :func:`sphana.entities.detect`, never the section around it, which a runtime does
    not see) and the relation the extractor in ``relation_dir`` finds for each (None: no
    extractor, entity nodes only). Returns the passages by id, the number of candidate pairs and
    how many state a relation."""
    chunks = [c for _, c in read_jsonl(chunks_file)]
    pairs = [pairs_of(c["text"]) for c in chunks]
    flat = [p for ps in pairs for p in ps]
    found = extract_relations(relation_dir, flat, batch_size)  # every passage in one pass
    passages, offset = {}, 0
    for c, ps in zip(chunks, pairs, strict=True):
        relations = found[offset : offset + len(ps)]
        offset += len(ps)
        passages[c["id"]] = passage(c["id"], c["text"], ps, relations, doc_id=c["doc_id"])
    return passages, len(flat), sum(r is not None for r in found)


def extract_relations(
    relation_dir: Path | None, pairs: list[dict[str, Any]], batch_size: int
) -> list[Relation | None]:
    """The relation the trained extractor in ``relation_dir`` finds for each pair; None for every
    pair when the release has no extractor (``relation_dir`` None: skipped for want of labelled
    pairs): the graphs then hold entity nodes only, the same at build and at serve time."""
    from sphana import relation

    if relation_dir is None:
        return [None] * len(pairs)
    extractor, tokenizer, meta = relation.load_trained(relation_dir)
    return relation.extract(
        extractor, tokenizer, meta["labels"], pairs, batch_size, meta["max_seq_length"]
    )


def extraction_agreement(pairs: list[dict[str, Any]], relations: list[Relation | None]) -> dict:
    """How often the extracted relation of a gold-labelled pair is its gold relation (label and
    direction; ``no_relation`` = none extracted)."""
    labelled = [(p, r) for p, r in zip(pairs, relations, strict=True) if p["label"] is not None]

    def key(p: dict[str, Any]) -> tuple[int, int]:
        return (p["start"], p["end"])

    agree = sum(
        (r is None)
        if p["label"] == NO_RELATION
        else r is not None
        and (key(r[0]), key(r[1]), r[2]) == (key(p["e1"]), key(p["e2"]), p["label"])
        for p, r in labelled
    )
    return {
        "gold_pairs": len(labelled),
        "agreement": round(agree / len(labelled), 4) if labelled else None,
    }


def build(
    cfg: GraphConfig,
    embedding_dir: Path,
    relation_dir: Path,
    datasets_dir: Path,
    ingest_dir: Path,
    out_dir: Path,
    pairs_of: Callable[[str], list[dict[str, Any]]],
    batch_size: int = 64,
) -> dict[str, Any]:
    """Write ``gnn/{train,validation}.jsonl`` (one query with its candidates per line).

    The graphs hold what a deployed system knows: the entities ``pairs_of(text)`` detects in
    each passage (``ingest``'s parser and ``ingest.max_pair_chars``: what ``sphana serve`` runs
    on a candidate's text) and the relations the trained extractor (``relation_dir``) finds
    between them, never the gold relation labels.
    """
    from sphana.contracts import check_records
    from sphana.embedding import ENCODER_FILE, encode, load_trained
    from sphana.io import write_jsonl

    has_extractor = read_skipped(relation_dir) is None
    extractor_dir = relation_dir if has_extractor else None
    passages, candidate_pairs, extracted = passages_with_entities(
        ingest_dir / "chunks.jsonl", pairs_of, extractor_dir, batch_size
    )
    # how often the extractor agrees with gold labels: on the labelled pairs of the sections
    labelled = [p for p in detected_pairs(ingest_dir / "relations.jsonl") if p["label"]]
    agreement = extraction_agreement(
        labelled, extract_relations(extractor_dir, labelled, batch_size)
    )
    emb = datasets_dir / "embedding"
    validation_docs = {c["doc_id"] for c in load_jsonl(emb / "validation_corpus.jsonl")}
    # train on the queries the embedding never trained on (see sphana.datasets): on them its
    # similarity is as good as on unseen queries, so the ranker learns when to correct it. Gold
    # questions where a split has them; otherwise the documents' own pseudo-queries (a
    # sentence or a heading whose passage is the positive).
    splits: dict[str, dict[str, dict[str, Any]]] = {}
    graphs = {"relation_nodes": has_extractor, "queries": {}}
    for name, file in (("train", "held_out.jsonl"), ("validation", "validation.jsonl")):
        records = load_jsonl(emb / file)
        gold = any(r["kind"] == "gold" for r in records)
        graphs["queries"][name] = "gold questions" if gold else "pseudo-queries"
        if gold:
            records = [r for r in records if r["kind"] == "gold"]
        if cfg.max_queries and len(records) > cfg.max_queries:
            records = random.Random(0).sample(records, cfg.max_queries)
        splits[name] = {
            r["query_id"]: {"query": r["query"], "relevant": r["relevant_ids"]} for r in records
        }
        if not splits[name]:
            raise InputError(
                emb / file,
                f"no {name} queries for the graph ranker: add documents, or set "
                "dataset.held_out_fraction > 0 (default 0.25)",
            )

    encoder, tokenizer = load_trained(embedding_dir)
    max_length = json.loads((embedding_dir / ENCODER_FILE).read_text(encoding="utf-8"))[
        "max_seq_length"
    ]
    ids = sorted(passages)
    position = {pid: i for i, pid in enumerate(ids)}
    entity_texts = node_texts(list(passages.values()))
    queries = [(name, qid) for name, qs in splits.items() for qid in sorted(qs)]
    texts = (
        [passages[i].text for i in ids] + entity_texts + [splits[n][q]["query"] for n, q in queries]
    )
    vectors = encode(encoder, tokenizer, texts, batch_size, max_length)
    passage_vecs = vectors[: len(ids)]
    text_vecs = dict(
        zip(entity_texts, vectors[len(ids) : len(ids) + len(entity_texts)], strict=True)
    )
    query_vecs = dict(zip(queries, vectors[len(ids) + len(entity_texts) :], strict=True))

    report: dict[str, Any] = {}
    written: dict[str, list[dict[str, Any]]] = {}
    for name, qs in splits.items():
        in_validation = name == "validation"
        pool = [
            i
            for i, pid in enumerate(ids)
            if (passages[pid].doc_id in validation_docs) == in_validation
        ]
        records = []
        positives_missing = 0
        for qid in sorted(qs):
            q = qs[qid]
            qvec = query_vecs[(name, qid)]
            scores = passage_vecs[pool] @ qvec
            order = [pool[i] for i in np.argsort(-scores, kind="stable")]
            rank_of = {ids[j]: r for r, j in enumerate(order)}
            chosen = [ids[j] for j in order[: cfg.top_k]]
            relevant = set(q["relevant"])
            answer_docs = {passages[p].doc_id for p in relevant if p in passages}
            hard = [
                ids[j]
                for j in order[cfg.top_k :]
                if passages[ids[j]].doc_id in answer_docs and ids[j] not in relevant
            ][: cfg.hard_negatives]
            chosen += hard
            if not relevant & set(chosen):
                positives_missing += 1
                if name == "train":  # a list without a positive teaches nothing
                    pooled = [p for p in relevant if p in rank_of]
                    if not pooled:
                        raise InputError(
                            emb / "held_out.jsonl",
                            f"question {qid}: none of its relevant passages is in "
                            f"{ingest_dir / 'chunks.jsonl'}; rerun build_datasets",
                        )
                    chosen.append(min(pooled, key=rank_of.__getitem__))
            candidates = candidate_graphs(
                q["query"],
                qvec,
                [passages[pid] for pid in chosen],
                [passage_vecs[position[pid]] for pid in chosen],
                text_vecs,
                [rank_of[pid] for pid in chosen],
                cfg.max_entities,
                [1.0 if pid in relevant else 0.0 for pid in chosen],
            )
            records.append({"query_id": qid, "query": q["query"], "candidates": candidates})
        check_records(records, "gnn", out_dir / f"{name}.jsonl")
        written[name] = records
        report[name] = {
            "queries": len(records),
            "candidates": sum(len(r["candidates"]) for r in records),
            "nodes": sum(len(c["node_features"]) for r in records for c in r["candidates"]),
            "edges": sum(len(c["edge_index"]) for r in records for c in r["candidates"]),
            "queries_without_positive_in_top_k": positives_missing,
        }
    with atomic_dir(out_dir) as tmp:  # both splits or neither
        for name, records in written.items():
            write_jsonl(tmp / f"{name}.jsonl", records)
        write_json_atomic(tmp / GRAPHS_FILE, graphs)
    report["feature_dim"] = len(passage_vecs[0]) + EXTRA_FEATURES
    report["graphs"] = graphs
    report["relations"] = {
        "candidate_pairs": candidate_pairs,  # in the passages, as a runtime detects them
        "extracted": extracted,
        **agreement,
    }
    return report


# --- model ---------------------------------------------------------------------------------------


class GraphRanker(nn.Module):
    """``x -> linear -> GatedGraphConv (direction-weighted edges) -> MLP([h_L; h_0] at the
    passage node)``, plus the passage's embedding cosine to the query times a learned scale: the
    graph learns a correction to the first-stage ranking, starting from it."""

    def __init__(self, in_dim: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        from torch_geometric.nn import GatedGraphConv

        self.similarity_scale = nn.Parameter(torch.tensor(10.0))
        self.project = nn.Linear(in_dim, hidden)
        self.direction_weight = nn.Parameter(torch.ones(2))  # along / against the stated edge
        self.conv = GatedGraphConv(hidden, layers)
        self.readout = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(
        self,
        node_features: torch.Tensor,
        edge_index: torch.Tensor,
        edge_directions: torch.Tensor,
        readout_index: torch.Tensor,
    ) -> torch.Tensor:
        h0 = torch.tanh(self.project(node_features))
        h = self.conv(h0, edge_index, self.direction_weight[edge_directions])
        pooled = torch.cat([h[readout_index], h0[readout_index]], dim=-1)
        first_stage = node_features[readout_index, COSINE] * self.similarity_scale
        return self.readout(pooled).squeeze(-1) + first_stage


def collate(
    queries: list[dict[str, Any]],
) -> tuple[dict[str, torch.Tensor], list[int], torch.Tensor]:
    """The disjoint union of every candidate graph of ``queries``
    (:func:`sphana.graph_inputs.ranker_inputs`): model inputs, the number of candidates per
    query, and the labels."""
    candidates = [c for q in queries for c in q["candidates"]]
    inputs = {name: torch.from_numpy(array) for name, array in ranker_inputs(candidates).items()}
    counts = [len(q["candidates"]) for q in queries]
    return inputs, counts, torch.tensor([c["label"] for c in candidates], dtype=torch.float32)


def hide_first_stage(
    node_features: torch.Tensor, batch: list[dict[str, Any]], p: float
) -> torch.Tensor:
    """Training regularizer: for each query with probability ``p``, zero the first-stage signal
    (cosine to the query and retrieval rank) of all its nodes.

    The cosine alone already ranks most lists well, so the ranker would learn little beyond it;
    lists without it can only be ranked from the graph (the relations and entities the query
    names), and the scores learned there correct the first stage where both are present."""
    if p <= 0:
        return node_features
    nodes = torch.tensor([sum(len(c["node_features"]) for c in q["candidates"]) for q in batch])
    hide = torch.repeat_interleave((torch.rand(len(batch)) < p).float(), nodes)
    keep = (1 - hide).to(node_features.device).unsqueeze(-1)
    first_stage = torch.zeros(node_features.shape[1], device=node_features.device)
    first_stage[[COSINE, RANK]] = 1.0
    return node_features * (1 - first_stage) + node_features * first_stage * keep


def listnet_loss(scores: torch.Tensor, labels: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """ListNet (top-one probabilities): the cross-entropy between ``softmax(labels)`` and
    ``softmax(scores)`` over each query's candidates, averaged over queries."""
    losses = [
        -(torch.softmax(y, 0) * torch.log_softmax(s, 0)).sum()
        for s, y in zip(scores.split(counts), labels.split(counts), strict=True)
    ]
    return torch.stack(losses).mean()


def similarity_baseline(queries: list[dict[str, Any]]) -> dict[str, float]:
    """The same candidates ranked by embedding cosine alone (the passage node's feature)."""
    scores = [np.array([c["node_features"][0][COSINE] for c in q["candidates"]]) for q in queries]
    return ranking_metrics(scores, [candidate_labels(q) for q in queries])


def candidate_labels(q: dict[str, Any]) -> np.ndarray:
    return np.array([c["label"] for c in q["candidates"]], dtype=np.float64)


def batched_scores(
    score: Callable[[dict[str, torch.Tensor]], np.ndarray],
    queries: list[dict[str, Any]],
    batch: int = 64,
) -> list[np.ndarray]:
    """Each query's candidate scores, ``score`` run on the collated inputs of ``batch`` queries
    at a time (PyTorch or an ONNX Runtime session)."""
    out: list[np.ndarray] = []
    for i in range(0, len(queries), batch):
        inputs, counts, _ = collate(queries[i : i + batch])
        out.extend(np.split(score(inputs), np.cumsum(counts)[:-1]))
    return out


@torch.inference_mode()
def score_queries(
    model: nn.Module, queries: list[dict[str, Any]], device: torch.device | str = "cpu"
) -> list[np.ndarray]:
    model.eval()
    return batched_scores(
        lambda inputs: model(**{k: v.to(device) for k, v in inputs.items()}).float().cpu().numpy(),
        queries,
    )


# --- training ------------------------------------------------------------------------------------


def load_split(datasets_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The gnn train and validation queries, each candidate's arrays as numpy (fast batching)."""
    splits = []
    for name in ("train", "validation"):
        queries = load_jsonl(datasets_dir / f"{name}.jsonl")
        if not queries:
            raise InputError(datasets_dir / f"{name}.jsonl", "no queries; rerun build_graphs")
        for q in queries:
            for c in q["candidates"]:
                c["node_features"] = np.asarray(c["node_features"], dtype=np.float32)
                c["edge_index"] = np.asarray(c["edge_index"], dtype=np.int64).reshape(-1, 2)
                c["edge_directions"] = np.asarray(c["edge_directions"], dtype=np.int64)
        splits.append(queries)
    return splits[0], splits[1]


def save(model: GraphRanker, meta: dict[str, Any], out_dir: Path) -> None:
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE))
        write_json_atomic(tmp / META_FILE, meta)


def load_trained(model_dir: Path) -> tuple[GraphRanker, dict[str, Any]]:
    from safetensors.torch import load_file

    meta = json.loads((model_dir / META_FILE).read_text(encoding="utf-8"))
    model = GraphRanker(meta["feature_dim"], meta["hidden"], meta["layers"], dropout=0.0)
    model.load_state_dict(load_file(str(model_dir / MODEL_FILE)))
    return model.eval(), meta


def train(
    cfg: GnnConfig, runtime: RuntimeConfig, paths: PathsConfig, datasets_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Train the ranker on the shared runtime; save the best epoch (validation nDCG@10).

    Raises:
        GateError: when the model misses ``gnn.metric_threshold`` (nothing is written).
    """
    from sphana import runtime as rt

    device = rt.setup(runtime)
    train_queries, validation = load_split(datasets_dir)
    feature_dim = train_queries[0]["candidates"][0]["node_features"].shape[1]
    model = GraphRanker(feature_dim, cfg.hidden, cfg.layers, cfg.dropout)
    validation_labels = [candidate_labels(q) for q in validation]

    def loss(m: nn.Module, batch: list[dict[str, Any]], dev: torch.device) -> torch.Tensor:
        inputs, counts, labels = collate(batch)
        inputs["node_features"] = hide_first_stage(
            inputs["node_features"], batch, cfg.first_stage_dropout
        )
        scores = m(**{k: v.to(dev) for k, v in inputs.items()}).float()
        return listnet_loss(scores, labels.to(dev), counts)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return ranking_metrics(score_queries(m, validation, device), validation_labels)

    job = rt.Job.for_component(
        "gnn",
        cfg,
        ignore=("metric_threshold", "graph"),
        model=model,
        examples=train_queries,
        loss=loss,
        data_files=[datasets_dir / "train.jsonl", datasets_dir / "validation.jsonl"],
        evaluate=evaluate,
        select_metric="ndcg@10",
    )
    result = rt.fit_stage(job, runtime, device, paths)
    metrics: dict[str, Any] = {}
    if rt.rank() == 0:
        scores = evaluate(model)
        rt.check_gate("gnn", scores, "ndcg@10", cfg.metric_threshold)
        model.cpu().eval()
        meta = {
            "feature_dim": feature_dim,
            "hidden": cfg.hidden,
            "layers": cfg.layers,
            "node_types": list(NODE_TYPES),
            "readout": "passage node (node 0 of each candidate)",
            # false: the release has no relation extractor, graphs hold entity nodes only
            **json.loads((datasets_dir / GRAPHS_FILE).read_text(encoding="utf-8")),
        }
        save(model, meta, out_dir)
        rt.clear_checkpoints(Path(paths.checkpoints), "gnn")
        metrics = {
            "validation": scores,
            "baseline_embedding_similarity": similarity_baseline(validation),
            "train": {
                "queries": len(train_queries),
                "validation_queries": len(validation),
                **rt.summary(result, runtime, "ndcg@10"),
            },
        }
    rt.teardown()
    return metrics
