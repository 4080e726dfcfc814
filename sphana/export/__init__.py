"""Generic ONNX export engine: specs, export, INT8 quantization, signatures, sessions.

Each model kind describes itself with an :class:`OnnxSpec` (file name, input/output names,
dynamic axes) registered with :func:`register`; its module in this package runs the export and
its parity gates with the helpers below. A parity miss raises :class:`~sphana.errors.ParityError`
and fails the build: it is never only a warning.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sphana.config import ExportConfig, LayerNorm, Quantization
from sphana.export.cpu_graph import (
    MASK_FILTER_VALUE,
    decompose_skip_layer_norms,
    remove_padding,
    set_mask_filter_value,
)

SPECS: dict[str, OnnxSpec] = {}


@dataclass(frozen=True)
class OnnxSpec:
    component: str
    file_name: str  # fp32 file; the INT8 sibling is <stem>.int8.onnx
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)  # name -> {axis: label}

    @property
    def int8_file_name(self) -> str:
        return self.file_name.removesuffix(".onnx") + ".int8.onnx"

    @property
    def int4_file_name(self) -> str:  # the generator's 4-bit weight-only sibling
        return self.file_name.removesuffix(".onnx") + ".int4.onnx"


def register(spec: OnnxSpec) -> OnnxSpec:
    SPECS[spec.component] = spec
    return spec


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # int64 [batch, sequence]
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")  # copied beside ONNX


def text_model_spec(component: str, file_name: str, output: str) -> OnnxSpec:
    """The spec of a transformer over tokenized text: the BERT inputs with dynamic batch and
    sequence axes, one output with a dynamic batch axis."""
    axes = {name: {0: "batch", 1: "sequence"} for name in TEXT_INPUTS}
    return register(
        OnnxSpec(component, file_name, TEXT_INPUTS, (output,), {**axes, output: {0: "batch"}})
    )


# ONNX files are protobufs, which cannot exceed 2 GiB: a model whose weights pass this many MiB
# (export.external_data_mb) keeps them in one "<file>.data" beside the graph, ONNX's external data
EXTERNAL_DATA_MB = 1900
EXTERNAL_SUFFIX = ".data"


def external_data(path: Path) -> Path:
    """Where ``path``'s weights are when they are external (:func:`save_model`)."""
    return path.with_name(path.name + EXTERNAL_SUFFIX)


def model_bytes(path: Path) -> int:
    """The bytes of an ONNX model: its file and its external data, if any."""
    data = external_data(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def files_report(spec: OnnxSpec, fp32_path: Path, int8_path: Path) -> dict[str, Any]:
    """The ``signature``, ``files`` and ``sizes`` of an export report whose INT8 file ships."""
    return {
        "signature": signature(fp32_path),
        "files": {"fp32": spec.file_name, "int8": spec.int8_file_name},
        "sizes": {"fp32": model_bytes(fp32_path), "int8": model_bytes(int8_path)},
    }


def weight_bytes(model: Any) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def save_model(model: Any, path: Path, external_mb: float = EXTERNAL_DATA_MB) -> None:
    """Write ``model`` to ``path`` (atomically): self-contained, or, when its weights pass
    ``external_mb`` MiB, with every weight in ``<file>.data`` beside it."""
    import onnx

    from sphana.io import atomic_path

    data = external_data(path)
    data.unlink(missing_ok=True)
    external = weight_bytes(model) > external_mb * 2**20
    with atomic_path(path) as tmp:
        if external:  # written under its final name: the graph refers to it by name
            onnx.save_model(
                model,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data.name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(tmp))


def export_onnx(
    module: Any,
    example: dict[str, Any],
    spec: OnnxSpec,
    path: Path,
    opset: int,
    external_mb: float = EXTERNAL_DATA_MB,
    rewrite: Any = None,
) -> Any:
    """Export ``module`` (called with ``example``'s tensors as positional inputs, in
    ``spec.input_names`` order) to ``path`` (:func:`save_model`: one file, or the graph and
    ``<file>.data`` past ``external_mb`` MiB of weights). ``rewrite(model) -> (model, info)``
    (e.g. :func:`sphana.export.llm_graph.fuse_generator`) rewrites the graph before it is
    written; its ``info`` is returned.

    Dynamic axes that share a label (e.g. ``batch``) are one symbolic dimension.
    """
    import torch

    dims: dict[str, Any] = {}
    args = tuple(example[name] for name in spec.input_names)
    shapes: list[Any] = [
        {a: dims.setdefault(label, torch.export.Dim(label)) for a, label in axes.items()} or None
        for axes in (spec.dynamic_axes.get(name, {}) for name in spec.input_names)
    ]
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind == p.VAR_POSITIONAL for p in params):  # forward(a, b, *rest)
        fixed = len(params) - 1  # torch.export wants the shapes of *rest as one tuple
        shapes = [*shapes[:fixed], tuple(shapes[fixed:])]
    module.eval()
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        tmp = Path(scratch) / path.name
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_shapes=tuple(shapes),
            opset_version=opset,
            dynamo=True,
            external_data=True,  # any size; save_model decides how it is written
            verbose=False,
        )
        if rewrite is not None:  # the exporter's graph; ONNX's checker knows no fused operator
            onnx.checker.check_model(str(tmp))
        model = onnx.load(str(tmp))
    strip_debug_metadata(model)
    internal = {o for node in model.graph.node for o in node.output}
    clash = internal & set(spec.input_names)
    if clash:
        raise ValueError(f"{path}: graph input names {sorted(clash)} clash with internal nodes")
    info = None
    if rewrite is not None:
        model, info = rewrite(model)
    save_model(model, path, external_mb)
    if rewrite is None:
        onnx.checker.check_model(str(path))  # by path: a model over 2 GiB is checked too
    return info


@contextmanager
def no_warnings() -> Iterator[None]:
    """Silence Python logging below ERROR (ONNX Runtime's tools log advice as warnings)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@contextmanager
def eager_attention(transformer: Any) -> Iterator[None]:
    """Eager attention while ``transformer`` is traced (sdpa hides the pattern ONNX Runtime's
    attention fusion matches), its own implementation again afterwards: the PyTorch figures
    that the parity gates and speed tables take from the same module are those of the model as
    its users run it."""
    own = transformer.config._attn_implementation
    transformer.set_attn_implementation("eager")
    try:
        yield
    finally:
        transformer.set_attn_implementation(own)


# Fused operators ONNX Runtime's transformer optimizer writes for a BERT-style encoder
FUSED_OPS = ("Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu")


def export_text_encoder(
    module: Any, example: dict[str, Any], spec: OnnxSpec, path: Path, cfg: ExportConfig
) -> dict[str, Any]:
    """Export a BERT-style ``module`` (whose encoder is ``module.transformer``) traced on
    ``example`` (tokenized inputs), at ``cfg.opset``, with fused attention: eager attention
    while tracing (the module's own again afterwards), the TorchScript exporter (its graph has
    the patterns ONNX Runtime's fusions match; the dynamo exporter's has not) and ONNX Runtime's
    transformer optimizer, which rewrites attention, embeddings and layer norms into fused
    operators; then the CPU rewrites of :mod:`sphana.export.cpu_graph` (a padding mask that
    keeps attention fast; with ``cfg.layer_norm`` standard, residual add + layer norm in
    standard operators; everything but attention and pooling on the real tokens only); written by
    :func:`save_model`. Returns the fused-operator counts of the written graph, whether attention
    fused (``attention_fused``; a graph where it did not is still exact, only slower, and its
    parity gates still decide) and the rewrites done.
    """
    import tempfile

    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    transformer = module.transformer
    module.eval()
    args = tuple(example[name] for name in spec.input_names)
    # a model over 2 GiB is exported with its weights in files beside the graph: in a scratch
    # directory, from which only the optimized graph is written out
    with (
        tempfile.TemporaryDirectory(dir=path.parent) as scratch,
        warnings.catch_warnings(),
        eager_attention(transformer),
    ):
        tmp = Path(scratch) / path.name
        # the tracer warns where a shape is read as a number; the parity gates check other shapes
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_axes=spec.dynamic_axes,
            opset_version=cfg.opset,
            dynamo=False,
        )
        config = transformer.config
        with no_warnings():  # its fusions warn when shape inference cannot help
            optimized = optimize_model(
                str(tmp),
                model_type="bert",
                num_heads=config.num_attention_heads,
                hidden_size=config.hidden_size,
            )
        model = optimized.model
        masked = set_mask_filter_value(model)
        standard = decompose_skip_layer_norms(model) if cfg.layer_norm is LayerNorm.standard else 0
        on_real_tokens = remove_padding(model)
        save_model(model, path, cfg.external_data_mb)
    ops = Counter(node.op_type for node in model.graph.node)
    fused = {op: ops[op] for op in FUSED_OPS}
    return {
        "exporter": "torchscript",
        "optimizer": "onnxruntime.transformers (bert)",
        "fused_operators": fused,
        "attention_fused": fused["Attention"] == config.num_hidden_layers,
        "attention_mask_filter_value": MASK_FILTER_VALUE if masked else None,
        "layer_norm": cfg.layer_norm.value,
        "layer_norms_in_standard_operators": standard,
        "operators_on_real_tokens": on_real_tokens,
    }


def strip_debug_metadata(model: Any) -> None:
    """Drop the exporter's per-node debug metadata (Python stack traces with the absolute paths
    of the build machine): it makes the bytes depend on where the repository is checked out."""
    graphs = [model.graph, *model.functions]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
        for info in getattr(graph, "value_info", []):
            del info.metadata_props[:]


def ffn_down_projections(model: Any) -> list[str]:
    """MatMul nodes with a constant weight that narrows the width (``in > out``): the FFN down-
    projections of a transformer, whose GELU inputs carry outliers that INT8 activations clip."""
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul"
        and len(weights.get(n.input[1], ())) == 2
        and weights[n.input[1]][0] > weights[n.input[1]][1]
    ]


def fold_weight_transposes(model: Any) -> int:
    """Fold every transposed constant weight of ``model`` into a constant; returns how many.
    Quantizers quantize only ``MatMul`` by a constant weight: torch.onnx writes a tied output
    projection (an LLM's ``lm_head``, the embedding table) as ``MatMul(x, Transpose(table))``,
    and graph fusions as ``FusedMatMul(x, table, transB=1)``, which dynamic INT8 would then run
    by dequantizing the whole table on every call (or leave fp32) and ``MatMulNBits`` leaves in
    fp32. A ``Transpose`` of a constant becomes a constant of the same name; such a
    ``FusedMatMul`` a ``MatMul`` by ``<weight>.transposed``. ONNX Runtime folds the same
    transposes when it loads an fp32 file, so the fp32 file keeps them (smaller on disk)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    kept, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Transpose" and node.input[0] in constants:
            array = numpy_helper.to_array(constants[node.input[0]])
            folded = np.ascontiguousarray(array.transpose(attrs.get("perm")))  # None: reversed
            constants[node.output[0]] = numpy_helper.from_array(folded, node.output[0])
            graph.initializer.append(constants[node.output[0]])
            count += 1
        elif (
            node.op_type == "FusedMatMul"
            and node.input[1] in constants
            and len(constants[node.input[1]].dims) == 2
            and attrs.get("transB") == 1
            and attrs.get("alpha", 1.0) == 1.0
            and not any(attrs.get(k) for k in ("transA", "transBatchA", "transBatchB"))
        ):
            name = f"{node.input[1]}.transposed"
            if name not in constants:
                array = numpy_helper.to_array(constants[node.input[1]])
                constants[name] = numpy_helper.from_array(np.ascontiguousarray(array.T), name)
                graph.initializer.append(constants[name])
            kept.append(
                helper.make_node("MatMul", [node.input[0], name], list(node.output), node.name)
            )
            count += 1
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return count


def quantize(
    src: Path,
    dst: Path,
    preset: Quantization,
    exclude: list[str] | None = None,
    reduce_range: bool | None = None,
) -> dict[str, Any]:
    """Dynamic INT8 quantization of ``src`` into ``dst`` (transposed constant weights folded
    first: :func:`fold_weight_transposes`); returns what was done.

    Weights get 7 bits (``reduce_range``) on an x86 CPU without VNNI, where the u8 x s8
    multiply-add of AVX2 (``vpmaddubsw``) can saturate, and 8 elsewhere
    (:func:`cpu_has_vnni`); ``reduce_range`` given decides instead (to measure both on one CPU).

    Presets:
        per_tensor: one scale per weight tensor (MiniLM: mean cosine ~0.957 — misses the gate).
        per_channel: one scale per output channel of each weight (~0.993).
        per_channel_ffn_fp32: per_channel, but FFN down-projections stay fp32 (~0.996).
        per_channel_sensitive: per_channel, but the nodes ``exclude`` names stay fp32 (chosen
            by :func:`quantize_gated` from measured sensitivity).
    """
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    folded = fold_weight_transposes(model)
    if preset == Quantization.per_channel_ffn_fp32:
        exclude = ffn_down_projections(model)
    vnni = cpu_has_vnni()
    if reduce_range is None:
        reduce_range = not vnni
    external = external_data(src).is_file()  # a model over 2 GiB: INT8 is written the same way
    with tempfile.TemporaryDirectory(dir=dst.parent) as scratch:
        tmp = Path(scratch) / dst.name
        with no_warnings():  # it advises pre-processing, which is for static INT8
            quantize_dynamic(
                # a graph it changed; else the file (a ModelProto is saved and read back)
                model if folded else str(src),
                str(tmp),
                weight_type=QuantType.QInt8,
                per_channel=preset != Quantization.per_tensor,
                reduce_range=reduce_range,
                nodes_to_exclude=list(exclude or []),
                use_external_data_format=external,
                # shape inference cannot type the fused operators' outputs: they are float
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        save_model(onnx.load(str(tmp)), dst, 0 if external else float("inf"))
    return {
        "preset": preset.value,
        "weight_type": "QInt8",
        "activations": "dynamic uint8",
        "fp32_nodes": len(exclude or []),
        "weight_transposes_folded": folded,
        "cpu_vnni": vnni,
        "reduce_range": reduce_range,
    }


# operators dynamic quantization rewrites when one of their inputs is a constant weight (ONNX
# Runtime's IntegerOpsRegistry): products by a weight, and embedding tables
WEIGHTED_OPS = ("MatMul", "Attention", "Gather", "EmbedLayerNormalization")


def weighted_nodes(model: Any) -> list[str]:
    """The nodes INT8 quantizes: matrix products by a weight (plain or fused into attention) and
    embedding lookups."""
    weights = {t.name for t in model.graph.initializer if len(t.dims) >= 2}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in WEIGHTED_OPS and any(i in weights for i in n.input)
    ]


def sensitivity(src: Path, feeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each weighted node's INT8 sensitivity, most sensitive first: the relative error
    ``|q - f| / |f|`` of the first output over ``feeds`` (real inputs) when that node alone is
    quantized per channel."""
    import tempfile

    import numpy as np
    import onnx

    reference = session(src)
    expected = [reference.run(None, feed)[0] for feed in feeds]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        others = weighted_nodes(onnx.load(str(src)))
        for node in others:
            path = Path(tmp) / "one.onnx"
            quantize(src, path, Quantization.per_channel, [n for n in others if n != node])
            sess = session(path)
            errors = [
                np.linalg.norm(sess.run(None, feed)[0] - ref) / (np.linalg.norm(ref) or 1.0)
                for feed, ref in zip(feeds, expected, strict=True)
            ]
            out.append({"node": node, "relative_error": float(np.mean(errors))})
    return sorted(out, key=lambda x: -x["relative_error"])


def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies INT8 with VNNI (AVX512-VNNI, AVX-VNNI or AMX), or is not x86
    (ARM's dot-product instructions do not saturate the way AVX2's ``vpmaddubsw`` does)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False  # unknown: the safe choice is reduce_range
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def spread(items: list[Any], count: int) -> list[Any]:
    """``count`` of ``items`` at even steps from the first to the last (all of them where there
    are fewer), in their order: a sample that keeps a set's mix, however it is ordered."""
    import numpy as np

    picked = np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int)
    return [items[i] for i in picked]


def sample_feeds(items: list[Any], encode: Any, batches: int = 4, size: int = 16) -> list[Any]:
    """A few batches of real inputs spread over ``items`` (:func:`spread`; ``encode(chunk) ->
    feed``, numpy arrays by input name): what :func:`sensitivity` measures on."""
    picked = spread(items, batches * size)
    return [encode(picked[i : i + size]) for i in range(0, len(picked), size)]


def quantize_gated(
    src: Path,
    dst: Path,
    recipes: list[Quantization],
    gate: Any,
    feeds: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], Any, list[str]]:
    """Quantize ``src`` into ``dst`` with each of ``recipes`` in turn (fastest first) until
    ``gate(dst) -> (result, failures)`` passes: the INT8 recipe is chosen by the model's measured
    sensitivity, not one fixed rule.

    ``per_channel_sensitive`` measures each weighted node's :func:`sensitivity` on ``feeds``
    (real inputs of the component) and keeps the 1, 2, 4, ... most sensitive nodes in fp32 until
    the gate passes (at most all but one); without ``feeds`` it is skipped, and says so.

    Returns:
        What was done (:func:`quantize`'s figures of the recipe that ships, plus ``tried``: each
        recipe tried and the gates it missed, and for ``per_channel_sensitive`` the ranking and
        the nodes kept fp32), the last gate result and its failures (empty when a recipe passed;
        otherwise those of the last recipe that ran).
    """
    tried: list[dict[str, Any]] = []
    info: dict[str, Any] = {"preset": None}
    result, failures = None, ["no INT8 recipe in export.quantization could run on this component"]
    for recipe in recipes:
        if recipe != Quantization.per_channel_sensitive:
            info = quantize(src, dst, recipe)
            result, failures = gate(dst)
            tried.append({"preset": recipe.value, "failures": failures})
        elif not feeds:
            tried.append({"preset": recipe.value, "skipped": "no inputs to measure it on"})
            continue
        else:
            ranking = sensitivity(src, feeds)
            k = 1
            while True:
                keep = [r["node"] for r in ranking[:k]]
                info = {**quantize(src, dst, recipe, keep), "fp32_node_names": keep}
                result, failures = gate(dst)
                tried.append({"preset": recipe.value, "fp32_nodes": k, "failures": failures})
                if not failures or k >= len(ranking) - 1:
                    break
                k = min(2 * k, len(ranking) - 1)
            info["sensitivity"] = ranking
        if not failures:
            break
    return {**info, "tried": tried}, result, failures


def parity_batch(ordered: list[Any], size: int) -> list[Any]:
    """``size`` items mixing the shortest and the longest of ``ordered`` (sorted by length), so
    the batch carries real padding; the longest one alone for size 1."""
    return (
        (ordered[: (size + 1) // 2] + ordered[-(size // 2) :])[:size] if size > 1 else ordered[-1:]
    )


def fp32_failures(fp32: dict[str, Any]) -> list[str]:
    """The fp32 max-abs-diff gate, worded as :func:`check_parity` expects (empty if it passed)."""
    if fp32["passed"]:
        return []
    return [
        f"fp32 max abs diff {fp32['max_abs_diff']:.3g} > "
        f"export.parity.fp32_max_abs_diff={fp32['threshold']}"
    ]


def check_parity(component: str, failures: list[str], recipes: list[Quantization]) -> None:
    """Raise :class:`~sphana.errors.ParityError` if any gate failed: ``failures`` are the missed
    gates, each worded with its measured value and its key."""
    from sphana.errors import ParityError

    if failures:
        raise ParityError(
            f"{component} export failed its parity gate (nothing was written): "
            + "; ".join(failures)
            + ". INT8 recipes tried (export.quantization): "
            + ", ".join(r.value for r in recipes)
            + " (per_channel_sensitive keeps the nodes measured most sensitive fp32)."
        )


def session(path: Path, threads: int = 0, profile_prefix: str | None = None) -> Any:
    """An ONNX Runtime CPU session; with ``profile_prefix``, ONNX Runtime's profiler records every
    kernel until ``end_profiling()`` (see :func:`sphana.export.speed.operator_shares`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_ORT_TYPES = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(int32)": "int32"}


def signature(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Input/output names, dtypes and shapes (symbolic axes by name) of an ONNX file."""
    sess = session(path)

    def describe(args: list[Any]) -> list[dict[str, Any]]:
        return [
            {"name": a.name, "dtype": _ORT_TYPES.get(a.type, a.type), "shape": list(a.shape)}
            for a in args
        ]

    return {"inputs": describe(sess.get_inputs()), "outputs": describe(sess.get_outputs())}
