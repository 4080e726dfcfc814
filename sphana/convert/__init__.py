"""``sphana convert``: a model trained elsewhere into the deployable form of Sphana's own.

The input's layout is detected and announced before any work (:func:`plan`; ``--dry-run`` stops
there). The model then goes through the export engine and gates of the pipeline
(:mod:`sphana.export`), and the output is a release bundle (``manifest.json`` beside the files it
lists) that ``sphana verify`` checks and ``sphana serve`` serves. A missed gate exits non-zero
with nothing written.

Layouts: a **sentence-transformers directory** (``modules.json``; embedding only), a
**transformers directory** (``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``), or
a **state dict** file (``.safetensors``, ``.bin``, ``.pt``) beside a ``config.json`` and the
tokenizer files. A pickle is loaded with ``torch.load(weights_only=True)``; a file that needs more
(a pickled whole model) is refused unless ``--trust-pickle`` says the file is trusted.

Kinds, each in its module (the plan's details, the model, its eval set and gates):

* ``embedding`` (:mod:`sphana.convert.embedding`): a BERT-family sentence encoder, its pooling and
  normalization inside the graph;
* ``relation`` (:mod:`sphana.convert.relation`): a BERT-family sequence classifier over
  entity-marked sentences, labels from ``id2label``;
* ``llm`` (:mod:`sphana.convert.llm`): a Qwen2 or Llama causal LM with ChatML tokens, exported
  with its KV cache as the pipeline's generator is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sphana.errors import InputError
from sphana.manifest import MANIFEST_NAME

KINDS = ("embedding", "relation", "llm")  # --kind values this version converts
# config.json model_type values per kind: encoders with token_type_ids, fused by ONNX Runtime's
# "bert" optimizer; causal LMs whose KV cache the generator's export carries
ARCHITECTURES = {
    "embedding": ("bert",),
    "relation": ("bert",),
    "llm": ("qwen2", "llama"),
}
FAMILIES = {
    "embedding": "BERT-family encoders: MiniLM, BGE, E5, GTE ...",
    "relation": "BERT-family encoders: MiniLM, BGE, E5, GTE ...",
    "llm": "Qwen2, SmolLM2 and other Llama-architecture models",
}
# how a BERT-family model is exported and checked (the generator's steps are its module's)
TEXT_STEPS = [
    "export: eager attention, TorchScript exporter, dynamic batch and sequence axes",
    "optimize: ONNX Runtime transformer optimizer (fused Attention, LayerNorm, GELU), then the "
    "CPU rewrites (padding mask -60; layer norms as standard operators unless --layer-norm fused; "
    "all but attention and pooling on the real tokens only)",
    "gate fp32: max abs diff vs PyTorch at batch sizes 1, 2, 5, 16, two paddings",
]
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
    max_seq_length: int
    layers: int
    heads: int
    hidden_size: int
    pooling: str | None = None  # embedding: the pooling mode; relation: the head's ("cls")
    pooling_from: str | None = None  # where the pooling mode came from
    normalize: bool | None = None  # embedding: L2-normalized output
    labels: list[str] | None = None  # relation: id2label in id order
    steps: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = {"embedding": "encoder", "relation": "sequence classifier", "llm": "causal LM"}[
            self.kind
        ]
        head = (
            f"{self.source}: {self.layout} layout, {self.architecture} {what} "
            f"({self.layers} layers, {self.heads} heads, hidden {self.hidden_size}), "
        )
        if self.kind == "embedding":
            head += (
                f"pooling {self.pooling} ({self.pooling_from}), "
                f"{'L2-normalized' if self.normalize else 'not normalized'}, "
            )
        elif self.kind == "relation":
            head += f"{len(self.labels or [])} labels ({', '.join(self.labels or [])}), "
        head += f"max {self.max_seq_length} tokens"
        return "\n".join([head, *(f"  {i}. {s}" for i, s in enumerate(self.steps, 1))])


def kind_module(kind: str) -> Any:
    """The module that converts ``kind`` (:data:`KINDS`)."""
    if kind == "embedding":
        from sphana.convert import embedding as module
    elif kind == "relation":
        from sphana.convert import relation as module
    else:
        from sphana.convert import llm as module
    return module


def plan(
    model: Path,
    kind: str,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_seq_length: int | None = None,
) -> Plan:
    """Detect the layout of ``model`` and what converting it as ``kind`` takes, reading only
    small files (``pooling`` and ``normalize``: embedding only).

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
    if kind != "embedding" and layout == "sentence-transformers":
        raise InputError(
            model, "a sentence-transformers directory is an embedding model: use --kind embedding"
        )
    if kind != "embedding" and (pooling is not None or normalize is not None):
        raise InputError(model, "--pooling and --normalize are for --kind embedding")

    st_layout = None  # (pooling, normalize) a sentence-transformers directory names
    if layout == "sentence-transformers":
        from sphana.convert.embedding import sentence_transformers

        model_dir, *st_layout = sentence_transformers(model)
    config = read_json(model_dir / "config.json")
    architecture = config.get("model_type", "?")
    if architecture not in ARCHITECTURES[kind]:
        raise InputError(
            model_dir / "config.json",
            f"model_type {architecture!r} is not supported for --kind {kind}; supported: "
            f"{', '.join(ARCHITECTURES[kind])} ({FAMILIES[kind]})",
        )
    if layout == "transformers" and not any((model_dir / f).is_file() for f in WEIGHT_FILES):
        raise InputError(model_dir, f"config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    module = kind_module(kind)
    details = module.details(
        model, model_dir, config, {"st": st_layout, "pooling": pooling, "normalize": normalize}
    )
    if max_seq_length is None:
        max_seq_length = _max_seq_length(model_dir, config)

    return Plan(
        source=str(model),
        layout=layout,
        kind=kind,
        architecture=architecture,
        model_dir=str(model_dir),
        weights=str(weights) if weights else None,
        max_seq_length=max_seq_length,
        layers=int(config.get("num_hidden_layers", 0)),
        heads=int(config.get("num_attention_heads", 0)),
        hidden_size=int(config.get("hidden_size", 0)),
        steps=[
            f"load the weights ({weights.name if weights else 'the directory'}; pickles with "
            "weights_only=True)",
            *details.pop("steps"),
            *getattr(module, "EXPORT_STEPS", TEXT_STEPS),
            "quantize: INT8 recipes per_channel, per_channel_ffn_fp32, then the most sensitive "
            f"nodes kept fp32, until the INT8 gates pass ({module.INT8_GATES})",
            "write the bundle: the ONNX files, the tokenizer, convert_report.json and "
            "manifest.json (checksums, metrics, the source as lineage); nothing on a miss",
        ],
        **details,
    )


def _max_seq_length(model_dir: Path, config: dict[str, Any]) -> int:
    """sentence-transformers' ``max_seq_length`` (v6 keeps it as the tokenizer's
    ``model_max_length``), else the model's position limit."""
    positions = int(config.get("max_position_embeddings", 512))
    for name, key in (
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        value = read_json(model_dir / name).get(key) if (model_dir / name).is_file() else None
        if isinstance(value, int) and 0 < value <= positions:
            return value
    return positions


def read_json(path: Path, expected: type = dict) -> Any:
    """A JSON file holding an object (or ``expected``), or an :class:`InputError` naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(path, f"cannot read it as JSON ({e})") from None
    if not isinstance(data, expected):
        raise InputError(path, f"expected a JSON {'object' if expected is dict else 'list'}")
    return data


def load_transformer(
    p: Plan,
    auto_class: Any,
    tokenizer: Any,
    trust_pickle: bool,
    skip: tuple[str, ...] = (),
    **kwargs: Any,
) -> Any:
    """``p``'s transformers model as ``auto_class`` (``AutoModel``, ``AutoModelFor...``; ``kwargs``
    go to it): the directory's own weights, or ``p``'s state-dict file, loaded into a model built
    from its ``config.json``. Tensors whose names start with ``skip`` are left out without a
    word; other tensors the model has no place for are refused in a state-dict file and named in
    a warning from a directory. Every weight must be in the checkpoint, and ``tokenizer`` must
    fit the model's embedding table.

    Raises:
        InputError: a weight is missing (either way; a state-dict file with a tensor the model
            does not have is refused too), the file holds no state dict, a pickle is not
            trusted, or the tokenizer has more tokens than the embedding table.
    """
    from transformers import AutoConfig

    from sphana.base_models import from_pretrained

    model_dir = Path(p.model_dir)
    if p.weights is None:
        model = from_pretrained(auto_class, model_dir, left_out=skip, **kwargs)
    else:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model = auto_class.from_config(config, **kwargs)
        _load_weights(p, model, trust_pickle, skip)
    _check_vocabulary(p, model, tokenizer)
    return model


def _load_weights(p: Plan, model: Any, trust_pickle: bool, skip: tuple[str, ...]) -> None:
    """Load ``p``'s state-dict file into ``model`` (built from its config.json), stripping a
    common prefix (``bert.``, ``0.auto_model.``) and names starting with ``skip``.

    Raises:
        InputError: the file holds no state dict, or one that does not match the config.
    """
    assert p.weights is not None
    state = _state_dict(Path(p.weights), trust_pickle)
    prefix = _common_prefix(state, model.state_dict())
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise InputError(
            p.weights,
            f"does not match config.json: {len(missing)} missing tensors (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})",
        )


def _check_vocabulary(p: Plan, model: Any, tokenizer: Any) -> None:
    """Refuse a tokenizer whose ids run past ``model``'s (a transformers model's) embedding table:
    tokens added to the tokenizer without ``resize_token_embeddings`` would fail deep inside the
    export, or wherever a text first contains them.

    Raises:
        InputError: naming the directory, both sizes and the fix.
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InputError(
            p.model_dir,
            f"its tokenizer has {len(tokenizer)} tokens but the model's embedding table only "
            f"{rows} rows (tokens added without resizing the embeddings); call "
            "model.resize_token_embeddings(len(tokenizer)), train or save the model again",
        )


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
    if any(name in expected for name in state):
        return ""
    for name in state:
        for target in expected:
            if name.endswith("." + target) and name.removesuffix(target):
                return name.removesuffix(target)
    return ""


def load(p: Plan, trust_pickle: bool = False) -> tuple[Any, Any]:
    """The PyTorch model (eval mode; what the ONNX graph computes) and tokenizer of a plan."""
    return kind_module(p.kind).load(p, trust_pickle)


def convert(
    p: Plan,
    out: Path,
    eval_file: Path | None = None,
    trust_pickle: bool = False,
    threads: int = 0,
    seconds: float = 2.0,
    cfg: Any = None,
    name: str | None = None,
    version: str = "0.1.0",
) -> dict[str, Any]:
    """Convert as ``p`` says into ``out`` (written whole, and only if every gate passes), gated
    by ``cfg`` (an :class:`~sphana.config.ExportConfig`; default: the pipeline's defaults).

    ``out`` is a release bundle: ``manifest.json`` (release ``name``, default ``out``'s name,
    and ``version``; the source's path and hash as its lineage) beside the files it lists, which
    ``sphana verify`` checks and ``sphana serve`` serves, like a bundle of the pipeline's.

    Returns:
        The report (also ``out/convert_report.json``): the plan, fused operators, the INT8
        recipe, the parity gates, and a table of PyTorch, ONNX fp32 and INT8 with the task
        metric as % of PyTorch's, size, batch throughput and single-input latency.

    Raises:
        InputError: for an unreadable or refused input.
        ParityError: when a gate is missed (naming it, its value and its key).
    """
    from sphana.config import ExportConfig
    from sphana.export.speed import batches_described
    from sphana.io import atomic_dir, write_json_atomic

    cfg = cfg or ExportConfig()
    lineage = source_lineage(p)  # before loading: the bytes that were converted
    module = kind_module(p.kind)
    model, tokenizer = module.load(p, trust_pickle)
    with atomic_dir(out) as tmp:
        report, evaluation = module.export(p, model, tokenizer, tmp, eval_file, threads, cfg)
        if "speed" in report:  # the generator's module measures decoding itself
            speed = report.pop("speed")
            report["table_inputs"] = batches_described(speed["batches"])
            report["table"] = speed_table(speed, threads, seconds)
        report = {"plan": asdict(p), **report}
        report["model_config"] = {
            "base_model": p.source,
            "source": lineage,
            **report["model_config"],
        }
        write_json_atomic(tmp / REPORT_FILE, report)
        manifest = bundle_manifest(p, report, evaluation, tmp, name or out.name, version)
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    return report


def source_lineage(p: Plan) -> dict[str, Any]:
    """Where a converted model came from: its path and layout, and one sha256 over every file
    of the source (relative path and content hash, sorted), so a deployer can tell two sources
    apart without the files."""
    import hashlib

    from sphana.io import sha256_file

    root = Path(p.source)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    if p.weights is not None:  # a state dict: its config.json and tokenizer are part of it
        files += sorted(f for f in Path(p.model_dir).iterdir() if f.is_file() and f != root)
    digest = hashlib.sha256()
    for f in files:
        rel = f.name if f == root else f.relative_to(root if root.is_dir() else root.parent)
        digest.update(f"{Path(rel).as_posix()}\0{sha256_file(f)}\n".encode())
    return {
        "path": str(root.resolve()),
        "layout": p.layout,
        "files": len(files),
        "sha256": f"sha256:{digest.hexdigest()}",
    }


def bundle_manifest(
    p: Plan,
    report: dict[str, Any],
    evaluation: dict[str, Any],
    root: Path,
    name: str,
    version: str,
) -> dict[str, Any]:
    """The manifest of a converted model: one component, every file under ``root``, its
    ``evaluation`` on the eval set, the source as provenance."""
    from sphana import manifest as manifest_lib
    from sphana.config import ReleaseConfig

    info = {
        "onnx_dir": root,
        "version": version,
        "evaluation": evaluation,
        "parity": report,
        "model_config": report["model_config"],
    }
    entry = manifest_lib.component_entry(p.kind, info, name, root)
    lineage = report["model_config"]["source"]
    return manifest_lib.assemble(
        name=name,
        version=version,
        entries={p.kind: entry},
        skipped={},
        gold={
            "questions": None,
            "relations": None,
            "signals": {p.kind: f"converted from {lineage['path']} (trained outside Sphana)"},
        },
        provenance={"git_commit": None, "stages": {}, "converted_from": lineage},
        min_onnxruntime=ReleaseConfig().min_onnxruntime,
    )


def backends(
    model: Any, fp32_session: Any, fp32_path: Path, int8_path: Path, threads: int
) -> dict[str, tuple[Any, Path | None]]:
    """What the speed table compares: backend -> ``(run(feed), ONNX file or None)``."""
    from sphana.export import session
    from sphana.export.speed import onnx_runner, torch_runner

    return {
        "pytorch": (torch_runner(model), None),
        "onnx fp32": (onnx_runner(fp32_session), fp32_path),
        "onnx int8": (onnx_runner(session(int8_path, threads)), int8_path),
    }


def speed_table(speed: dict[str, Any], threads: int, seconds: float) -> list[dict[str, Any]]:
    """PyTorch, ONNX fp32 (optimized) and INT8 side by side at the same thread count: the task
    metric as % of PyTorch's, size, batch-32 throughput (backends taking turns until the slowest
    has run ``seconds``: :func:`~sphana.export.speed.side_by_side`) and single-input latency.

    Args:
        speed: ``runs`` (backend -> ``(run(feed), ONNX file or None)``), ``batches`` and
            ``singles`` (feeds), ``metric`` (its name) and ``quality`` (backend -> value).
    """
    import torch

    from sphana.export import model_bytes
    from sphana.export.speed import latency, side_by_side

    if threads:
        torch.set_num_threads(threads)
    base = speed["quality"]["pytorch"] or 1.0
    runs = {backend: run for backend, (run, _) in speed["runs"].items()}
    rates = side_by_side(runs, speed["batches"], seconds)
    rows = []
    for backend, (run, path) in speed["runs"].items():
        p50, p95 = latency(run, speed["singles"])
        rows.append(
            {
                "backend": backend,
                "metric": speed["metric"],
                "of_pytorch": round(speed["quality"][backend] / base, 4),
                "size_mib": round(model_bytes(path) / 2**20, 1) if path else None,
                "batch32_per_s": round(rates[backend], 1),
                "p50_ms": round(p50, 2),
                "p95_ms": round(p95, 2),
            }
        )
    reference = rows[0]["batch32_per_s"]
    for row in rows:
        row["speedup"] = round(row["batch32_per_s"] / reference, 2)
    return rows


def print_table(report: dict[str, Any]) -> str:
    first = report["table"][0]
    speed, title = (
        ("tokens_per_s", "tokens/s")
        if "tokens_per_s" in first
        else (
            "batch32_per_s",
            "batch32/s",
        )
    )
    lines = [
        f"{'backend':10s} {first['metric']:>10s} {'size MiB':>9s} {title:>10s} {'speedup':>8s} "
        f"{'p50 ms':>7s} {'p95 ms':>7s}"
    ]
    for r in report["table"]:
        size = f"{r['size_mib']:.1f}" if r["size_mib"] is not None else "-"
        lines.append(
            f"{r['backend']:10s} {r['of_pytorch']:10.2%} {size:>9s} "
            f"{r[speed]:10.1f} {r['speedup']:7.2f}x {r['p50_ms']:7.2f} {r['p95_ms']:7.2f}"
        )
    return "\n".join(lines)


def import_plan(
    component: str, import_from: str, imports: str, **options: Any
) -> tuple[Plan, dict[str, Any]]:
    """The plan (:func:`plan`, ``options`` as its keywords) and the lineage (path and sha256 of
    its files) of ``<component>.import_from``: a model trained elsewhere that the pipeline ships.

    Raises:
        ConfigError: ``import_from`` outside ``<imports>/<component>`` (the directory
            ``dvc.yaml`` tracks for it, so a change to its files reruns the component's stages).
        InputError: a model ``sphana convert`` would refuse, with what to pass.
    """
    import os

    from sphana.errors import ConfigError

    root = os.path.abspath(os.path.join(imports, component))
    if os.path.commonpath([root, os.path.abspath(import_from)]) != root:
        raise ConfigError(
            f"{component}.import_from={import_from!r} lies outside {imports}/{component}/, "
            "the directory dvc.yaml tracks for it: copy the model there (or `dvc add` it there) "
            f"so that a change to its files reruns the {component}'s stages"
        )
    p = plan(Path(import_from), component, **options)
    return p, {**source_lineage(p), "path": import_from}
