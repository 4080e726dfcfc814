"""The graph ranker: subgraphs, ListNet, ranking metrics, the model on edge cases, export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sphana import gnn, graph_inputs
from sphana.config import IngestConfig
from sphana.export.gnn import random_graphs, same_rankings
from sphana.gnn import (
    GraphRanker,
    collate,
    extraction_agreement,
    listnet_loss,
    passage_pairs,
    passages_with_entities,
    similarity_baseline,
)
from sphana.graph_inputs import EXTRA_FEATURES, Passage, candidate_graph, ranking_metrics
from sphana.io import load_jsonl


def _unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_candidate_subgraph_by_hand() -> None:
    passage = Passage(
        id="p#0",
        doc_id="p",
        text="Edda Marrowby founded the Halvard Lab in Halvard.",
        entities=["Edda Marrowby", "Halvard Lab", "Halvard"],
        relations=[
            ("Edda Marrowby", "Halvard Lab", "founded"),
            ("Halvard Lab", "Halvard", "located_in"),
        ],
    )
    vecs = {
        "Edda Marrowby": _unit(1, 0),
        "Halvard Lab": _unit(0, 1),
        "Halvard": _unit(1, 1),
        "founded": _unit(1, -1),
        "located in": _unit(-1, 1),
    }
    graph = candidate_graph(
        "Who founded the Halvard Lab?",
        _unit(0, 1),
        passage,
        _unit(1, 1),
        vecs,
        rank=3,
        max_entities=2,
        label=1.0,
    )
    # node 0 passage, 1 query, then entities named in the query first, capped at max_entities
    features = graph["node_features"]
    assert len(features) == 5  # passage, query, 2 entities, the relation between those two
    # "Halvard Lab" and "Halvard" (both named in the query) come first; "Edda Marrowby" is cut
    assert features[2][:2] == [0.0, 1.0]
    assert features[3][:2] == [0.7071, 0.7071]
    passage_row = features[0][2:]  # type one-hot, cosine to query, named in query, rank
    assert passage_row == [1.0, 0.0, 0.0, 0.0, round(math.sqrt(0.5), 4), 0.0, 0.25]
    assert features[1][2:] == [0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert features[4][:2] == [-0.7071, 0.7071]  # "located in"
    assert features[4][2:6] == [0.0, 0.0, 0.0, 1.0]
    assert features[2][-2] == 1.0 and features[3][-2] == 1.0  # named in the query
    # query->passage, passage->entities, query->named entities, subject->relation->object
    stated = [(1, 0), (0, 2), (0, 3), (1, 2), (1, 3), (2, 4), (4, 3)]
    assert graph["edge_index"] == [list(e) for e in stated] + [[d, s] for s, d in stated]
    assert graph["edge_directions"] == [0] * 7 + [1] * 7
    assert graph["label"] == 1.0 and graph["id"] == "p#0"


def test_passages_hold_the_entities_detected_in_them_and_extracted_relations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "Ann Berg joined the Lab in Town. The Lab hired Bo Renn."
    chunks = [{"id": "d#0", "doc_id": "d", "section_index": 0, "start": 0, "end": 55, "text": text}]
    (tmp_path / "chunks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chunks))
    pairs_of = passage_pairs(IngestConfig())
    found = pairs_of(text)
    assert [(p["e1"]["text"], p["e2"]["text"]) for p in found] == [
        ("Ann Berg", "Lab"),
        ("Ann Berg", "Town"),
        ("Lab", "Town"),
        ("Lab", "Bo Renn"),
    ]

    def extractor(_dir: Path | None, pairs: list[dict], _batch: int) -> list:
        # the extractor's view, not gold: the Lab hired Bo Renn, nothing else
        return [
            (p["e1"], p["e2"], "works_at") if p["e2"]["text"] == "Bo Renn" else None for p in pairs
        ]

    monkeypatch.setattr(gnn, "extract_relations", extractor)
    passages, candidates, extracted = passages_with_entities(
        tmp_path / "chunks.jsonl", pairs_of, tmp_path, batch_size=8
    )
    assert (candidates, extracted) == (4, 1)
    assert passages["d#0"].entities == ["Ann Berg", "Lab", "Town", "Bo Renn"]  # in text order
    assert passages["d#0"].relations == [("Lab", "Bo Renn", "works_at")]
    # the pairs' order does not change the passage
    reordered = graph_inputs.passage("d#0", text, found[::-1], extractor(None, found[::-1], 8))
    assert (reordered.entities, reordered.relations) == (
        passages["d#0"].entities,
        passages["d#0"].relations,
    )


def test_extraction_agreement_on_gold_pairs() -> None:
    ann, lab = {"text": "Ann", "start": 0, "end": 3}, {"text": "Lab", "start": 15, "end": 18}
    pairs = [{"e1": ann, "e2": lab, "label": "no_relation"}, {"e1": lab, "e2": ann, "label": None}]
    extracted = [(lab, ann, "works_at"), None]  # against the gold no_relation
    assert extraction_agreement(pairs, extracted) == {"gold_pairs": 1, "agreement": 0.0}
    assert extraction_agreement(pairs, [None, None])["agreement"] == 1.0


def test_listnet_against_a_hand_computation() -> None:
    scores = torch.tensor([2.0, 1.0, 0.0, 0.5, 0.5])
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    loss = listnet_loss(scores, labels, [3, 2])

    def by_hand(s: list[float], y: list[float]) -> float:
        p_y = [math.exp(v) / sum(math.exp(u) for u in y) for v in y]
        log_z = math.log(sum(math.exp(u) for u in s))
        return -sum(p * (v - log_z) for p, v in zip(p_y, s, strict=True))

    expected = (by_hand([2, 1, 0], [1, 0, 0]) + by_hand([0.5, 0.5], [0, 1])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ranking_metrics_by_hand() -> None:
    scores = [np.array([0.9, 0.8, 0.1]), np.array([0.2, 0.3])]
    labels = [np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0])]
    m = ranking_metrics(scores, labels)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 0.0) / 2, abs=1e-6)
    assert m["mrr"] == pytest.approx((1 / 2 + 0) / 2)


def test_similarity_baseline_reads_the_cosine_feature() -> None:
    def candidate(cosine: float, label: float) -> dict:
        row = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, cosine, 0.0, 0.5]
        return {"node_features": [row], "label": label}

    assert EXTRA_FEATURES == 7
    queries = [{"candidates": [candidate(0.1, 1.0), candidate(0.9, 0.0)]}]
    assert similarity_baseline(queries)["mrr"] == 0.5


def test_model_handles_edge_case_graphs_and_direction_matters() -> None:
    torch.manual_seed(0)
    model = GraphRanker(in_dim=8, hidden=16, layers=3, dropout=0.0).eval()
    graphs = random_graphs(np.random.default_rng(1).normal(size=(20, 8)), 12, seed=3)
    assert graphs[0]["node_features"].shape[0] == 1 and graphs[0]["edge_index"].shape == (2, 0)
    assert any(
        len({tuple(e) for e in g["edge_index"].T}) < g["edge_index"].shape[1] for g in graphs
    ), "some graph has a duplicate edge"
    assert any((g["edge_index"][0] == g["edge_index"][1]).any() for g in graphs), "self-loop"
    for g in graphs:
        with torch.inference_mode():
            scores = model(**{k: torch.from_numpy(v) for k, v in g.items()})
        assert scores.shape == (len(g["readout_index"]),) and torch.isfinite(scores).all()

    x = torch.randn(2, 8)
    with torch.no_grad():
        model.direction_weight.copy_(torch.tensor([1.0, 0.0]))  # messages only along edges
        forward = model(x, torch.tensor([[0], [1]]), torch.tensor([0]), torch.tensor([0, 1]))
        backward = model(x, torch.tensor([[0], [1]]), torch.tensor([1]), torch.tensor([0, 1]))
    assert not torch.allclose(forward, backward)


def test_collate_offsets_each_candidate_graph() -> None:
    def cand(n: int, label: float) -> dict:
        return {
            "node_features": [[float(i)] for i in range(n)],
            "edge_index": [[1, 0]],
            "edge_directions": [0],
            "label": label,
        }

    inputs, counts, labels = collate([{"candidates": [cand(2, 1.0), cand(3, 0.0)]}])
    assert counts == [2]
    assert inputs["edge_index"].tolist() == [[1, 3], [0, 2]]
    assert inputs["readout_index"].tolist() == [0, 2]
    assert labels.tolist() == [1.0, 0.0]


def test_same_rankings_ignores_order_among_near_ties() -> None:
    reference = [np.array([0.9, 0.5, 0.5 + 1e-7, 0.1]), np.array([0.3, 0.2])]
    assert (
        same_rankings(
            reference, [np.array([0.9, 0.5 + 1e-7, 0.5, 0.1]), np.array([0.3, 0.2])], 1e-4
        )
        == 1
    )
    swapped = [np.array([0.5, 0.9, 0.5, 0.1]), np.array([0.3, 0.2])]
    assert same_rankings(reference, swapped, 1e-4) == 0.5
    assert same_rankings(reference, [reference[0], np.array([0.2, 0.2])], 1e-4) == 0.5


def test_tiny_gnn_build(built_tiny) -> None:
    cfg, results = built_tiny
    validation = load_jsonl(Path(cfg.paths.datasets) / "gnn/validation.jsonl")
    assert len(validation) == results["build_graphs"]["validation"]["queries"] > 0
    for q in validation:
        assert all(c["label"] in (0.0, 1.0) for c in q["candidates"])
    metrics = results["train_gnn"]
    assert set(metrics["validation"]) == {"ndcg@10", "mrr"}
    assert "ndcg@10" in metrics["baseline_embedding_similarity"]
    relations = results["build_graphs"]["relations"]
    assert relations["candidate_pairs"] > relations["gold_pairs"] > 0
    assert 0 <= relations["agreement"] <= 1

    report = results["export_gnn"]
    assert report["fp32"]["passed"] and report["fp32"]["random_graphs"] >= 50
    assert report["fp32"]["max_abs_diff"] <= 1e-4 and report["fp32"]["identical_rankings"] == 1.0
    shapes = {t["name"]: t["shape"] for t in report["signature"]["inputs"]}
    assert shapes["edge_index"] == [2, "edges"] and shapes["node_features"][0] == "nodes"
    onnx = Path(cfg.paths.artifacts) / "gnn" / cfg.gnn.version / "onnx"
    assert (onnx / "gnn_ranker.onnx").is_file()
    if report["int8"]["kept"]:
        assert (onnx / "gnn_ranker.int8.onnx").is_file()
    else:
        assert not (onnx / "gnn_ranker.int8.onnx").exists()
        assert "ranking" in report["quantization"]["skipped"]
