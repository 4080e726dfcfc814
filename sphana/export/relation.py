"""Export of the relation extractor: ``relation_extraction.onnx`` (marker pooling and the
classification layer in the graph), its INT8 sibling, the tokenizer with the marker tokens,
``labels.json``, and the parity gates that decide whether the export lands."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sphana.config import ExportConfig, RelationConfig
from sphana.export import (
    TOKENIZER_FILES,
    check_parity,
    export_text_encoder,
    files_report,
    fp32_failures,
    parity_batch,
    quantize_gated,
    sample_feeds,
    session,
    text_model_spec,
)
from sphana.io import atomic_dir, write_json_atomic
from sphana.relation import (
    MARKERS,
    classification_metrics,
    load_split,
    load_trained,
    predict_logits,
    tokenize,
)

SPEC = text_model_spec("relation", "relation_extraction.onnx", "logits")
LABELS_FILE = "labels.json"


def numpy_inputs(tokenizer: Any, examples: list[dict], max_length: int) -> dict[str, np.ndarray]:
    """The model's inputs for ``examples``, as ONNX Runtime takes them."""
    return {k: v.numpy() for k, v in tokenize(tokenizer, examples, max_length).items()}


def ort_logits(sess: Any, tokenizer: Any, examples: list[dict], max_length: int, batch: int = 64):
    out = []
    for i in range(0, len(examples), batch):
        out.append(sess.run(None, numpy_inputs(tokenizer, examples[i : i + batch], max_length))[0])
    return np.concatenate(out)


def fp32_parity(
    model: Any, tokenizer: Any, sess: Any, examples: list[dict], cfg: ExportConfig, max_length: int
) -> dict[str, Any]:
    """Max abs logit diff over batches of several sizes, padded to their longest example and to
    ``max_length``."""
    ordered = sorted(examples, key=lambda x: len(x["text"]))
    checks = []
    for size in cfg.parity.batch_sizes:
        batch = parity_batch(ordered, size)
        for padding in ("longest", "max_length"):
            texts = tokenize(tokenizer, batch, max_length, padding)
            with torch.inference_mode():
                ref = model(**texts).numpy()
            got = sess.run(None, {k: v.numpy() for k, v in texts.items()})[0]
            checks.append(
                {
                    "batch": size,
                    "padding": padding,
                    "sequence": int(texts["input_ids"].shape[1]),
                    "max_abs_diff": float(np.max(np.abs(got - ref))),
                }
            )
    worst = float(np.max([c["max_abs_diff"] for c in checks]))  # NaN never passes
    return {
        "max_abs_diff": worst,
        "threshold": cfg.parity.fp32_max_abs_diff,
        "passed": bool(np.isfinite(worst) and worst <= cfg.parity.fp32_max_abs_diff),
        "checks": checks,
    }


def run(
    rel_cfg: RelationConfig,
    cfg: ExportConfig,
    pytorch_dir: Path,
    datasets_dir: Path,
    onnx_dir: Path,
    threads: int = 0,
) -> dict[str, Any]:
    """Export, quantize and gate. ``onnx_dir`` is written whole, and only if every gate passes.

    Raises:
        ParityError: naming the gate, the measured value and the threshold.
    """
    model, tokenizer, meta = load_trained(pytorch_dir)
    _, validation, _ = load_split(datasets_dir)
    with atomic_dir(onnx_dir) as tmp:
        for name in TOKENIZER_FILES:
            if (pytorch_dir / name).is_file():
                shutil.copy2(pytorch_dir / name, tmp / name)
        report, _, _ = export_classifier(
            model, tokenizer, validation, meta["labels"], meta["max_seq_length"], tmp, cfg, threads
        )
    config = report["model_config"]
    report["model_config"] = {
        "base_model": meta.get("base_model", rel_cfg.base_model),
        # a model relation.import_from shipped: its path and the sha256 of its files
        **({"source": meta["imported_from"]} if "imported_from" in meta else {}),
        **{k: config[k] for k in ("labels", "num_labels", "markers")},
        "pooling": meta["pooling"],
        **config,
    }
    return report


def export_classifier(
    model: Any,
    tokenizer: Any,
    examples: list[dict],
    labels: list[str],
    max_length: int,
    out: Path,
    cfg: ExportConfig,
    threads: int = 0,
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Export a relation classifier (entity-marked text -> ``logits``) into ``out`` (the caller
    makes it atomic and adds the tokenizer files) with ``labels.json``, gate it on the labelled
    ``examples`` and quantize it: what ``export_relation`` and ``sphana convert --kind
    relation`` both run.

    Returns:
        The report (``model_config`` without the source model and pooling), PyTorch's full
        classification metrics and the fp32 session.

    Raises:
        ParityError: naming the gate, the measured value and the threshold.
    """
    gold = [x["label"] for x in examples]

    def scores(logits: np.ndarray) -> dict[str, Any]:
        return classification_metrics(gold, [labels[i] for i in logits.argmax(1)], labels)

    # two examples: torch.export refuses a dynamic batch axis traced at size 1
    example = tokenize(tokenizer, examples[:2], max_length)
    fp32_path, int8_path = out / SPEC.file_name, out / SPEC.int8_file_name
    fusion = export_text_encoder(model, dict(example), SPEC, fp32_path, cfg)
    write_json_atomic(out / LABELS_FILE, {"labels": labels, "markers": list(MARKERS)})
    reference = predict_logits(model, tokenizer, examples, 64, max_length)
    fp32_session = session(fp32_path, threads)
    fp32_logits = ort_logits(fp32_session, tokenizer, examples, max_length)
    fp32 = fp32_parity(model, tokenizer, fp32_session, examples, cfg, max_length)
    torch_scores, fp32_scores = scores(reference), scores(fp32_logits)

    def gate(path: Path) -> tuple[dict[str, Any], list[str]]:
        int8_logits = ort_logits(session(path, threads), tokenizer, examples, max_length)
        return int8_parity(reference, int8_logits, scores, torch_scores, cfg.parity)

    feeds = sample_feeds(examples, lambda chunk: numpy_inputs(tokenizer, chunk, max_length))
    quantization, int8, failures = quantize_gated(
        fp32_path, int8_path, cfg.quantization, gate, feeds
    )
    report = {
        "fp32": {**fp32, "metrics": _summary(fp32_scores)},
        "int8": int8,
        "pytorch": {"metrics": _summary(torch_scores)},
        "quantization": quantization,
        "fusion": fusion,
        **files_report(SPEC, fp32_path, int8_path),
        "model_config": {
            "labels": labels,
            "num_labels": len(labels),
            "markers": list(MARKERS),
            "max_seq_length": max_length,
            "output": SPEC.output_names[0],
            "tokenizer": "tokenizer.json",
            "label_map": LABELS_FILE,
            "opset": cfg.opset,
        },
    }
    check_parity("relation", [*fp32_failures(fp32), *failures], cfg.quantization)
    return report, torch_scores, fp32_session


def int8_parity(
    reference: np.ndarray, int8_logits: np.ndarray, scores: Any, torch_scores: dict, p: Any
) -> tuple[dict[str, Any], list[str]]:
    """INT8 logits against PyTorch's: label agreement and macro-F1 retention, and the gates
    missed (each with its value and key)."""
    int8_scores = scores(int8_logits)
    agreement = float(np.mean(int8_logits.argmax(1) == reference.argmax(1)))
    retention = (
        int8_scores["macro_f1"] / torch_scores["macro_f1"] if torch_scores["macro_f1"] > 0 else 1.0
    )
    int8 = {
        "argmax_agreement": round(agreement, 6),
        "min_argmax_agreement": p.int8_min_argmax_agreement,
        "macro_f1": int8_scores["macro_f1"],
        "pytorch_macro_f1": torch_scores["macro_f1"],
        "f1_retention": round(retention, 6),
        "min_f1_retention": p.int8_min_f1_retention,
        "max_abs_diff": float(np.max(np.abs(int8_logits - reference))),
        "examples": len(reference),
        "metrics": _summary(int8_scores),
        "agreement_passed": agreement >= p.int8_min_argmax_agreement,
        "f1_passed": retention >= p.int8_min_f1_retention,
    }
    int8["passed"] = int8["agreement_passed"] and int8["f1_passed"]
    failures = []
    if not int8["agreement_passed"]:
        failures.append(
            f"INT8 argmax agreement {agreement:.2%} < "
            f"export.parity.int8_min_argmax_agreement={p.int8_min_argmax_agreement}"
        )
    if not int8["f1_passed"]:
        failures.append(
            f"INT8 macro-F1 {int8_scores['macro_f1']:.4f} is {retention:.2%} of PyTorch's "
            f"{torch_scores['macro_f1']:.4f} < export.parity.int8_min_f1_retention="
            f"{p.int8_min_f1_retention}"
        )
    return int8, failures


def _summary(scores: dict[str, Any]) -> dict[str, float]:
    return {"macro_f1": scores["macro_f1"], "accuracy": scores["accuracy"]}
