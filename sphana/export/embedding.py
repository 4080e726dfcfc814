"""Export of the embedding encoder: ``embedding.onnx`` (pooling + L2 norm in the graph), its INT8
sibling, the tokenizer files, and the parity gates that decide whether the export lands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sphana.config import EmbeddingConfig, ExportConfig
from sphana.embedding import ENCODER_FILE, ValidationSet, load_trained, tokenize
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
from sphana.io import atomic_dir
from sphana.vectors import row_cosines

# output not named "embedding": an internal node of the exported graph has that name
SPEC = text_model_spec("embedding", "embedding.onnx", "sentence_embedding")


def ort_embed(sess: Any, tokenizer: Any, max_length: int, batch_size: int = 64):
    def embed(texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            out.append(
                sess.run(None, numpy_inputs(tokenizer, texts[i : i + batch_size], max_length))[0]
            )
        return np.concatenate(out)

    return embed


def numpy_inputs(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """The model's inputs for ``texts``, as ONNX Runtime takes them."""
    return {k: v.numpy() for k, v in tokenize(tokenizer, texts, max_length).items()}


def torch_embed(encoder: Any, tokenizer: Any, max_length: int, batch_size: int = 64):
    from sphana.embedding import encode

    return lambda texts: encode(encoder, tokenizer, texts, batch_size, max_length)


def fp32_parity(
    encoder: Any, tokenizer: Any, sess: Any, texts: list[str], cfg: ExportConfig, max_length: int
) -> dict[str, Any]:
    """Max abs diff over batches of several sizes, padded to their longest text and to
    ``max_length`` (extra padding must not change an embedding)."""
    checks = []
    ordered = sorted(texts, key=len)
    for size in cfg.parity.batch_sizes:
        # mix the shortest and the longest texts so each batch carries real padding
        batch = parity_batch(ordered, size)
        for padding in ("longest", "max_length"):
            enc = tokenizer(
                batch,
                padding=padding,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
                return_token_type_ids=True,
            )
            with torch.inference_mode():
                ref = encoder(**enc).numpy()
            got = sess.run(None, {k: v.numpy() for k, v in enc.items()})[0]
            checks.append(
                {
                    "batch": size,
                    "padding": padding,
                    "sequence": int(enc["input_ids"].shape[1]),
                    "max_abs_diff": float(np.max(np.abs(got - ref))),
                }
            )
    diffs = np.array([c["max_abs_diff"] for c in checks])
    worst = float(np.max(diffs))  # NaN propagates: a NaN output never passes
    return {
        "max_abs_diff": worst,
        "threshold": cfg.parity.fp32_max_abs_diff,
        "passed": bool(np.isfinite(worst) and worst <= cfg.parity.fp32_max_abs_diff),
        "checks": checks,
    }


def cosine_parity(
    reference_embed: Any, int8_embed: Any, texts: list[str], cfg: ExportConfig
) -> dict[str, Any]:
    """Per-text cosine of INT8 embeddings to PyTorch's, and whether their mean meets
    ``export.parity.int8_min_mean_cosine``."""
    texts = texts[: cfg.parity.max_texts]
    ref, got = reference_embed(texts), int8_embed(texts)
    cosine = row_cosines(ref, got)  # both norms: a converted model need not normalize
    mean_cosine = float(cosine.mean())
    return {
        "mean_cosine": round(mean_cosine, 6),
        "min_cosine": round(float(cosine.min()), 6),
        "texts": len(texts),
        "min_mean_cosine": cfg.parity.int8_min_mean_cosine,
        "cosine_passed": bool(
            np.isfinite(mean_cosine) and mean_cosine >= cfg.parity.int8_min_mean_cosine
        ),
    }


def int8_parity(
    reference_embed: Any,
    int8_embed: Any,
    validation: ValidationSet,
    cfg: ExportConfig,
    torch_metrics: dict[str, float],
) -> dict[str, Any]:
    """:func:`cosine_parity` and INT8 recall@5 retention on ``validation``."""
    cosine = cosine_parity(
        reference_embed, int8_embed, validation.queries + validation.corpus_texts, cfg
    )
    int8_metrics = validation.evaluate(int8_embed)
    retention = (
        int8_metrics["recall@5"] / torch_metrics["recall@5"]
        if torch_metrics["recall@5"] > 0
        else 1.0
    )
    recall_ok = bool(retention >= cfg.parity.int8_min_recall_retention)
    return {
        **cosine,
        "recall@5": int8_metrics["recall@5"],
        "pytorch_recall@5": torch_metrics["recall@5"],
        "recall_retention": round(retention, 6),
        "min_recall_retention": cfg.parity.int8_min_recall_retention,
        "metrics": int8_metrics,
        "recall_passed": recall_ok,
        "passed": cosine["cosine_passed"] and recall_ok,
    }


def cosine_failures(int8: dict[str, Any], cfg: ExportConfig) -> list[str]:
    """The mean-cosine gate of :func:`cosine_parity`, if missed, with its value and key."""
    if int8["cosine_passed"]:
        return []
    return [
        f"INT8 mean cosine {int8['mean_cosine']:.4f} < "
        f"export.parity.int8_min_mean_cosine={cfg.parity.int8_min_mean_cosine}"
    ]


def int8_failures(int8: dict[str, Any], cfg: ExportConfig) -> list[str]:
    """The INT8 gates :func:`int8_parity` missed, each with its value and key."""
    failures = cosine_failures(int8, cfg)
    if not int8["recall_passed"]:
        failures.append(
            f"INT8 recall@5 {int8['recall@5']:.4f} is {int8['recall_retention']:.2%} of "
            f"PyTorch's {int8['pytorch_recall@5']:.4f} < export.parity."
            f"int8_min_recall_retention={cfg.parity.int8_min_recall_retention}"
        )
    return failures


def run(
    emb_cfg: EmbeddingConfig,
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
    encoder, tokenizer = load_trained(pytorch_dir)
    info = json.loads((pytorch_dir / ENCODER_FILE).read_text(encoding="utf-8"))
    validation = ValidationSet.load(datasets_dir)

    def gate(reference: Any, embed: Any, torch_metrics: dict) -> tuple[dict, list[str]]:
        int8 = int8_parity(reference, embed, validation, cfg, torch_metrics)
        return int8, int8_failures(int8, cfg)

    texts = validation.queries + validation.corpus_texts
    with atomic_dir(onnx_dir) as tmp:
        for name in TOKENIZER_FILES:
            if (pytorch_dir / name).is_file():
                shutil.copy2(pytorch_dir / name, tmp / name)
        report, _ = export_encoder(
            encoder, tokenizer, texts, validation, gate, emb_cfg.max_seq_length, tmp, cfg, threads
        )
    report["model_config"] = {
        "base_model": info.get("base_model", emb_cfg.base_model),
        # a model embedding.import_from shipped: its path and the sha256 of its files
        **({"source": info["imported_from"]} if "imported_from" in info else {}),
        **report["model_config"],
    }
    return report


def export_encoder(
    encoder: Any,
    tokenizer: Any,
    texts: list[str],
    task: Any,
    gate: Any,
    max_length: int,
    out: Path,
    cfg: ExportConfig,
    threads: int = 0,
) -> tuple[dict[str, Any], Any]:
    """Export an :class:`~sphana.embedding.Encoder` into ``out`` (the caller makes it atomic
    and adds the tokenizer files), gate it and quantize it: what ``export_embedding`` and
    ``sphana convert --kind embedding`` both run.

    Args:
        texts: real inputs: the fp32 gate's batches and the INT8 sensitivity's feeds.
        task: the eval set (``evaluate(embed) -> metrics``) of PyTorch, fp32 and INT8.
        gate: ``gate(reference_embed, int8_embed, torch_metrics) -> (int8, failures)``.

    Returns:
        The report (``model_config`` without the source model) and the fp32 session.

    Raises:
        ParityError: naming the gate, the measured value and the threshold.
    """
    # two texts: torch.export refuses a dynamic batch axis traced at size 1
    example = tokenize(tokenizer, texts[:2], max_length)
    fp32_path, int8_path = out / SPEC.file_name, out / SPEC.int8_file_name
    fusion = export_text_encoder(encoder, dict(example), SPEC, fp32_path, cfg)
    reference = torch_embed(encoder, tokenizer, max_length)
    torch_metrics = task.evaluate(reference)
    fp32_session = session(fp32_path, threads)
    fp32 = fp32_parity(encoder, tokenizer, fp32_session, texts, cfg, max_length)
    fp32_metrics = task.evaluate(ort_embed(fp32_session, tokenizer, max_length))

    def int8_gate(path: Path) -> tuple[dict[str, Any], list[str]]:
        return gate(
            reference, ort_embed(session(path, threads), tokenizer, max_length), torch_metrics
        )

    feeds = sample_feeds(texts, lambda chunk: numpy_inputs(tokenizer, chunk, max_length))
    quantization, int8, failures = quantize_gated(
        fp32_path, int8_path, cfg.quantization, int8_gate, feeds
    )
    report = {
        "fp32": {**fp32, "metrics": fp32_metrics},
        "int8": int8,
        "pytorch": {"metrics": torch_metrics},
        "quantization": quantization,
        "fusion": fusion,
        **files_report(SPEC, fp32_path, int8_path),
        "model_config": {
            "dimension": int(encoder.transformer.config.hidden_size),
            "max_seq_length": max_length,
            "pooling": encoder.pooling,
            "normalized": encoder.normalize,
            "output": SPEC.output_names[0],
            "tokenizer": "tokenizer.json",
            "opset": cfg.opset,
        },
    }
    check_parity("embedding", [*fp32_failures(fp32), *failures], cfg.quantization)
    return report, fp32_session
