"""``sphana convert --kind embedding``: a BERT-family sentence encoder (MiniLM, BGE, E5, GTE ...).

* a **sentence-transformers directory**: ``Transformer``, ``Pooling`` and an optional
  ``Normalize`` module. The pooling mode and the normalization are read from it and built into
  the graph;
* a **transformers directory** or a **state dict**: the pooling must be given (``--pooling``);
  it is never defaulted.

Gates, as the pipeline's export: fp32 against PyTorch over several batch sizes and paddings;
INT8 mean cosine and recall@5 retention on query–passage pairs (``--eval`` JSON Lines of
``{"query", "positive"}``, else the general set of real text in :mod:`sphana.general_eval`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sphana.convert import Plan, backends, load_transformer, read_json
from sphana.embedding import POOLING_MODES
from sphana.errors import InputError
from sphana.vectors import row_cosines

INT8_GATES = "mean cosine, recall@5 retention"
ST_MODULES = {"Transformer": "transformer", "Pooling": "pooling", "Normalize": "normalize"}
# sentence-transformers' pooling modes -> ours: "pooling_mode" of its Pooling config (v6), or
# the boolean keys of earlier versions
ST_POOLING_MODES = {
    "mean": "mean",
    "cls": "cls",
    "max": "max",
    "lasttoken": "lasttoken",
    "weightedmean": "weightedmean",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
}
ST_POOLING = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


def sentence_transformers(model: Path) -> tuple[Path, str, bool]:
    """The transformer directory, pooling mode and normalization of a sentence-transformers
    directory; anything but Transformer, Pooling and Normalize is refused."""
    modules = read_json(model / "modules.json", list)
    found: dict[str, Path] = {}
    for module in modules:
        kind = str(module.get("type", ""))
        role = (
            ST_MODULES.get(kind.rsplit(".", 1)[-1]) if kind.startswith("sentence_trans") else None
        )
        if role is None:
            raise InputError(
                model / "modules.json",
                f"module {kind!r} is not supported; supported: sentence-transformers' "
                + ", ".join(ST_MODULES),
            )
        found[role] = model / module.get("path", "")
    if "transformer" not in found or "pooling" not in found:
        raise InputError(model / "modules.json", "needs a Transformer and a Pooling module")
    pooling_file = found["pooling"] / "config.json"
    pooling_config = read_json(pooling_file)
    if "pooling_mode" in pooling_config:
        named = pooling_config["pooling_mode"]
        named = named if isinstance(named, list) else [named]
        modes = [ST_POOLING_MODES.get(str(m), f"unknown {m!r}") for m in named]
    else:
        modes = [mode for key, mode in ST_POOLING.items() if pooling_config.get(key)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise InputError(
            pooling_file,
            f"pooling modes {modes or 'none'}: exactly one of {', '.join(ST_POOLING_MODES)} is "
            "supported (concatenated poolings are not)",
        )
    return found["transformer"], modes[0], "normalize" in found


def details(
    model: Path, model_dir: Path, config: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """The plan's pooling and normalization: ``--pooling``/``--normalize``, else what a
    sentence-transformers directory says; a transformers model without ``--pooling`` stops."""
    pooling, normalize, st = options["pooling"], options["normalize"], options["st"]
    if pooling is not None:
        if pooling not in POOLING_MODES:
            raise InputError(model, f"--pooling {pooling}: use one of {', '.join(POOLING_MODES)}")
        pooling_from = "--pooling"
    elif st is not None:
        pooling, pooling_from = st[0], "1_Pooling/config.json"
    else:
        raise InputError(
            model,
            "a transformers model does not say how to pool its token embeddings into one "
            f"vector; pass --pooling ({' | '.join(POOLING_MODES)}), e.g. the pooling its "
            "model card names. Sphana never picks one silently",
        )
    if normalize is None:
        normalize = bool(st[1]) if st is not None else False
    return {
        "pooling": pooling,
        "pooling_from": pooling_from,
        "normalize": bool(normalize),
        "steps": [
            f"wrap: {pooling} pooling{' + L2 normalization' if normalize else ''} inside the graph"
        ],
    }


def load(p: Plan, trust_pickle: bool = False) -> tuple[Any, Any]:
    """The :class:`~sphana.embedding.Encoder` (eval mode) and tokenizer of a plan."""
    from transformers import AutoModel, AutoTokenizer

    from sphana.embedding import Encoder

    tokenizer = AutoTokenizer.from_pretrained(p.model_dir, local_files_only=True)
    transformer = load_transformer(
        p, AutoModel, tokenizer, trust_pickle, skip=("pooler.",), add_pooling_layer=False
    )
    return Encoder(transformer, p.pooling, p.normalize).eval(), tokenizer


@dataclass
class ScoredPairs:
    """Sentence pairs with a similarity score (STS-style): the task metric is the Spearman
    correlation of the embeddings' cosine with the scores."""

    first: list[str]
    second: list[str]
    scores: list[float]

    @property
    def texts(self) -> list[str]:
        return self.first + self.second

    def evaluate(self, embed: Any) -> dict[str, float]:
        from sphana.embedding import unit

        a, b = unit(embed(self.first)), unit(embed(self.second))
        cosine = np.sum(a * b, axis=1)
        return {
            "spearman": round(spearman(cosine, np.asarray(self.scores)), 6),
            "mean_cosine": round(float(cosine.mean()), 6),
        }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        rank = np.empty(len(x))
        rank[order] = np.arange(len(x))
        _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
        return (np.bincount(group, weights=rank) / counts)[group]

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


RETRIEVAL_KEYS = ("query", "positive")
SIMILARITY_KEYS = ("sentence1", "sentence2", "score")


def eval_set(eval_file: Path | None, pairs: int = 400) -> tuple[Any, str]:
    """What to gate on, and where it came from: ``eval_file``'s query–passage pairs
    (``{"query", "positive"}``: a :class:`~sphana.embedding.ValidationSet`, recall@5) or scored
    sentence pairs (``{"sentence1", "sentence2", "score"}``: :class:`ScoredPairs`, Spearman), as
    its first line says; without one, query–passage pairs of real text
    (:mod:`sphana.general_eval`)."""
    from sphana import general_eval
    from sphana.embedding import ValidationSet

    if eval_file is None:
        general = general_eval.build(pairs)
        selected = [*general.selection, *general.report]
        return ValidationSet.from_pairs(selected), "general set (stdlib)"
    from sphana.io import load_jsonl

    records = load_jsonl(eval_file)
    keys = RETRIEVAL_KEYS if records and "query" in records[0] else SIMILARITY_KEYS
    for line, record in enumerate(records, 1):
        kinds = (str, str, (int, float)) if keys == SIMILARITY_KEYS else (str, str)
        if not all(isinstance(record.get(k), t) for k, t in zip(keys, kinds, strict=True)):
            raise InputError(
                eval_file,
                f"needs {', '.join(keys)} (query-passage pairs: query, positive; scored "
                "sentence pairs: sentence1, sentence2 and a numeric score)",
                line,
            )
    if len(records) < 2:
        raise InputError(eval_file, "needs at least 2 pairs")
    if keys == SIMILARITY_KEYS:
        scored = ScoredPairs(
            [r["sentence1"] for r in records],
            [r["sentence2"] for r in records],
            [float(r["score"]) for r in records],
        )
        return scored, str(eval_file)
    found = [general_eval.Pair(f"{i}", r["query"], r["positive"]) for i, r in enumerate(records)]
    return ValidationSet.from_pairs(found), str(eval_file)


def task_texts(task: Any) -> list[str]:
    return task.texts if isinstance(task, ScoredPairs) else task.queries + task.corpus_texts


def int8_gate(
    reference: Any, embed: Any, task: Any, cfg: Any, torch_metrics: dict[str, float]
) -> tuple[dict[str, Any], list[str]]:
    """The INT8 gates of the eval set's task: mean cosine to PyTorch, and recall@5 (query–
    passage pairs) or Spearman (scored pairs) retention."""
    from sphana.export.embedding import cosine_failures, cosine_parity, int8_failures, int8_parity

    if not isinstance(task, ScoredPairs):
        int8 = int8_parity(reference, embed, task, cfg, torch_metrics)
        return int8, int8_failures(int8, cfg)
    cosine = cosine_parity(reference, embed, task.texts, cfg)
    metrics = task.evaluate(embed)
    base = torch_metrics["spearman"]
    retention = metrics["spearman"] / base if base > 0 else 1.0
    minimum = cfg.parity.int8_min_spearman_retention
    int8 = {
        **cosine,
        "spearman": metrics["spearman"],
        "pytorch_spearman": base,
        "spearman_retention": round(retention, 6),
        "min_spearman_retention": minimum,
        "metrics": metrics,
        "spearman_passed": retention >= minimum,
    }
    int8["passed"] = cosine["cosine_passed"] and int8["spearman_passed"]
    failures = cosine_failures(int8, cfg)
    if not int8["spearman_passed"]:
        failures.append(
            f"INT8 Spearman {metrics['spearman']:.4f} is {retention:.2%} of PyTorch's "
            f"{base:.4f} < export.parity.int8_min_spearman_retention={minimum}"
        )
    return int8, failures


def export(
    p: Plan,
    encoder: Any,
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
    from sphana.embedding import write_vocab_txt
    from sphana.export.embedding import export_encoder, numpy_inputs, ort_embed
    from sphana.export.speed import speed_inputs

    task, eval_source = eval_set(eval_file)
    texts = task_texts(task)
    metric = "spearman" if isinstance(task, ScoredPairs) else "recall@5"
    tokenizer.save_pretrained(out)
    write_vocab_txt(tokenizer, out / "vocab.txt")

    def gate(reference: Any, embed: Any, torch_metrics: dict) -> tuple[dict, list[str]]:
        return int8_gate(reference, embed, task, cfg, torch_metrics)

    report, fp32_session = export_encoder(
        encoder, tokenizer, texts, task, gate, p.max_seq_length, out, cfg, threads
    )
    fp32_embed = ort_embed(fp32_session, tokenizer, p.max_seq_length)
    torch_metrics = report["pytorch"]["metrics"]
    fp32_metrics = report["fp32"]["metrics"]
    int8 = report["int8"]

    def feed(chunk: list[Any]) -> dict[str, Any]:
        return numpy_inputs(tokenizer, chunk, p.max_seq_length)

    files = report["files"]
    report = {
        "eval": {"source": eval_source, "task": metric, "texts": len(texts)},
        **report,
        "sentence_transformers": _sentence_transformers_match(p, fp32_embed, texts[:64]),
        "speed": {
            "runs": backends(
                encoder, fp32_session, out / files["fp32"], out / files["int8"], threads
            ),
            **speed_inputs(texts, len, feed),
            "metric": metric,
            "quality": {
                "pytorch": torch_metrics[metric],
                "onnx fp32": fp32_metrics[metric],
                "onnx int8": int8["metrics"][metric],
            },
        },
    }
    evaluation = {
        "validation": torch_metrics,
        "onnx_fp32_validation": fp32_metrics,
        "onnx_int8_validation": int8["metrics"],
    }
    return report, evaluation


def _sentence_transformers_match(p: Plan, embed: Any, texts: list[str]) -> dict[str, Any] | None:
    """How far the ONNX fp32 embeddings are from sentence-transformers' own ``encode`` of the
    source directory (None for other layouts)."""
    if p.layout != "sentence-transformers":
        return None
    from sentence_transformers import SentenceTransformer

    theirs = SentenceTransformer(p.source, device="cpu", local_files_only=True).encode(
        texts, batch_size=32, convert_to_numpy=True
    )
    ours = embed(texts)
    cosine = row_cosines(ours, theirs)
    return {
        "texts": len(texts),
        "max_abs_diff": float(np.max(np.abs(ours - theirs))),
        "min_cosine": round(float(cosine.min()), 6),
    }
