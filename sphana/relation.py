"""Relation extractor: an entity-marked sentence classifier on a transformer backbone.

An example is a sentence with two entity spans. :func:`sphana.relation_inputs.mark` wraps them in
marker tokens, ``[E1]subject[/E1]`` and ``[E2]object[/E2]`` (added to the tokenizer as special
tokens), and the classifier reads the hidden states at the ``[E1]`` and ``[E2]`` markers ("entity
start" pooling), concatenated, through a linear layer to one logit per label. The marker positions
are found inside the model from ``input_ids``, so the ONNX graph takes the plain tokenizer
outputs. If truncation cuts a marker off, its position falls back to ``[CLS]``.

The inputs are made by :mod:`sphana.relation_inputs` (:func:`tokenize` is its
:func:`~sphana.relation_inputs.relation_inputs` on the transformers tokenizer's backend) and the
predictions read by it (:func:`extract`): the torch-free code a runtime calls, so training,
``build_graphs`` and serving cannot drift apart.

Training runs on the shared runtime with class-weighted cross-entropy (``relation.class_weighting``)
and keeps the epoch with the best validation macro-F1, stopping after ``relation.patience`` epochs
without improvement.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sphana.config import ClassWeighting, PathsConfig, RelationConfig, RuntimeConfig
from sphana.errors import InputError
from sphana.io import atomic_dir, load_jsonl, write_json_atomic, write_live_without_steps
from sphana.relation_inputs import MARKERS, pair_examples, pair_relations, relation_inputs
from sphana.tokenization import Padding, backend

HEAD_FILE = "head.safetensors"  # the classification layer, beside the transformer's weights
META_FILE = "relation.json"  # labels, markers, pooling, max_seq_length
# the "kind" of an imported *ForSequenceClassification in META_FILE (a trained one has none)
SEQUENCE_CLASSIFIER = "sequence_classifier"


class RelationClassifier(nn.Module):
    """``transformer -> [h(E1); h(E2)] -> dropout -> linear -> logits``."""

    def __init__(
        self, transformer: nn.Module, num_labels: int, marker_ids: tuple[int, int], dropout: float
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.e1_id, self.e2_id = marker_ids
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * transformer.config.hidden_size, num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        # first position of each marker (0 = [CLS] when truncation removed it)
        e1 = (input_ids == self.e1_id).int().argmax(dim=1)
        e2 = (input_ids == self.e2_id).int().argmax(dim=1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = torch.cat([hidden[rows, e1], hidden[rows, e2]], dim=-1)
        return self.classifier(self.dropout(pooled))


def add_markers(tokenizer: Any) -> tuple[int, int]:
    """Add the marker tokens as special tokens (never split); returns the ids of [E1], [E2]."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    return tokenizer.convert_tokens_to_ids(MARKERS[0]), tokenizer.convert_tokens_to_ids(MARKERS[2])


def load_base(cfg: RelationConfig, num_labels: int) -> tuple[RelationClassifier, Any]:
    """The untrained classifier and its tokenizer (with markers), loaded offline."""
    from sphana.base_models import load_backbone

    transformer, tokenizer = load_backbone(
        cfg.base_model, "relation.base_model", cfg.init, cfg.random_arch
    )
    marker_ids = add_markers(tokenizer)
    transformer.resize_token_embeddings(len(tokenizer))
    return RelationClassifier(transformer, num_labels, marker_ids, cfg.dropout), tokenizer


def save(model: RelationClassifier, tokenizer: Any, meta: dict[str, Any], out_dir: Path) -> None:
    from safetensors.torch import save_file

    from sphana.embedding import write_vocab_txt

    with atomic_dir(out_dir) as tmp:
        model.transformer.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_vocab_txt(tokenizer, tmp / "vocab.txt")
        head = {k: v.detach().cpu().contiguous() for k, v in model.classifier.state_dict().items()}
        save_file(head, str(tmp / HEAD_FILE))
        write_json_atomic(tmp / META_FILE, meta)


def load_trained(model_dir: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A classifier saved by :func:`train` or :func:`import_model` (``pytorch/`` directory), in
    eval mode: both map ``(input_ids, attention_mask, token_type_ids)`` to ``logits`` over
    ``meta["labels"]``."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    meta = json.loads((model_dir / META_FILE).read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if meta.get("kind") == SEQUENCE_CLASSIFIER:  # relation.import_from shipped it
        from sphana.convert.relation import Classifier

        classifier = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True
        )
        return Classifier(classifier).eval(), tokenizer, meta
    transformer = AutoModel.from_pretrained(
        model_dir, add_pooling_layer=False, local_files_only=True
    )
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in (MARKERS[0], MARKERS[2]))
    model = RelationClassifier(transformer, len(meta["labels"]), ids, dropout=0.0)
    model.classifier.load_state_dict(load_file(str(model_dir / HEAD_FILE)))
    return model.eval(), tokenizer, meta


def tokenize(
    tokenizer: Any, examples: list[dict[str, Any]], max_length: int, padding: Padding = "longest"
) -> dict[str, torch.Tensor]:
    """Marked, tokenized examples (``padding``: ``longest`` in the batch, or ``max_length``):
    :func:`sphana.relation_inputs.relation_inputs` on the transformers tokenizer's backend."""
    backend_tokenizer, pad = backend(tokenizer)
    inputs = relation_inputs(backend_tokenizer, examples, max_length, pad, padding)
    return {name: torch.from_numpy(array) for name, array in inputs.items()}


@torch.inference_mode()
def predict_logits(
    model: RelationClassifier,
    tokenizer: Any,
    examples: list[dict[str, Any]],
    batch_size: int,
    max_length: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        features = tokenize(tokenizer, examples[i : i + batch_size], max_length)
        out.append(model(**{k: v.to(device) for k, v in features.items()}).float().cpu().numpy())
    return np.concatenate(out)


@torch.inference_mode()
def extract(
    model: RelationClassifier,
    tokenizer: Any,
    labels: list[str],
    pairs: list[dict[str, Any]],
    batch_size: int,
    max_length: int,
) -> list[tuple[dict[str, Any], dict[str, Any], str] | None]:
    """The relation each candidate pair (``relations.jsonl`` rows) states, as the deployed
    extractor would find it: ``(subject, object, label)`` or ``None``.

    A candidate pair is unordered (entities in text order) while the classifier reads ``entity1``
    as the subject, so both orders are scored; the more probable of the two predicted relations
    wins, and a pair whose both orders are predicted ``no_relation`` states none: the examples and
    the choice are :func:`sphana.relation_inputs.pair_examples` and
    :func:`~sphana.relation_inputs.pair_relations`, as at serve time (where ONNX logits go through
    :func:`~sphana.relation_inputs.softmax`).
    """
    probs = torch.softmax(
        torch.from_numpy(
            predict_logits(model, tokenizer, pair_examples(pairs), batch_size, max_length)
        ),
        dim=-1,
    ).numpy()
    return pair_relations(pairs, probs, labels)


# --- metrics and baselines -----------------------------------------------------------------------


def classification_metrics(
    gold: list[str], predicted: list[str], labels: list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 (over the labels that occur in ``gold`` or ``predicted``), per-class
    precision/recall/F1/support and the confusion matrix (rows: gold, columns: predicted)."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for g, p in zip(gold, predicted, strict=True):
        confusion[index[g], index[p]] += 1
    per_class = {}
    for label, i in index.items():
        tp, support, predicted_n = confusion[i, i], confusion[i].sum(), confusion[:, i].sum()
        precision = tp / predicted_n if predicted_n else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": round(float(precision), 6),
            "recall": round(float(recall), 6),
            "f1": round(float(f1), 6),
            "support": int(support),
        }
    present = [label for label, i in index.items() if confusion[i].sum() or confusion[:, i].sum()]
    macro = float(np.mean([per_class[label]["f1"] for label in present])) if present else 0.0
    return {
        "macro_f1": round(macro, 6),
        "accuracy": round(float(np.trace(confusion) / max(len(gold), 1)), 6),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def _between(example: dict[str, Any]) -> str:
    """The lower-cased words between the two entities, and which comes first: a pattern key."""
    a, b = example["entity1"], example["entity2"]
    first, second = (a, b) if a["start"] < b["start"] else (b, a)
    words = example["text"][first["end"] : second["start"]].lower().split()
    return ("e1>" if first is a else "e2>") + " ".join("0" if w.isdigit() else w for w in words)


def baselines(
    train: list[dict[str, Any]], validation: list[dict[str, Any]], labels: list[str]
) -> dict[str, Any]:
    """Macro-F1 on validation of two reference points that need no model:

    - ``majority``: always the most frequent training label;
    - ``rules``: pattern rules mined from the training split — the words between the two entities
      (and their order) map to that pattern's most frequent label; unseen patterns get the
      majority label.
    """
    majority = Counter(x["label"] for x in train).most_common(1)[0][0]
    patterns: dict[str, Counter] = {}
    for x in train:
        patterns.setdefault(_between(x), Counter())[x["label"]] += 1
    rules = {key: counts.most_common(1)[0][0] for key, counts in patterns.items()}
    gold = [x["label"] for x in validation]
    rule_predictions = [rules.get(_between(x), majority) for x in validation]
    return {
        "majority": {
            "label": majority,
            **_summary(classification_metrics(gold, [majority] * len(gold), labels)),
        },
        "rules": {
            "patterns": len(rules),
            "coverage": round(sum(_between(x) in rules for x in validation) / len(validation), 6),
            **_summary(classification_metrics(gold, rule_predictions, labels)),
        },
    }


def _summary(metrics: dict[str, Any]) -> dict[str, float]:
    return {"macro_f1": metrics["macro_f1"], "accuracy": metrics["accuracy"]}


def class_weights(
    train: list[dict[str, Any]], labels: list[str], mode: ClassWeighting
) -> torch.Tensor:
    """Cross-entropy weights: 1 (``none``), n / (k * count) (``inverse``) or its square root
    (``inverse_sqrt``, the default: rare labels count more without drowning the common ones)."""
    counts = Counter(x["label"] for x in train)
    n, k = len(train), len(labels)
    weights = []
    for label in labels:
        c = counts.get(label, 0)
        w = n / (k * c) if c else 0.0
        weights.append(
            1.0
            if mode == ClassWeighting.none
            else math.sqrt(w)
            if mode == ClassWeighting.inverse_sqrt
            else w
        )
    return torch.tensor(weights, dtype=torch.float32)


# --- training ------------------------------------------------------------------------------------


def load_split(datasets_dir: Path) -> tuple[list[dict], list[dict], list[str]]:
    import json

    train = load_jsonl(datasets_dir / "train.jsonl")
    validation = load_jsonl(datasets_dir / "validation.jsonl")
    labels_file = datasets_dir / "labels.json"
    if not train or not validation or not labels_file.is_file():
        raise InputError(
            datasets_dir,
            "relation train/validation split or labels.json missing; rerun build_datasets",
        )
    labels = json.loads(labels_file.read_text(encoding="utf-8"))["labels"]
    return train, validation, labels


def import_model(
    cfg: RelationConfig, paths: PathsConfig, datasets_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Ship ``relation.import_from`` (a sequence classifier trained elsewhere, read as ``sphana
    convert --kind relation`` reads it) instead of a fine-tune: its labels must be the dataset's;
    measured on the validation set, gated by ``relation.metric_threshold``, and saved to
    ``out_dir`` with its lineage (path and sha256 of its files), which the export puts in the
    manifest. Returns the metrics :func:`train` returns.

    Raises:
        ConfigError: ``import_from`` outside ``paths.imports/relation``.
        InputError: a model ``sphana convert`` would refuse, or labels other than the dataset's.
        GateError: below ``relation.metric_threshold``.
    """
    from sphana import runtime as rt
    from sphana.convert import import_plan
    from sphana.convert.relation import load
    from sphana.embedding import write_vocab_txt

    assert cfg.import_from is not None
    p, lineage = import_plan(
        "relation", cfg.import_from, paths.imports, max_seq_length=cfg.max_seq_length
    )
    train_examples, validation, labels = load_split(datasets_dir)
    theirs = list(p.labels or [])
    if sorted(theirs) != sorted(labels):
        raise InputError(
            Path(p.model_dir) / "config.json",
            f"id2label {theirs} is not the dataset's label set {labels} "
            f"({datasets_dir / 'labels.json'}): the pipeline's relations are those labels",
        )
    model, tokenizer = load(p)
    logits = predict_logits(model, tokenizer, validation, cfg.eval_batch_size, cfg.max_seq_length)
    predicted = [theirs[i] for i in logits.argmax(1)]
    scores = classification_metrics([x["label"] for x in validation], predicted, labels)
    rt.log(
        f"relation imported from {cfg.import_from} ({p.layout}): validation macro-F1 "
        f"{scores['macro_f1']:.4f}"
    )
    rt.check_gate("relation", scores, "macro_f1", cfg.metric_threshold)
    meta = {
        "labels": theirs,  # the classifier's own order: its logits
        "markers": list(MARKERS),
        "pooling": "cls",
        "max_seq_length": cfg.max_seq_length,
        "base_model": cfg.import_from,
        "kind": SEQUENCE_CLASSIFIER,
        "imported_from": lineage,
    }
    with atomic_dir(out_dir) as tmp:
        model.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_vocab_txt(tokenizer, tmp / "vocab.txt")
        write_json_atomic(tmp / META_FILE, meta)
    live = Path(paths.live) / "train_relation"
    write_live_without_steps(live, {k: scores[k] for k in ("macro_f1", "accuracy")})
    return {
        "imported": {"source": lineage},
        **_validation_report(train_examples, validation, labels, scores, predicted),
        "train": {"examples": 0, "validation_examples": len(validation), "imported": True},
    }


def _validation_report(
    train_examples: list[dict[str, Any]],
    validation: list[dict[str, Any]],
    labels: list[str],
    scores: dict[str, Any],
    predicted: list[str],
) -> dict[str, Any]:
    """What ``train_relation`` reports of the shipped model on the validation set: its scores,
    the baselines, the labels and one prediction per example (the confusion plot's rows)."""
    return {
        "validation": scores,
        "baselines": baselines(train_examples, validation, labels),
        "labels": labels,
        "predictions": [
            {"actual": x["label"], "predicted": y}
            for x, y in zip(validation, predicted, strict=True)
        ],
    }


def train(
    cfg: RelationConfig,
    runtime: RuntimeConfig,
    paths: PathsConfig,
    datasets_dir: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """Fine-tune the classifier on the shared runtime; save the best epoch to ``out_dir``.

    Returns validation metrics (macro-F1, per class, confusion), baselines and training figures.

    Raises:
        GateError: when the model misses ``relation.metric_threshold`` (nothing is written).
    """
    from sphana import runtime as rt

    if cfg.import_from is not None:
        return import_model(cfg, paths, datasets_dir, out_dir)
    device = rt.setup(runtime)
    train_examples, validation, labels = load_split(datasets_dir)
    if cfg.max_train_examples and len(train_examples) > cfg.max_train_examples:
        train_examples = random.Random(runtime.seed).sample(train_examples, cfg.max_train_examples)
    label_index = {label: i for i, label in enumerate(labels)}
    model, tokenizer = load_base(cfg, len(labels))
    weights = class_weights(train_examples, labels, cfg.class_weighting).to(device)

    def loss(m: nn.Module, batch: list[dict[str, Any]], dev: torch.device) -> torch.Tensor:
        features = tokenize(tokenizer, batch, cfg.max_seq_length)
        logits = m(**{k: v.to(dev) for k, v in features.items()}).float()
        target = torch.tensor([label_index[x["label"]] for x in batch], device=dev)
        return nn.functional.cross_entropy(logits, target, weight=weights)

    def evaluate(m: nn.Module) -> dict[str, float]:
        logits = predict_logits(
            m, tokenizer, validation, cfg.eval_batch_size, cfg.max_seq_length, device
        )
        scores = classification_metrics(
            [x["label"] for x in validation], [labels[i] for i in logits.argmax(1)], labels
        )
        return {"macro_f1": scores["macro_f1"], "accuracy": scores["accuracy"]}

    job = rt.Job.for_component(
        "relation",
        cfg,
        ignore=("eval_batch_size", "metric_threshold"),
        model=model,
        examples=train_examples,
        loss=loss,
        data_files=[
            datasets_dir / "train.jsonl",
            datasets_dir / "validation.jsonl",
            datasets_dir / "labels.json",
        ],
        evaluate=evaluate,
        select_metric="macro_f1",
    )
    result = rt.fit_stage(job, runtime, device, paths)
    metrics: dict[str, Any] = {}
    if rt.rank() == 0:
        logits = predict_logits(
            model, tokenizer, validation, cfg.eval_batch_size, cfg.max_seq_length, device
        )
        predicted = [labels[i] for i in logits.argmax(1)]
        scores = classification_metrics([x["label"] for x in validation], predicted, labels)
        rt.check_gate("relation", scores, "macro_f1", cfg.metric_threshold)
        model.cpu().eval()
        meta = {
            "labels": labels,
            "markers": list(MARKERS),
            "pooling": "entity_start",
            "max_seq_length": cfg.max_seq_length,
            "base_model": cfg.base_model,
            "init": cfg.init.value,
        }
        save(model, tokenizer, meta, out_dir)
        rt.clear_checkpoints(Path(paths.checkpoints), "relation")
        metrics = {
            **_validation_report(train_examples, validation, labels, scores, predicted),
            "train": {
                "examples": len(train_examples),
                "validation_examples": len(validation),
                "class_weighting": cfg.class_weighting.value,
                **rt.summary(result, runtime, "macro_f1"),
            },
        }
    rt.teardown()
    return metrics
