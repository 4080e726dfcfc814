"""Fused operators for the generator's ONNX graph, exact under the export's contract.

torch.onnx (dynamo) writes a Qwen2/Llama decoder as plain operators: RMS norms as
``Pow``/``ReduceMean``/``Sqrt``, rotary embeddings as ``Slice``/``Neg``/``Concat`` arithmetic,
attention as ``MatMul``/``Softmax`` over keys repeated for every query head. onnxscript's ONNX
Runtime fusions (:func:`onnxscript.rewriter.ort_fusions.optimize_for_ort`) rewrite these into
``SimplifiedLayerNormalization``/``SkipSimplifiedLayerNormalization`` and
``GroupQueryAttention``, but their ``GroupQueryAttention`` follows onnxruntime-genai's
convention: valid tokens first (right padding), lengths read off ``position_ids`` and positions
counted from there. The export's contract (DESIGN.md, the .NET consumer) is a left-padded
prefill, an ``attention_mask`` over past + new tokens and explicit ``position_ids``, under which
that graph is wrong for every padded row. So, in order:

1. transformers' rotary embedding (``position_ids * inv_freq``, ``cos``/``sin`` of it) becomes
   ``com.microsoft.RotaryEmbedding`` reading ``position_ids`` itself, with a ``cos``/``sin``
   table computed up to the largest position of the call (:class:`_PositionRotary`);
2. onnxscript's fusions (RMS norms, attention);
3. every ``GroupQueryAttention`` is rewired to the contract (:func:`_left_padded_attention`):
   every row counted at the full length, padding masked by an ``attention_bias`` built from
   ``attention_mask`` (the causal part stays the operator's own), rotary applied before it by
   ``RotaryEmbedding`` with the given ``position_ids`` (the operator's own rotary derives
   positions from lengths).

The parity gates of :mod:`sphana.export.llm` (left-padded prefill and cached steps against
PyTorch) decide whether the result ships, as they do for any graph.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

# fused operators the generator's graph may hold (ONNX Runtime's; SimplifiedLayerNormalization
# in the ONNX domain, where ONNX Runtime registers it, the others in com.microsoft)
FUSED_OPS = (
    "GroupQueryAttention",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
)
_MS = "com.microsoft"


def _rotary_rule() -> Any:
    """The rewrite rule of step 1 (built on first use: onnxscript imports slowly)."""
    import onnx_ir as ir
    from onnxscript.rewriter import pattern

    class _PositionRotary(pattern.RewriteRuleClassBase):
        """onnxscript's intermediate ``RotaryEmbedding(x, cos, sin)`` (its fusion of
        ``x * cos + rotate_half(x) * sin``), where ``cos``/``sin`` are those of
        ``Concat(f, f)`` with ``f = float(position_ids[..., None]) * inv_freq``, as
        transformers computes them -> ``com.microsoft.RotaryEmbedding(x, position_ids,
        cos_table, sin_table)``; one table per ``inv_freq``, shared by every layer."""

        def __init__(self) -> None:
            super().__init__("PositionRotary", remove_nodes=False)
            self._tables: dict[Any, tuple[Any, Any]] = {}

        def cleanup(self) -> None:
            self._tables.clear()

        def pattern(self, op, x, position_ids, axes, inv_freq, interleaved, num_heads):
            positions = op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT)
            angles = op.Mul(positions, inv_freq)
            both = op.Concat(angles, angles, axis=-1)
            return op.RotaryEmbedding(
                x,
                op.Unsqueeze(op.Cos(both), [1]),
                op.Unsqueeze(op.Sin(both), [1]),
                interleaved=interleaved,
                num_heads=num_heads,
                _domain="ai.onnxruntime._fusion",
            )

        def check(self, context, position_ids, inv_freq, **_):
            result = pattern.MatchResult()
            if inv_freq.const_value is None or len(inv_freq.const_value.shape) != 1:
                return result.fail("inv_freq is not a 1-D constant", inv_freq)
            if position_ids.shape is None or len(position_ids.shape) != 2:
                return result.fail("position_ids is not [batch, sequence]", position_ids)
            return result

        def rewrite(self, op, x, position_ids, inv_freq, interleaved, num_heads, **_):
            if inv_freq not in self._tables:
                end = op.Add(op.ReduceMax(position_ids, keepdims=0), op.Constant(value_int=1))
                rows = op.Range(op.Constant(value_int=0), end, op.Constant(value_int=1))
                rows = op.Cast(rows, to=ir.DataType.FLOAT)
                column = op.Unsqueeze(rows, op.Constant(value_ints=[1]))
                angles = op.Mul(column, inv_freq)  # [max position + 1, head_dim / 2]
                self._tables[inv_freq] = (op.Cos(angles), op.Sin(angles))
            cos, sin = self._tables[inv_freq]
            return op.RotaryEmbedding(
                x,
                position_ids,
                cos,
                sin,
                interleaved=interleaved,
                num_heads=num_heads,
                _domain=_MS,
            )

    return pattern.RewriteRuleSet([_PositionRotary.rule()])


def _left_padded_attention(model: Any) -> int:
    """Step 3 on ``model`` (a ModelProto, in place); returns how many attention nodes."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    attention = [n for n in graph.node if n.domain == _MS and n.op_type == "GroupQueryAttention"]
    if not attention:
        return 0
    constants = {
        "gqa.zero": np.array([0], np.int64),
        "gqa.one": np.array([1], np.int64),
        "gqa.two": np.array([2], np.int64),
        "gqa.one_i32": np.array(1, np.int32),
        "gqa.mask_axes": np.array([1, 2], np.int64),
        "gqa.attend": np.array(0.0, np.float32),
        "gqa.masked": np.array(np.finfo(np.float32).min, np.float32),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    node = helper.make_node
    shared = [  # from the inputs: lengths (every row at full length) and the padding bias
        node("Shape", ["attention_mask"], ["gqa.mask_shape"]),
        node("Slice", ["gqa.mask_shape", "gqa.zero", "gqa.one"], ["gqa.batch"]),
        node("Slice", ["gqa.mask_shape", "gqa.one", "gqa.two"], ["gqa.total_1d"]),
        node("Shape", ["input_ids"], ["gqa.ids_shape"]),
        node("Slice", ["gqa.ids_shape", "gqa.one", "gqa.two"], ["gqa.sequence"]),
        node("Squeeze", ["gqa.total_1d"], ["gqa.total_i64"]),
        node("Cast", ["gqa.total_i64"], ["gqa.total"], to=TensorProto.INT32),
        node("Sub", ["gqa.total", "gqa.one_i32"], ["gqa.last"]),
        node("Expand", ["gqa.last", "gqa.batch"], ["gqa.seqlens_k"]),
        node("Unsqueeze", ["attention_mask", "gqa.mask_axes"], ["gqa.mask_4d"]),
        node("Cast", ["gqa.mask_4d"], ["gqa.keep"], to=TensorProto.BOOL),
        node("Where", ["gqa.keep", "gqa.attend", "gqa.masked"], ["gqa.bias_row"]),
        node(
            "Concat",
            ["gqa.batch", "gqa.one", "gqa.sequence", "gqa.total_1d"],
            ["gqa.bias_shape"],
            axis=0,
        ),
        node("Expand", ["gqa.bias_row", "gqa.bias_shape"], ["gqa.bias"]),
    ]
    nodes, rewire = shared, {id(n) for n in attention}
    for n in graph.node:
        if id(n) in rewire:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            ins = [*n.input, *[""] * (11 - len(n.input))]
            if attrs.get("do_rotary"):  # query, key rotated by the given positions first
                for i, heads in ((0, "num_heads"), (1, "kv_num_heads")):
                    rotated = f"{n.output[0]}.rotary_{i}"
                    nodes.append(
                        node(
                            "RotaryEmbedding",
                            [ins[i], "position_ids", ins[7], ins[8]],
                            [rotated],
                            domain=_MS,
                            num_heads=attrs[heads],
                            interleaved=attrs.get("rotary_interleaved", 0),
                        )
                    )
                    ins[i] = rotated
                attrs["do_rotary"] = 0
            ins[5], ins[6], ins[7], ins[8], ins[10] = (
                "gqa.seqlens_k",
                "gqa.total",
                "",
                "",
                "gqa.bias",
            )
            del n.input[:]
            n.input.extend(ins[: max(i for i, name in enumerate(ins) if name) + 1])
            del n.attribute[:]
            n.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(attention)


def fuse_generator(model: Any) -> tuple[Any, dict[str, Any]]:
    """The fused graph of ``model`` (a ModelProto of the export's signature) and what was fused:
    ``fused_operators`` (counts), ``attention_fused`` (one fused attention per layer; a graph
    where it is not is still exact, only slower) and ``left_padded_attention`` (the
    ``GroupQueryAttention`` nodes rewired to the contract)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    from onnxscript import optimizer
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding

    graph = ir.serde.deserialize_model(model)
    passes.ShapeInferencePass()(graph)
    optimizer.optimize(graph)
    fuse_rotary_embedding(graph)
    rewrite(graph, _rotary_rule())
    graph, _ = optimize_for_ort(graph)
    fused = ir.serde.serialize_model(graph)
    rewired = _left_padded_attention(fused)
    ops = Counter(n.op_type for n in fused.graph.node)
    counts = {op: ops[op] for op in FUSED_OPS}
    layers = sum(1 for i in fused.graph.input if i.name.endswith(".key"))
    return fused, {
        "optimizer": "onnxscript.rewriter.ort_fusions",
        "fused_operators": counts,
        "attention_fused": counts["GroupQueryAttention"] + counts["MultiHeadAttention"] == layers,
        "left_padded_attention": rewired,
    }
