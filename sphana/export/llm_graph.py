"""Fused operators for the generator's ONNX graph, exact under the export's contract.

torch.onnx (dynamo) writes a Qwen2/Llama decoder as plain operators: RMS norms as
``Pow``/``ReduceMean``/``Sqrt``, rotary embeddings as ``Slice``/``Neg``/``Concat`` arithmetic,
attention as ``MatMul``/``Softmax``. :func:`fuse_generator` rewrites them into ONNX Runtime's
fused operators, in order:

1. onnxscript's ONNX Runtime fusions (:func:`onnxscript.rewriter.ort_fusions.optimize_for_ort`):
   ``SimplifiedLayerNormalization``/``SkipSimplifiedLayerNormalization``, and attention as
   ``MultiHeadAttention`` whose ``attention_bias`` is the model's own mask (causal, padding and any
   sliding window, computed from ``attention_mask`` as before); the past keys and values are
   joined and repeated for the query heads before it, as in the PyTorch model;
2. transformers' rotary embedding (``position_ids * inv_freq``, ``cos``/``sin`` of it) becomes
   ``RotaryEmbedding`` reading ``position_ids`` itself, with a ``cos``/``sin`` table computed up to
   the largest position of the call (:func:`_rotary_rule`).

Not ``GroupQueryAttention``: onnxscript fuses it only where it can drop the mask, after
onnxruntime-genai's convention (valid tokens first, positions and lengths counted from
``position_ids``), under which a left-padded row of this contract attends to its padding; with
the mask as its ``attention_bias`` instead, ONNX Runtime's CPU kernel still refuses a step of
several tokens after a past for a batch of more than one ("batch_size must be 1 when
sequence_length > 1 and past context is given"), which the contract allows. A graph where it
appears anyway (another onnxscript) is refused by :func:`fuse_generator`.

The parity gates of :mod:`sphana.export.llm` (left-padded prefill and cached steps against
PyTorch) decide whether the result ships, as they do for any graph.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

# fused operators the generator's graph may hold (ONNX Runtime's; SimplifiedLayerNormalization
# in the ONNX domain, where ONNX Runtime registers it, the others in com.microsoft)
FUSED_OPS = (
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
)


def _rotary_rule() -> Any:
    """The rewrite rule of step 2 (built on first use: onnxscript imports slowly)."""
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
                _domain="com.microsoft",
            )

    return pattern.RewriteRuleSet([_PositionRotary.rule()])


def fuse_generator(model: Any) -> tuple[Any, dict[str, Any]]:
    """The fused graph of ``model`` (a ModelProto of the export's signature) and what was fused:
    ``fused_operators`` (counts) and ``attention_fused`` (one fused attention per layer; a graph
    where it is not is still exact, only slower).

    Raises:
        RuntimeError: onnxscript fused a ``GroupQueryAttention`` (see the module's docstring).
    """
    import onnx_ir as ir
    from onnxscript import optimizer
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding

    graph, _ = optimize_for_ort(ir.serde.deserialize_model(model))
    fuse_rotary_embedding(graph)  # as onnxscript functions, which _rotary_rule rewrites
    rewrite(graph, _rotary_rule())
    optimizer.optimize(graph)  # inlines any it did not match back into plain operators
    fused = ir.serde.serialize_model(graph)
    ops = Counter(n.op_type for n in fused.graph.node)
    if ops["GroupQueryAttention"]:
        raise RuntimeError(
            "onnxscript fused GroupQueryAttention into the generator's graph, whose padding "
            "convention is not this export's (sphana/export/llm_graph.py); install the "
            "onnxscript release pyproject.toml names"
        )
    counts = {op: ops[op] for op in FUSED_OPS}
    layers = sum(1 for i in fused.graph.input if i.name.endswith(".key"))
    return fused, {
        "optimizer": "onnxscript.rewriter.ort_fusions",
        "fused_operators": counts,
        "attention_fused": counts["MultiHeadAttention"] == layers,
    }
