"""Rewrites of an optimized BERT-style ONNX graph for ONNX Runtime's CPU kernels.

ONNX Runtime's transformer optimizer fuses attention and layer norms, but two of the fused CPU
kernels are slower than the arithmetic they replace (``benchmarks/ort_kernels.py`` times them):

- the attention kernels add ``mask_filter_value`` (-10000) to the scores of padding keys. Its
  softmax turns those into denormal floats, and the probabilities-times-values GEMM that reads
  them runs at a fraction of its speed. A mask of :data:`MASK_FILTER_VALUE` weighs padding keys
  by ``e**-60`` (zero at fp32 resolution) and keeps them normal: masked attention as fast as
  unmasked;
- ``SkipLayerNormalization`` (residual add + layer norm) runs twice as fast as the ten standard
  operators it stands for. :func:`decompose_skip_layer_norms` writes those operators back.

Measured on the built encoders, side by side (README, "Converting a model trained elsewhere"):
INT8 batch throughput from 1.9x to 2.3x PyTorch's (embedding) and from 2.1x to 3.0x (relation),
fp32 from 0.9x to 1.0x. Both rewrites are exact up to float rounding (the fp32 graph stays within
2e-7 of PyTorch's embeddings); the export's parity gates check every build.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Additive mask on the attention scores of padding keys: low enough that their softmax weight
# (e**-60 ~ 1e-26) vanishes next to any real key's, high enough that exp() stays a normal float
# for scores within ~25 of the row's maximum (below e**-87 floats turn denormal)
MASK_FILTER_VALUE = -60.0
ATTENTION_OPS = ("Attention", "QAttention")


def set_mask_filter_value(model: Any, value: float = MASK_FILTER_VALUE) -> int:
    """Set ``mask_filter_value`` on every fused attention node of ``model``; returns how many."""
    from onnx import helper

    count = 0
    for node in model.graph.node:
        if node.op_type in ATTENTION_OPS and node.domain == "com.microsoft":
            kept = [a for a in node.attribute if a.name != "mask_filter_value"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("mask_filter_value", value)])
            count += 1
    return count


def decompose_skip_layer_norms(model: Any) -> int:
    """Replace every ``SkipLayerNormalization`` node of ``model`` whose mean and inverse-std
    outputs nothing reads by the standard operators it computes::

        sum = input + skip (+ bias);  c = sum - mean(sum)
        out = c / sqrt(mean(c * c) + eps) * gamma (+ beta)

    (the square as ``Mul``: ONNX Runtime's session optimizer fuses the pattern with a ``Pow``
    back into ``SkipLayerNormalization``). Its optional ``input_skip_bias_sum`` output keeps its
    name. Returns the number of nodes replaced."""
    from onnx import helper, numpy_helper

    graph = model.graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes: list[Any] = []
    constants: list[Any] = []
    count = 0

    def mean(src: str, dst: str) -> Any:  # ReduceMean's axes became an input at opset 18
        if opset >= 18:
            return helper.make_node("ReduceMean", [src, "layer_norm/last_axis"], [dst])
        return helper.make_node("ReduceMean", [src], [dst], axes=[-1])

    for node in graph.node:
        outputs = list(node.output) + [""] * (4 - len(node.output))
        if node.op_type != "SkipLayerNormalization" or {o for o in outputs[1:3] if o} & read:
            nodes.append(node)
            continue
        inputs = list(node.input) + [""] * (5 - len(node.input))
        x, skip, gamma, beta, bias = inputs[:5]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        p = f"layer_norm/{count}/"
        constants.append(numpy_helper.from_array(np.array(eps, np.float32), p + "epsilon"))
        total = outputs[3] or p + "sum"
        if bias:
            nodes.append(helper.make_node("Add", [x, skip], [p + "residual"]))
            nodes.append(helper.make_node("Add", [p + "residual", bias], [total]))
        else:
            nodes.append(helper.make_node("Add", [x, skip], [total]))
        scaled = p + "scaled" if beta else outputs[0]
        nodes += [
            mean(total, p + "mean"),
            helper.make_node("Sub", [total, p + "mean"], [p + "centred"]),
            helper.make_node("Mul", [p + "centred", p + "centred"], [p + "square"]),
            mean(p + "square", p + "variance"),
            helper.make_node("Add", [p + "variance", p + "epsilon"], [p + "variance_eps"]),
            helper.make_node("Sqrt", [p + "variance_eps"], [p + "std"]),
            helper.make_node("Div", [p + "centred", p + "std"], [p + "normed"]),
            helper.make_node("Mul", [p + "normed", gamma], [scaled]),
        ]
        if beta:
            nodes.append(helper.make_node("Add", [scaled, beta], [outputs[0]]))
        count += 1
    if count and opset >= 18:
        constants.append(numpy_helper.from_array(np.array([-1], np.int64), "layer_norm/last_axis"))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    return count
