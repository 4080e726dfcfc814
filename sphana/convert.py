"""``sphana convert``: a model trained elsewhere into the deployable form of Sphana's own.

The input's layout is detected and announced before any work (:func:`plan`; ``--dry-run`` stops
there). The model then goes through the export engine and gates of the pipeline
(:mod:`sphana.export`): an ONNX graph with dynamic batch and sequence axes and fused attention,
INT8 recipes tried until the INT8 gates pass, and a miss exits non-zero with nothing written.

Supported (``--kind embedding``, BERT-family encoders such as MiniLM, BGE, E5 and GTE):

* a **sentence-transformers directory** (``modules.json``): ``Transformer``, ``Pooling`` and an
  optional ``Normalize`` module. The pooling mode and the normalization are read from it and
  built into the graph;
* a **transformers directory** (``config.json`` and ``model.safetensors`` or
  ``pytorch_model.bin``): the pooling must be given (``--pooling``); it is never defaulted;
* a **state dict** file (``.safetensors``, ``.bin``, ``.pt``) beside a ``config.json`` and the
  tokenizer files. A pickle is loaded with ``torch.load(weights_only=True)``; a file that needs
  more (a pickled whole model) is refused unless ``--trust-pickle`` says the file is trusted.

Validation is a gate, as in the pipeline: fp32 against PyTorch over several batch sizes and
paddings, INT8 mean cosine and recall@5 retention on query–passage pairs (``--eval`` JSON Lines of
``{"query", "positive"}``, else the general set of real text in :mod:`sphana.general_eval`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sphana.embedding import POOLING_MODES
from sphana.errors import InputError

KINDS = ("embedding",)  # --kind values this version converts
ARCHITECTURES = ("bert",)  # config.json model_type values (token_type_ids, fused by "bert")
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
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SUPPORTED = (
    "a sentence-transformers directory (modules.json), a transformers directory (config.json "
    "with model.safetensors or pytorch_model.bin), or a state dict file (.safetensors, .bin, "
    ".pt) beside config.json and the tokenizer files"
)
REPORT_FILE = "convert_report.json"


@dataclass
class Plan:
    """What :func:`convert` will do, worked out from the input alone."""

    source: str
    layout: str  # sentence-transformers | transformers | state-dict
    kind: str
    architecture: str
    model_dir: str  # config.json and the tokenizer
    weights: str | None  # state-dict file, or None (the directory's own weights)
    pooling: str
    pooling_from: str  # where the pooling mode came from
    normalize: bool
    max_seq_length: int
    layers: int
    heads: int
    hidden_size: int
    steps: list[str] = field(default_factory=list)

    def describe(self) -> str:
        head = (
            f"{self.source}: {self.layout} layout, {self.architecture} encoder "
            f"({self.layers} layers, {self.heads} heads, hidden {self.hidden_size}), "
            f"pooling {self.pooling} ({self.pooling_from}), "
            f"{'L2-normalized' if self.normalize else 'not normalized'}, "
            f"max {self.max_seq_length} tokens"
        )
        return "\n".join([head, *(f"  {i}. {s}" for i, s in enumerate(self.steps, 1))])


def plan(
    model: Path,
    kind: str,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_seq_length: int | None = None,
) -> Plan:
    """Detect the layout of ``model`` and what converting it takes, reading only small files.

    Raises:
        InputError: naming the file and what is supported or what to pass.
    """
    if kind not in KINDS:
        raise InputError(model, f"--kind {kind} is not supported; supported: {', '.join(KINDS)}")
    if not model.exists():
        raise InputError(model, f"no such file or directory; expected {SUPPORTED}")
    weights = None
    if model.is_file():
        if model.suffix not in STATE_DICT_SUFFIXES:
            raise InputError(model, f"not a model file or directory; expected {SUPPORTED}")
        layout, model_dir, weights = "state-dict", model.parent, model
    elif (model / "modules.json").is_file():
        layout, model_dir = "sentence-transformers", model
    elif (model / "config.json").is_file():
        layout, model_dir = "transformers", model
    else:
        raise InputError(model, f"neither modules.json nor config.json here; expected {SUPPORTED}")

    st_pooling, st_normalize = None, False
    if layout == "sentence-transformers":
        model_dir, st_pooling, st_normalize = _sentence_transformers(model)
    config = _read_json(model_dir / "config.json")
    architecture = config.get("model_type", "?")
    if architecture not in ARCHITECTURES:
        raise InputError(
            model_dir / "config.json",
            f"model_type {architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)} "
            "(BERT-family encoders: MiniLM, BGE, E5, GTE ...)",
        )
    if layout == "transformers" and not any((model_dir / f).is_file() for f in WEIGHT_FILES):
        raise InputError(model_dir, f"config.json but no weights ({' or '.join(WEIGHT_FILES)})")

    if pooling is not None:
        if pooling not in POOLING_MODES:
            raise InputError(model, f"--pooling {pooling}: use one of {', '.join(POOLING_MODES)}")
        pooling_from = "--pooling"
    elif st_pooling is not None:
        pooling, pooling_from = st_pooling, "1_Pooling/config.json"
    else:
        raise InputError(
            model,
            "a transformers model does not say how to pool its token embeddings into one "
            f"vector; pass --pooling ({' | '.join(POOLING_MODES)}), e.g. the pooling its "
            "model card names. Sphana never picks one silently",
        )
    if normalize is None:
        normalize = st_normalize if layout == "sentence-transformers" else False
    if max_seq_length is None:
        max_seq_length = _max_seq_length(model_dir, config)

    steps = [
        f"load the weights ({weights.name if weights else 'the directory'}; pickles with "
        "weights_only=True)",
        f"wrap: {pooling} pooling{' + L2 normalization' if normalize else ''} inside the graph",
        "export: eager attention, TorchScript exporter, dynamic batch and sequence axes",
        "optimize: ONNX Runtime transformer optimizer (fused Attention, LayerNorm, GELU)",
        "gate fp32: max abs diff vs PyTorch at batch sizes 1, 2, 5, 16, two paddings",
        "quantize: INT8 recipes per_channel, then per_channel_ffn_fp32, until the INT8 gates "
        "pass (mean cosine, recall@5 retention)",
        "write the ONNX files, the tokenizer and convert_report.json (nothing on a miss)",
    ]
    return Plan(
        source=str(model),
        layout=layout,
        kind=kind,
        architecture=architecture,
        model_dir=str(model_dir),
        weights=str(weights) if weights else None,
        pooling=pooling,
        pooling_from=pooling_from,
        normalize=bool(normalize),
        max_seq_length=max_seq_length,
        layers=int(config.get("num_hidden_layers", 0)),
        heads=int(config.get("num_attention_heads", 0)),
        hidden_size=int(config.get("hidden_size", 0)),
        steps=steps,
    )


def _max_seq_length(model_dir: Path, config: dict[str, Any]) -> int:
    """sentence-transformers' ``max_seq_length`` (v6 keeps it as the tokenizer's
    ``model_max_length``), else the model's position limit."""
    positions = int(config.get("max_position_embeddings", 512))
    for name, key in (
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        value = _read_json(model_dir / name).get(key) if (model_dir / name).is_file() else None
        if isinstance(value, int) and 0 < value <= positions:
            return value
    return positions


def _read_json(path: Path, expected: type = dict) -> Any:
    """A JSON file holding an object (or ``expected``), or an :class:`InputError` naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(path, f"cannot read it as JSON ({e})") from None
    if not isinstance(data, expected):
        raise InputError(path, f"expected a JSON {'object' if expected is dict else 'list'}")
    return data


def _sentence_transformers(model: Path) -> tuple[Path, str, bool]:
    """The transformer directory, pooling mode and normalization of a sentence-transformers
    directory; anything but Transformer, Pooling and Normalize is refused."""
    modules = _read_json(model / "modules.json", list)
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
    pooling_config = _read_json(pooling_file)
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


def load(p: Plan, trust_pickle: bool = False) -> tuple[Any, Any]:
    """The :class:`~sphana.embedding.Encoder` (eval mode) and tokenizer of a plan."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from sphana.embedding import Encoder

    model_dir = Path(p.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if p.weights is None:
        transformer = AutoModel.from_pretrained(
            model_dir, add_pooling_layer=False, local_files_only=True
        )
    else:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        transformer = AutoModel.from_config(config, add_pooling_layer=False)
        state = _state_dict(Path(p.weights), trust_pickle)
        prefix = _common_prefix(state, transformer.state_dict())
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        missing, unexpected = transformer.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise InputError(
                p.weights,
                f"does not match config.json: {len(missing)} missing tensors (e.g. "
                f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})",
            )
    return Encoder(transformer, p.pooling, p.normalize).eval(), tokenizer


def _state_dict(path: Path, trust_pickle: bool) -> dict[str, Any]:
    import pickle

    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise InputError(
                path,
                "is a pickle that needs more than tensors to load (e.g. a whole pickled model), "
                "and unpickling runs code from the file. Save a state dict instead "
                "(torch.save(model.state_dict(), ...) or safetensors), or pass --trust-pickle "
                f"if you trust this file. ({str(e).splitlines()[0]})",
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(path, "holds no state dict (a mapping of names to tensors)")
    return obj


def _common_prefix(state: dict[str, Any], expected: dict[str, Any]) -> str:
    """The prefix (e.g. ``bert.``, ``0.auto_model.``) that turns ``state``'s names into the
    model's; empty when they already match."""
    for name in state:
        for target in expected:
            if name.endswith("." + target) and name.removesuffix(target):
                return name.removesuffix(target)
    return ""


def eval_pairs(eval_file: Path | None, pairs: int = 400) -> tuple[list[Any], str]:
    """Query–passage pairs to gate on: ``eval_file`` (JSON Lines of ``{"query", "positive"}``)
    or, without one, real text from :mod:`sphana.general_eval`; and where they came from."""
    from sphana import general_eval

    if eval_file is None:
        general = general_eval.build(pairs)
        return [*general.selection, *general.report], "general set (stdlib)"
    from sphana.io import load_jsonl

    out = []
    for line, record in enumerate(load_jsonl(eval_file), 1):
        if not isinstance(record.get("query"), str) or not isinstance(record.get("positive"), str):
            raise InputError(eval_file, f'line {line}: needs string fields "query" and "positive"')
        out.append(general_eval.Pair(f"{line}", record["query"], record["positive"]))
    if len(out) < 2:
        raise InputError(eval_file, "needs at least 2 query-passage pairs")
    return out, str(eval_file)


def convert(
    p: Plan,
    out: Path,
    eval_file: Path | None = None,
    trust_pickle: bool = False,
    threads: int = 0,
    seconds: float = 2.0,
    cfg: Any = None,
) -> dict[str, Any]:
    """Convert as ``p`` says into ``out`` (written whole, and only if every gate passes), gated
    by ``cfg`` (an :class:`~sphana.config.ExportConfig`; default: the pipeline's defaults).

    Returns:
        The report (also ``out/convert_report.json``): the plan, fused operators, the INT8
        recipe, the parity gates, and a table of PyTorch, ONNX fp32 and INT8 with the task
        metric as % of PyTorch's, size, batch throughput and single-input latency.

    Raises:
        InputError: for an unreadable or refused input.
        ParityError: when a gate is missed (naming it, its value and its key).
    """
    from sphana.config import ExportConfig
    from sphana.embedding import ValidationSet, tokenize, write_vocab_txt
    from sphana.export import (
        check_parity,
        export_text_encoder,
        fp32_failures,
        quantize_gated,
        session,
        signature,
    )
    from sphana.export.embedding import (
        SPEC,
        fp32_parity,
        int8_failures,
        int8_parity,
        ort_embed,
        torch_embed,
    )
    from sphana.io import atomic_dir, write_json_atomic

    cfg = cfg or ExportConfig()
    encoder, tokenizer = load(p, trust_pickle)
    pairs, eval_source = eval_pairs(eval_file)
    validation = ValidationSet.from_pairs(pairs)
    texts = validation.queries + validation.corpus_texts
    example = tokenize(tokenizer, texts[:2], p.max_seq_length)  # batch >= 2 when traced
    with atomic_dir(out) as tmp:
        fp32_path, int8_path = tmp / SPEC.file_name, tmp / SPEC.int8_file_name
        fusion = export_text_encoder(
            encoder, encoder.transformer, dict(example), SPEC, fp32_path, cfg.opset
        )
        tokenizer.save_pretrained(tmp)
        write_vocab_txt(tokenizer, tmp / "vocab.txt")
        reference = torch_embed(encoder, tokenizer, p.max_seq_length)
        torch_metrics = validation.evaluate(reference)
        fp32_session = session(fp32_path, threads)
        fp32 = fp32_parity(encoder, tokenizer, fp32_session, texts, cfg, p.max_seq_length)
        fp32_embed = ort_embed(fp32_session, tokenizer, p.max_seq_length)
        fp32_metrics = validation.evaluate(fp32_embed)

        def gate(path: Path) -> tuple[dict[str, Any], list[str]]:
            embed = ort_embed(session(path, threads), tokenizer, p.max_seq_length)
            int8 = int8_parity(reference, embed, validation, cfg, torch_metrics)
            return int8, int8_failures(int8, cfg)

        quantization, int8, failures = quantize_gated(fp32_path, int8_path, cfg.quantization, gate)
        check_parity("embedding", [*fp32_failures(fp32), *failures], cfg.quantization)
        report = {
            "plan": asdict(p),
            "eval": {"source": eval_source, "pairs": len(pairs)},
            "fusion": fusion,
            "quantization": quantization,
            "fp32": {**fp32, "metrics": fp32_metrics},
            "int8": int8,
            "pytorch": {"metrics": torch_metrics},
            "sentence_transformers": _sentence_transformers_match(p, fp32_embed, texts[:64]),
            "table": _table(
                encoder,
                tokenizer,
                p,
                texts,
                fp32_path,
                int8_path,
                threads,
                seconds,
                {"pytorch": torch_metrics, "onnx fp32": fp32_metrics, "onnx int8": int8["metrics"]},
            ),
            "signature": signature(fp32_path),
            "files": {"fp32": SPEC.file_name, "int8": SPEC.int8_file_name},
            "model_config": {
                "dimension": int(encoder.transformer.config.hidden_size),
                "max_seq_length": p.max_seq_length,
                "pooling": p.pooling,
                "normalized": p.normalize,
                "output": SPEC.output_names[0],
                "tokenizer": "tokenizer.json",
                "opset": cfg.opset,
            },
        }
        write_json_atomic(tmp / REPORT_FILE, report)
    return report


def _sentence_transformers_match(p: Plan, embed: Any, texts: list[str]) -> dict[str, Any] | None:
    """How far the ONNX fp32 embeddings are from sentence-transformers' own ``encode`` of the
    source directory (None for other layouts)."""
    if p.layout != "sentence-transformers":
        return None
    import numpy as np
    from sentence_transformers import SentenceTransformer

    theirs = SentenceTransformer(p.source, device="cpu", local_files_only=True).encode(
        texts, batch_size=32, convert_to_numpy=True
    )
    ours = embed(texts)
    cosine = np.sum(ours * theirs, 1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
    )
    return {
        "texts": len(texts),
        "max_abs_diff": float(np.max(np.abs(ours - theirs))),
        "min_cosine": round(float(cosine.min()), 6),
    }


def _table(
    encoder: Any,
    tokenizer: Any,
    p: Plan,
    texts: list[str],
    fp32_path: Path,
    int8_path: Path,
    threads: int,
    seconds: float,
    metrics: dict[str, dict[str, float]],
) -> list[dict[str, Any]]:
    """PyTorch, ONNX fp32 (optimized) and INT8 side by side: recall@5 as % of PyTorch's, size,
    batch-32 throughput and single-input latency at the same thread count."""
    import torch

    from sphana.embedding import tokenize
    from sphana.export import session
    from sphana.export.speed import latency, onnx_runner, throughput, torch_runner

    if threads:
        torch.set_num_threads(threads)
    ordered = sorted(texts, key=len)[len(texts) // 4 :][:128]  # skip the shortest quarter

    def feed(chunk: list[str]) -> dict[str, Any]:
        return {k: v.numpy() for k, v in tokenize(tokenizer, chunk, p.max_seq_length).items()}

    batches = [feed(ordered[i : i + 32]) for i in range(0, len(ordered), 32)]
    singles = [feed([t]) for t in ordered[::4]]
    runs = {
        "pytorch": (torch_runner(encoder), None),
        "onnx fp32": (onnx_runner(session(fp32_path, threads)), fp32_path),
        "onnx int8": (onnx_runner(session(int8_path, threads)), int8_path),
    }
    base = metrics["pytorch"]["recall@5"] or 1.0
    rows = []
    for name, (run, path) in runs.items():
        p50, p95 = latency(run, singles)
        rows.append(
            {
                "backend": name,
                "recall@5_of_pytorch": round(metrics[name]["recall@5"] / base, 4),
                "size_mib": round(path.stat().st_size / 2**20, 1) if path else None,
                "batch32_per_s": round(throughput(run, batches, seconds), 1),
                "p50_ms": round(p50, 2),
                "p95_ms": round(p95, 2),
            }
        )
    speed = rows[0]["batch32_per_s"]
    for row in rows:
        row["speedup"] = round(row["batch32_per_s"] / speed, 2)
    return rows


def print_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'backend':10s} {'recall@5':>9s} {'size MiB':>9s} {'batch32/s':>10s} {'speedup':>8s} "
        f"{'p50 ms':>7s} {'p95 ms':>7s}"
    ]
    for r in report["table"]:
        size = f"{r['size_mib']:.1f}" if r["size_mib"] is not None else "-"
        lines.append(
            f"{r['backend']:10s} {r['recall@5_of_pytorch']:9.2%} {size:>9s} "
            f"{r['batch32_per_s']:10.1f} {r['speedup']:7.2f}x {r['p50_ms']:7.2f} {r['p95_ms']:7.2f}"
        )
    return "\n".join(lines)
