"""Serving parity: what a running ``sphana serve`` answers on a build's validation data, next to
what the build's export gates measured on the same data (``target/metrics/export_*.json``).

The client side of the check: it runs where the build's ``target/`` is (the metrics come from
:mod:`sphana.gnn` and :mod:`sphana.relation`, which need the ``build`` extra); the server it
talks to needs nothing of the build. ``post(path, body) -> JSON`` is any HTTP client's POST to the
server. ``benchmarks/serve_parity.py`` prints these figures for a built release, and the tests
assert them on the tiny build.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sphana.io import load_jsonl

Post = Callable[[str, dict[str, Any]], Any]
TIE = 1e-3  # ranker scores closer than this are a tie (node features are rounded to 4 decimals)


def model_file(target: Path, entry: dict[str, Any], precision: str) -> Path:
    """The component file served at ``precision`` (the fp32 one where the release kept no INT8)."""
    return (
        target
        / "artifacts"
        / (entry["path"] if precision == "int8" else entry["model_config"]["fp32_path"])
    )


def exported(target: Path, stage: str, entry: dict[str, Any], precision: str) -> dict[str, Any]:
    """What export ``stage`` measured for the component file served at ``precision``."""
    report = json.loads((target / "metrics" / f"{stage}.json").read_text(encoding="utf-8"))
    int8 = precision == "int8" and entry["model_config"].get("quantized")
    return report["int8" if int8 else "fp32"]["metrics"]


def ranker(post: Post, target: Path, manifest: dict[str, Any], precision: str) -> dict[str, Any]:
    """Each validation query's candidates (their chunk texts and first-stage ranks) re-ranked by
    ``/v1/rerank``: nDCG@10 and MRR served and exported, and how many queries the server ranks
    exactly as the export's session ranks the build's graphs, and up to ties (the served order,
    read with the build's scores, never rises by more than :data:`TIE`)."""
    import onnxruntime as ort

    from sphana.graph_inputs import first_stage_rank, ranker_inputs, ranking_metrics

    entry = manifest["components"]["gnn"]
    session = ort.InferenceSession(
        str(model_file(target, entry, precision)), providers=["CPUExecutionProvider"]
    )
    chunks = {r["id"]: r["text"] for r in load_jsonl(target / "ingest/chunks.jsonl")}
    queries = load_jsonl(target / "datasets/gnn/validation.jsonl")
    scores, labels, same, up_to_ties = [], [], 0, 0
    for q in queries:
        cands = q["candidates"]
        ranks = [first_stage_rank(c) for c in cands]
        body = {"query": q["query"], "texts": [chunks[c["id"]] for c in cands], "ranks": ranks}
        served = np.zeros(len(cands))
        for r in post("/v1/rerank", body):
            served[r["index"]] = r["score"]
        scores.append(served)
        labels.append(np.array([c["label"] for c in cands]))
        build = session.run(None, ranker_inputs(cands))[0]
        order = np.argsort(-served, kind="stable")
        same += np.array_equal(order, np.argsort(-build, kind="stable"))
        up_to_ties += bool(np.all(np.diff(build[order]) <= TIE))
    metrics = ranking_metrics(scores, labels)
    shipped = exported(target, "export_gnn", entry, precision)
    return {
        "queries": len(queries),
        "served": metrics,
        "export": {k: shipped[k] for k in metrics},
        "identical": same,
        "identical_up_to_ties": up_to_ties,
    }


def relation(post: Post, target: Path, manifest: dict[str, Any], precision: str) -> dict[str, Any]:
    """Each validation example sent with its two entity spans (``/v1/relations``): the served
    label of the reading with the example's subject first; macro-F1 and accuracy served and
    exported."""
    from sphana.relation import classification_metrics

    entry = manifest["components"]["relation"]
    examples = load_jsonl(target / "datasets/relation/validation.jsonl")
    gold, predicted, unpaired = [], [], 0
    for x in examples:
        spans = [x["entity1"], x["entity2"]]
        entities = [{"start": e["start"], "end": e["end"]} for e in spans]
        body = {"text": x["text"], "entities": entities}
        pairs = post("/v1/relations", body)["pairs"]
        if len(pairs) != 1:
            unpaired += 1
            continue
        reading = "e1->e2" if x["entity1"]["start"] < x["entity2"]["start"] else "e2->e1"
        label_scores = pairs[0]["scores"][reading]
        gold.append(x["label"])
        predicted.append(max(label_scores, key=label_scores.get))
    served = classification_metrics(gold, predicted, entry["model_config"]["labels"])
    shipped = exported(target, "export_relation", entry, precision)
    keys = ("macro_f1", "accuracy")
    return {
        "examples": len(gold),
        "unpaired": unpaired,  # examples whose two spans the server did not pair
        "served": {k: served[k] for k in keys},
        "export": {k: shipped[k] for k in keys},
    }
