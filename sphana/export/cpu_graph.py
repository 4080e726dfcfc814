"""Rewrites of an optimized BERT-style ONNX graph for ONNX Runtime's CPU kernels.

ONNX Runtime's transformer optimizer fuses attention and layer norms, but two of its fused CPU
paths are slower than they need to be (``benchmarks/ort_kernels.py`` times them):

- the attention kernels add ``mask_filter_value`` (-10000) to the scores of padding keys. Their
  softmax turns those into denormal floats, and the probabilities-times-values GEMM that reads
  them runs at a fraction of its speed. A mask of :data:`MASK_FILTER_VALUE` keeps them normal:
  masked attention 1.5x faster, near the unmasked (flash) path;
- ``SkipLayerNormalization`` (residual add + layer norm) runs at half the speed of the ten
  standard operators it stands for (eleven with a bias). :func:`decompose_skip_layer_norms` writes
  those operators back.

Measured on the built encoders, side by side (README, "Converting a model trained elsewhere"):
INT8 batch throughput from 1.9x to 2.3x PyTorch's (embedding) and from 2.1x to 3.0x (relation),
fp32 from 0.9x to 1.0x. The layer-norm rewrite is exact up to float rounding; the mask is exact
as long as no padding key scores more than ~44 above a row's best real key (below). The export's
parity gates check every build, at several paddings.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

# Additive mask on the attention scores of padding keys. A padding key's softmax weight is then
# e**(its score - the best real key's - 60): below fp32 resolution (e**-16.6) while its raw score
# is less than ~44 above the best real key's, which trained encoders' scores are far from (their
# gates compare with PyTorch on padded batches). High enough that exp() stays a normal float for
# scores up to ~27 below that key's (below e**-87 floats turn denormal). A runtime that sets ONNX
# Runtime's session.set_denormal_as_zero gets most of the speed at -10000 as well.
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

        sum = input (+ bias) + skip;  c = sum - mean(sum)
        out = c / sqrt(mean(c * c) + eps) * gamma (+ beta)

    (the square as ``Mul``: ONNX Runtime's session optimizer fuses the pattern with a ``Pow``
    back into ``SkipLayerNormalization``). Its optional ``input_skip_bias_sum`` output keeps its
    name; the tensors and nodes it adds are named under a prefix no name in the graph has. For
    fp32 graphs (the epsilon is a float32 constant). Returns the number of nodes replaced."""
    from onnx import numpy_helper

    graph = model.graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    taken = read | {o for n in graph.node for o in (*n.output, n.name)}
    taken |= {t.name for t in graph.initializer}
    base = "layer_norm"
    while any(name.startswith(base + "/") for name in taken):
        base += "_"
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    last_axis = base + "/last_axis"
    nodes: list[Any] = []
    constants: list[Any] = []
    count = 0

    for node in graph.node:
        outputs = list(node.output) + [""] * (4 - len(node.output))
        if (
            node.op_type != "SkipLayerNormalization"
            or node.domain != "com.microsoft"
            or {o for o in outputs[1:3] if o} & read
        ):
            nodes.append(node)
            continue
        p = f"{base}/{count}/"
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        constants.append(numpy_helper.from_array(np.array(eps, np.float32), p + "epsilon"))
        nodes += _standard_layer_norm(
            list(node.input), outputs, p, last_axis if opset >= 18 else ""
        )
        count += 1
    if count and opset >= 18:
        constants.append(numpy_helper.from_array(np.array([-1], np.int64), last_axis))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    return count


def _standard_layer_norm(inputs: list[str], outputs: list[str], p: str, axes: str) -> list[Any]:
    """The nodes of one SkipLayerNormalization (``inputs``/``outputs`` as the node has them),
    named under ``p`` and reading its epsilon from ``p + "epsilon"``; ``axes``: the name of the
    [-1] axes tensor ReduceMean takes from opset 18, or "" for the attribute before."""
    from onnx import helper

    x, skip, gamma, beta, bias = (inputs + [""] * 5)[:5]
    ids = itertools.count()

    def op(op_type: str, args: list[str], output: str, **attrs: Any) -> Any:
        name = f"{p}{op_type}_{next(ids)}"
        return helper.make_node(op_type, args, [output], name=name, **attrs)

    def mean(src: str, dst: str) -> Any:
        return (
            op("ReduceMean", [src, axes], dst) if axes else op("ReduceMean", [src], dst, axes=[-1])
        )

    total = outputs[3] or p + "sum"
    nodes = (  # the bias first: ONNX Runtime folds an Add of a constant into the MatMul before it
        [op("Add", [x, bias], p + "biased"), op("Add", [p + "biased", skip], total)]
        if bias
        else [op("Add", [x, skip], total)]
    )
    scaled = p + "scaled" if beta else outputs[0]
    nodes += [
        mean(total, p + "mean"),
        op("Sub", [total, p + "mean"], p + "centred"),
        op("Mul", [p + "centred", p + "centred"], p + "square"),
        mean(p + "square", p + "variance"),
        op("Add", [p + "variance", p + "epsilon"], p + "variance_eps"),
        op("Sqrt", [p + "variance_eps"], p + "std"),
        op("Div", [p + "centred", p + "std"], p + "normed"),
        op("Mul", [p + "normed", gamma], scaled),
    ]
    if beta:
        nodes.append(op("Add", [scaled, beta], outputs[0]))
    return nodes
