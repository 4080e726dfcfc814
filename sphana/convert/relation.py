"""``sphana convert --kind relation``: a relation classifier trained elsewhere.

A transformers sequence classifier (``*ForSequenceClassification``, BERT family) that reads a
sentence with its two entities marked as Sphana marks them, ``[E1]subject[/E1]`` and
``[E2]object[/E2]`` (:data:`sphana.relation_inputs.MARKERS`, special tokens of its tokenizer), and
gives one logit per label. The labels come from ``config.json``'s ``id2label`` and must include
``no_relation``, the label of a pair that states none; the runtime reads each candidate pair both
ways as the pipeline's extractor does (:mod:`sphana.relation_inputs`).

Gates, as the pipeline's export: fp32 logits against PyTorch over several batch sizes and
paddings; INT8 predicted-label agreement and macro-F1 retention on the labelled examples of
``--eval`` (required: JSON Lines of ``{"text", "entity1": {"start", "end"}, "entity2", "label"}``,
the rows of ``datasets/relation/*.jsonl``), whose macro-F1 the manifest states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from sphana.convert import Plan, backends, load_transformer, read_json
from sphana.errors import InputError
from sphana.relation_inputs import MARKERS, NO_RELATION

INT8_GATES = "predicted-label agreement, macro-F1 retention"
HEAD = "ForSequenceClassification"  # the config.json architectures a relation classifier has


class Classifier(nn.Module):
    """A transformers sequence classifier as the ONNX graph exposes it: the BERT inputs ->
    ``logits`` ``[batch, labels]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.transformer = model.base_model  # the encoder whose attention the export fuses

    def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits


def details(
    model: Path, model_dir: Path, config: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """The plan's labels, once the config is a sequence classifier with named labels that
    include ``no_relation`` and the tokenizer has the entity markers."""
    config_file = model_dir / "config.json"
    architectures = config.get("architectures") or []
    if not any(str(a).endswith(HEAD) for a in architectures):
        raise InputError(
            config_file,
            f"architectures {architectures}: --kind relation needs a sequence classifier "
            f"(*{HEAD}, as AutoModelForSequenceClassification saves it)",
        )
    id2label = config.get("id2label") or {}
    try:
        labels = [str(id2label[str(i)]) for i in range(len(id2label))]
    except KeyError:
        raise InputError(config_file, f"id2label {id2label}: ids must be 0..n-1") from None
    if len(labels) < 2 or all(label == f"LABEL_{i}" for i, label in enumerate(labels)):
        raise InputError(
            config_file,
            f"id2label {id2label} names no labels: save the classifier with its label names "
            "(config.id2label / label2id), including no_relation",
        )
    if NO_RELATION not in labels:
        raise InputError(
            config_file,
            f"labels {labels} lack {NO_RELATION!r}, the label of a pair that states no relation "
            "(the runtime reads every candidate pair, most state none): train with it",
        )
    _check_markers(model_dir)
    return {
        "pooling": "cls",
        "pooling_from": "the classifier's head",
        "labels": labels,
        "steps": [
            f"wrap: the classifier's logits over entity-marked text ({' '.join(MARKERS)}); "
            f"labels from id2label ({len(labels)})"
        ],
    }


def _check_markers(model_dir: Path) -> None:
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise InputError(
            model_dir,
            "no tokenizer.json: the runtime tokenizes with the tokenizers library; save the "
            "classifier's fast tokenizer (AutoTokenizer(..., use_fast=True).save_pretrained)",
        )
    tokenizer = read_json(tokenizer_file)
    known = {t.get("content") for t in tokenizer.get("added_tokens", [])}
    known |= set((tokenizer.get("model") or {}).get("vocab") or {})
    missing = [m for m in MARKERS if m not in known]
    if missing:
        raise InputError(
            tokenizer_file,
            f"lacks the entity markers {missing}: the runtime marks each pair as "
            f"{MARKERS[0]}subject{MARKERS[1]} ... {MARKERS[2]}object{MARKERS[3]}; fine-tune with "
            "them added as special tokens (tokenizer.add_special_tokens({'additional_special_"
            "tokens': [...]}) and model.resize_token_embeddings)",
        )


def load(p: Plan, trust_pickle: bool = False) -> tuple[Any, Any]:
    """The :class:`Classifier` (eval mode) and tokenizer of a plan."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(p.model_dir, local_files_only=True)
    model = load_transformer(p, AutoModelForSequenceClassification, tokenizer, trust_pickle)
    return Classifier(model).eval(), tokenizer


def eval_examples(eval_file: Path | None, labels: list[str]) -> list[dict[str, Any]]:
    """The labelled examples of ``eval_file``, each checked (spans inside the text, not
    overlapping; a label of the model's)."""
    from sphana.io import load_jsonl
    from sphana.relation_inputs import mark

    if eval_file is None:
        raise InputError(
            "--eval",
            "--kind relation needs labelled examples to gate on and to state the model's "
            'macro-F1: JSON Lines of {"text", "entity1": {"start", "end"}, "entity2": {...}, '
            '"label"} (the rows of datasets/relation/validation.jsonl)',
        )
    out = []
    for line, record in enumerate(load_jsonl(eval_file), 1):
        try:
            mark(record["text"], record["entity1"], record["entity2"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                eval_file, f'needs "text", "entity1" and "entity2" spans inside it ({e})', line
            ) from None
        if record.get("label") not in labels:
            raise InputError(
                eval_file, f"label {record.get('label')!r} is not one of the model's {labels}", line
            )
        out.append(record)
    if len(out) < 2:
        raise InputError(eval_file, "needs at least 2 labelled examples")
    return out


def export(
    p: Plan,
    model: Any,
    tokenizer: Any,
    out: Path,
    eval_file: Path | None,
    threads: int,
    cfg: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export, gate and quantize into ``out``: the report (with ``speed``, what the table
    measures) and the manifest's ``evaluation``.

    Raises:
        ParityError: naming each missed gate.
    """
    from sphana.export.relation import export_classifier, numpy_inputs
    from sphana.export.speed import speed_inputs

    labels = p.labels or []
    examples = eval_examples(eval_file, labels)
    tokenizer.save_pretrained(out)
    report, torch_scores, fp32_session = export_classifier(
        model, tokenizer, examples, labels, p.max_seq_length, out, cfg, threads
    )
    config = report["model_config"]
    report["model_config"] = {
        **{k: config[k] for k in ("labels", "num_labels", "markers")},
        "pooling": "cls",
        **config,
    }

    def feed(chunk: list[Any]) -> dict[str, Any]:
        return numpy_inputs(tokenizer, chunk, p.max_seq_length)

    summary = report["pytorch"]["metrics"]
    files = report["files"]
    report = {
        "eval": {"source": str(eval_file), "examples": len(examples)},
        **report,
        "speed": {
            "runs": backends(
                model, fp32_session, out / files["fp32"], out / files["int8"], threads
            ),
            **speed_inputs(examples, lambda x: len(x["text"]), feed),
            "metric": "macro-F1",
            "quality": {
                "pytorch": summary["macro_f1"],
                "onnx fp32": report["fp32"]["metrics"]["macro_f1"],
                "onnx int8": report["int8"]["macro_f1"],
            },
        },
    }
    evaluation = {
        "validation": summary,
        "per_class": torch_scores["per_class"],
        "onnx_fp32_validation": report["fp32"]["metrics"],
        "onnx_int8_validation": report["int8"]["metrics"],
    }
    return report, evaluation
