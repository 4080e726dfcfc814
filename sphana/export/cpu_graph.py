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


# Operators that compute each token's row from that row alone (when :func:`_row_wise` holds):
# they give the same rows on the real tokens alone as on a padded batch
ROW_WISE_OPS = {
    "": (
        *("Add", "Sub", "Mul", "Div", "MatMul", "ReduceMean", "LayerNormalization"),
        *("Sqrt", "Erf", "Tanh", "Relu"),
    ),
    "com.microsoft": ("BiasGelu", "FastGelu", "Gelu", "SkipLayerNormalization"),
}
# Attention operators: their first output is a padded batch of token rows (in their query's batch
# and sequence) that row-wise operators read
ROW_SOURCES = (*ATTENTION_OPS, "MultiHeadAttention")


def remove_padding(model: Any) -> int:
    """Run the row-wise operators of an optimized BERT-style ``model`` (projections, biases,
    GELU, residual adds, layer norms: all but attention and pooling) on the batch's real tokens
    only, as ``[1, tokens, width]`` rows, instead of on every padded position.

    A token is real where the attention mask that ``EmbedLayerNormalization`` reads is non-zero.
    The rows are gathered from the padded ``[batch, sequence, width]`` tensors that the embedding
    and each attention node after it write, and put back in the padded layout for the nodes that
    need it (attention, pooling, the graph's outputs), with zeros at the padding. At real tokens
    every tensor is the padded graph's: each of these operators computes a row from that row
    alone. A node that reads the padding's positions (attention masks them out, a pooling by the
    mask ignores them) sees zeros there: the export's parity gates, on padded batches, compare
    what such a graph computes with PyTorch. A graph this does not fit is left as it is: no
    fused embedding (no mask to read), more than one, or subgraphs (``If``, ``Loop``) that
    could read a rewritten tensor. Returns the number of nodes that now run on real tokens only.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    embeds = [n for n in graph.node if n.op_type == "EmbedLayerNormalization"]
    subgraphs = any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute)
    if len(embeds) != 1 or len(embeds[0].input) < 8 or not embeds[0].input[7] or subgraphs:
        return 0
    embed = embeds[0]
    fed = {i.name for i in graph.input}  # an initializer that is also an input is not constant
    constants = {t.name: t for t in graph.initializer if t.name not in fed} | {
        n.output[0]: a.t
        for n in graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    }
    shapes = {name: tuple(t.dims) for name, t in constants.items()}
    axes = {  # the values of small integer constants (ReduceMean's axes from opset 18)
        name: numpy_helper.to_array(t).reshape(-1).tolist()
        for name, t in constants.items()
        if t.data_type == TensorProto.INT64 and len(t.dims) <= 1 and np.prod(t.dims) <= 4
    }
    taken = {name for n in graph.node for name in (*n.input, *n.output, n.name)} | set(shapes)
    base = "real_tokens"
    while any(name.startswith(base + "/") for name in taken):
        base += "_"
    p = base + "/"
    ids = itertools.count()

    def op(op_type: str, args: list[str], output: str, **attrs: Any) -> Any:
        return helper.make_node(op_type, args, [output], f"{p}{op_type}_{next(ids)}", **attrs)

    for name, value in (("flat", [-1]), ("zero_row_pads", [1, 0, 0, 0]), ("axis", 0)):
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), p + name))
    # each real token's position in the flattened batch; each position's row + 1 (0: padding)
    positions = [
        op("Cast", [embed.input[7]], p + "real", to=TensorProto.BOOL),
        op("Cast", [p + "real"], p + "real_int", to=TensorProto.INT64),
        op("Reshape", [p + "real_int", p + "flat"], p + "real_flat"),
        op("NonZero", [p + "real_flat"], p + "positions"),
        op("CumSum", [p + "real_flat", p + "axis"], p + "count"),
        op("Mul", [p + "count", p + "real_flat"], p + "row_of_position"),
        op("Shape", [p + "real_int"], p + "batch_sequence"),
        op("Concat", [p + "batch_sequence", p + "flat"], p + "padded_shape", axis=0),
    ]
    nodes: list[Any] = []
    rows_of: dict[str, str] = {}  # a tensor of the padded graph -> its rows
    padded: dict[str, str] = {}  # rows -> that padded tensor

    def gather(tensor: str) -> None:
        k = f"{p}{next(ids)}/"
        nodes.append(op("Flatten", [tensor], k + "flat", axis=2))
        nodes.append(op("Gather", [k + "flat", p + "positions"], k + "rows", axis=0))
        rows_of[tensor] = k + "rows"
        padded[k + "rows"] = tensor

    def scatter(rows: str) -> str:
        if rows not in padded:
            k = f"{p}{next(ids)}/"
            nodes.append(op("Flatten", [rows], k + "flat", axis=2))
            nodes.append(op("Pad", [k + "flat", p + "zero_row_pads"], k + "zero_first"))
            nodes.append(op("Gather", [k + "zero_first", p + "row_of_position"], k + "flat_padded"))
            nodes.append(op("Reshape", [k + "flat_padded", p + "padded_shape"], k + "padded"))
            padded[rows] = k + "padded"
        return padded[rows]

    outputs = {o.name for o in graph.output}
    renamed: list[str] = []  # graph outputs a row-wise node writes
    count = 0
    for node in list(graph.node):
        downstream = bool(node.input) and node.input[0] in rows_of  # of the embedding
        data = [i for i in node.input if i and i not in shapes]
        if data and all(i in rows_of for i in data) and _row_wise(node, shapes, axes):
            for j, name in enumerate(node.input):
                node.input[j] = rows_of.get(name, name)
            for j, name in enumerate(node.output):
                if name in outputs:  # its name is for the padded layout, written from the rows
                    node.output[j] = f"{p}{next(ids)}/rows"
                    renamed.append(name)
                rows_of[name] = node.output[j]
            nodes.append(node)
            count += 1
            continue
        for j, name in enumerate(node.input):
            if name in rows_of:
                node.input[j] = scatter(rows_of[name])
        nodes.append(node)
        if node is embed:  # after the node that reads the mask, as they do
            nodes += positions
        source = node.op_type in ROW_SOURCES and node.domain == "com.microsoft"
        if node is embed or (source and downstream):  # in the embedding's batch and sequence
            gather(node.output[0])
    for name in renamed:
        nodes.append(op("Identity", [scatter(rows_of[name])], name))
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _row_wise(node: Any, shapes: dict[str, tuple[int, ...]], axes: dict[str, list[int]]) -> bool:
    """Whether ``node`` computes each row of its ``[batch, sequence, width]`` inputs from that
    row alone, so that it can run on ``[1, tokens, width]`` rows: an operator of
    :data:`ROW_WISE_OPS` whose constant inputs (``shapes``: their dimensions; ``axes``: the
    values of the small integer ones) are weights along the width (a ``MatMul``'s ``[in, out]``
    matrix; elsewhere no dimension over 1 but the last) and that reduces along the width only."""
    from onnx import helper

    if node.op_type not in ROW_WISE_OPS.get(node.domain or "", ()):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        return len(shapes.get(node.input[1], ())) == 2
    if node.op_type == "ReduceMean":  # axes: an attribute before opset 18, an input from 18
        reduced = attrs.get("axes") or (axes.get(node.input[1]) if len(node.input) > 1 else None)
        return list(reduced or []) in ([-1], [2]) and attrs.get("keepdims", 1) == 1
    if node.op_type == "LayerNormalization" and attrs.get("axis", -1) not in (-1, 2):
        return False
    return all(
        len(shapes[i]) <= 3 and all(d == 1 for d in shapes[i][:-1])
        for i in node.input
        if i in shapes
    )
