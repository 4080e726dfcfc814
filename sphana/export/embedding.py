"""Export of the embedding encoder: ``embedding.onnx`` (pooling + L2 norm in the graph), its INT8
sibling, the tokenizer files, and the parity gates that decide whether the export lands."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sphana.config import EmbeddingConfig, ExportConfig
from sphana.embedding import ValidationSet, load_trained, tokenize
from sphana.export import (
    TOKENIZER_FILES,
    check_parity,
    export_text_encoder,
    fp32_failures,
    parity_batch,
    quantize_gated,
    session,
    signature,
    text_model_spec,
)
from sphana.io import atomic_dir

# output not named "embedding": an internal node of the exported graph has that name
SPEC = text_model_spec("embedding", "embedding.onnx", "sentence_embedding")


def ort_embed(sess: Any, tokenizer: Any, max_length: int, batch_size: int = 64):
    def embed(texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            feed = {
                k: v.numpy()
                for k, v in tokenize(tokenizer, texts[i : i + batch_size], max_length).items()
            }
            out.append(sess.run(None, feed)[0])
        return np.concatenate(out)

    return embed


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


def int8_parity(
    reference_embed: Any,
    int8_embed: Any,
    validation: ValidationSet,
    cfg: ExportConfig,
    torch_metrics: dict[str, float],
) -> dict[str, Any]:
    texts = (validation.queries + validation.corpus_texts)[: cfg.parity.max_texts]
    ref, got = reference_embed(texts), int8_embed(texts)
    # both norms: a converted model need not normalize its output
    cosine = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    mean_cosine = float(cosine.mean())
    int8_metrics = validation.evaluate(int8_embed)
    retention = (
        int8_metrics["recall@5"] / torch_metrics["recall@5"]
        if torch_metrics["recall@5"] > 0
        else 1.0
    )
    p = cfg.parity
    cosine_ok = bool(np.isfinite(mean_cosine) and mean_cosine >= p.int8_min_mean_cosine)
    recall_ok = bool(retention >= p.int8_min_recall_retention)
    return {
        "mean_cosine": round(mean_cosine, 6),
        "min_cosine": round(float(cosine.min()), 6),
        "texts": len(texts),
        "min_mean_cosine": p.int8_min_mean_cosine,
        "recall@5": int8_metrics["recall@5"],
        "pytorch_recall@5": torch_metrics["recall@5"],
        "recall_retention": round(retention, 6),
        "min_recall_retention": p.int8_min_recall_retention,
        "metrics": int8_metrics,
        "cosine_passed": cosine_ok,
        "recall_passed": recall_ok,
        "passed": cosine_ok and recall_ok,
    }


def int8_failures(int8: dict[str, Any], cfg: ExportConfig) -> list[str]:
    """The INT8 gates :func:`int8_parity` missed, each with its value and key."""
    failures = []
    if not int8["cosine_passed"]:
        failures.append(
            f"INT8 mean cosine {int8['mean_cosine']:.4f} < "
            f"export.parity.int8_min_mean_cosine={cfg.parity.int8_min_mean_cosine}"
        )
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
    validation = ValidationSet.load(datasets_dir)
    max_length = emb_cfg.max_seq_length
    # two texts: torch.export refuses a dynamic batch axis traced at size 1
    example = tokenize(tokenizer, (validation.queries + validation.corpus_texts)[:2], max_length)
    with atomic_dir(onnx_dir) as tmp:
        fp32_path, int8_path = tmp / SPEC.file_name, tmp / SPEC.int8_file_name
        fusion = export_text_encoder(
            encoder, encoder.transformer, dict(example), SPEC, fp32_path, cfg.opset
        )
        for name in TOKENIZER_FILES:
            if (pytorch_dir / name).is_file():
                shutil.copy2(pytorch_dir / name, tmp / name)

        reference = torch_embed(encoder, tokenizer, max_length)
        torch_metrics = validation.evaluate(reference)
        fp32_session = session(fp32_path, threads)
        texts = validation.queries + validation.corpus_texts
        fp32 = fp32_parity(encoder, tokenizer, fp32_session, texts, cfg, max_length)
        fp32_metrics = validation.evaluate(ort_embed(fp32_session, tokenizer, max_length))

        def gate(path: Path) -> tuple[dict[str, Any], list[str]]:
            embed = ort_embed(session(path, threads), tokenizer, max_length)
            int8 = int8_parity(reference, embed, validation, cfg, torch_metrics)
            return int8, int8_failures(int8, cfg)

        quantization, int8, failures = quantize_gated(fp32_path, int8_path, cfg.quantization, gate)
        report = {
            "fp32": {**fp32, "metrics": fp32_metrics},
            "int8": int8,
            "pytorch": {"metrics": torch_metrics},
            "quantization": quantization,
            "fusion": fusion,
            "signature": signature(fp32_path),
            "files": {"fp32": SPEC.file_name, "int8": SPEC.int8_file_name},
            "sizes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size},
            "model_config": {
                "base_model": emb_cfg.base_model,
                "dimension": int(encoder.transformer.config.hidden_size),
                "max_seq_length": max_length,
                "pooling": "mean",
                "normalized": True,
                "output": SPEC.output_names[0],
                "tokenizer": "tokenizer.json",
                "opset": cfg.opset,
            },
        }
        check_parity("embedding", [*fp32_failures(fp32), *failures], cfg.quantization)
    return report
