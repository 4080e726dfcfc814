"""The graph rewrites of the export (sphana.export.cpu_graph's for ONNX Runtime's CPU kernels, and
the constant folding the quantizers need) on graphs built here, run by ONNX Runtime before and
after: the same outputs, other operators."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sphana.export.cpu_graph import (
    decompose_skip_layer_norms,
    remove_padding,
    set_mask_filter_value,
)

HIDDEN = 16


def model_of(nodes: list, inputs: list[str], outputs: list[str], weights: dict, opset: int):
    def info(name: str, shape: list) -> object:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    graph = helper.make_graph(
        nodes,
        "g",
        [info(name, ["batch", "sequence", HIDDEN]) for name in inputs],
        [info(name, ["batch", "sequence", None]) for name in outputs],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def run(model, feeds: dict, optimized: Path | None = None) -> list[np.ndarray]:
    """``model``'s outputs on ``feeds``; with ``optimized``, the graph ONNX Runtime runs after its
    own session-level fusions is written there."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized:
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3  # its warning that the file is for this machine only
    sess = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("opset", [17, 18])
def test_skip_layer_norms_become_standard_operators_with_the_same_outputs(
    opset: int, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    weights = {
        name: rng.standard_normal(HIDDEN).astype(np.float32)
        for name in ("gamma", "beta", "bias", "gamma2")
    }
    skip_ln = "SkipLayerNormalization"
    nodes = [
        # bias and beta, and the residual sum read by a later node
        helper.make_node(
            skip_ln,
            ["x", "skip", "gamma", "beta", "bias"],
            ["y1", "", "", "sum1"],
            domain="com.microsoft",
            epsilon=1e-5,
        ),
        # neither: gamma alone
        helper.make_node(skip_ln, ["y1", "sum1", "gamma2"], ["y2"], domain="com.microsoft"),
        # its mean is read: kept fused
        helper.make_node(
            skip_ln, ["y2", "x", "gamma", "beta"], ["y3", "mean3"], domain="com.microsoft"
        ),
    ]
    model = model_of(nodes, ["x", "skip"], ["y2", "y3", "mean3"], weights, opset)
    feeds = {
        "x": rng.standard_normal((2, 5, HIDDEN)).astype(np.float32) * 3,
        "skip": rng.standard_normal((2, 5, HIDDEN)).astype(np.float32),
    }
    before = run(model, feeds)

    assert decompose_skip_layer_norms(model) == 2
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops[skip_ln] == 1 and ops["ReduceMean"] == 4 and ops["Pow"] == 0, ops
    for got, want in zip(run(model, feeds, tmp_path / "run.onnx"), before, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # what ONNX Runtime runs: its session optimizer did not fuse them back
    ran = Counter(n.op_type for n in onnx.load(str(tmp_path / "run.onnx")).graph.node)
    assert ran[skip_ln] == 1 and ran["LayerNormalization"] == 0, ran

    # a second pass, over one more fused node, names what it adds apart from the first's
    model.graph.node.append(
        helper.make_node(skip_ln, ["y2", "skip", "gamma"], ["y4"], domain="com.microsoft")
    )
    model.graph.output.append(
        helper.make_tensor_value_info("y4", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])
    )
    before = run(model, feeds)
    assert decompose_skip_layer_norms(model) == 1
    onnx.checker.check_model(model)  # names still unique (SSA), nodes in order
    for got, want in zip(run(model, feeds), before, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_attention_masks_padding_with_the_fast_value_and_the_same_outputs() -> None:
    rng = np.random.default_rng(1)
    weights = {
        "w": rng.standard_normal((HIDDEN, 3 * HIDDEN)).astype(np.float32),
        "b": rng.standard_normal(3 * HIDDEN).astype(np.float32),
    }
    node = helper.make_node(
        "Attention", ["x", "w", "b", "mask"], ["y"], domain="com.microsoft", num_heads=2
    )
    model = model_of([node], ["x"], ["y"], weights, 18)
    model.graph.input.append(
        helper.make_tensor_value_info("mask", TensorProto.INT32, ["batch", "sequence"])
    )
    mask = np.ones((3, 7), np.int32)
    mask[1, 4:] = mask[2, 1:] = 0  # right padding, down to a single real token
    feeds = {"x": rng.standard_normal((3, 7, HIDDEN)).astype(np.float32), "mask": mask}
    before = run(model, feeds)[0]

    assert set_mask_filter_value(model) == 1
    (value,) = [a.f for a in model.graph.node[0].attribute if a.name == "mask_filter_value"]
    assert value == -60.0
    after = run(model, feeds)[0]
    real = mask.astype(bool)  # padded positions' outputs are never read
    np.testing.assert_allclose(after[real], before[real], atol=1e-5)


def encoder_layer(opset: int) -> tuple[object, dict]:
    """A BERT-style graph as the export writes it: the fused embedding (which reads the mask),
    attention, a projection with its bias, a residual add + layer norm (SkipLayerNormalization),
    BiasGelu, then mean pooling by the mask; besides, an output read straight from a row-wise
    node and one from a node that is not row-wise (a constant per position). Its inputs for a
    right-padded batch."""
    rng = np.random.default_rng(4)
    vocab, positions = 30, 8
    w = {
        "words": (vocab, HIDDEN),
        "positions": (positions, HIDDEN),
        "segments": (2, HIDDEN),
        "gamma": (HIDDEN,),
        "beta": (HIDDEN,),
        "qkv": (HIDDEN, 3 * HIDDEN),
        "qkv_bias": (3 * HIDDEN,),
        "out": (HIDDEN, HIDDEN),
        "out_bias": (HIDDEN,),
        "up": (HIDDEN, 2 * HIDDEN),
        "up_bias": (2 * HIDDEN,),
        "per_position": (1, 5, HIDDEN),
    }
    weights = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in w.items()}
    weights["eps"] = np.array(1e-5, np.float32)
    ms = "com.microsoft"
    nodes = [
        helper.make_node("Cast", ["mask"], ["mask32"], to=TensorProto.INT32),
        helper.make_node(
            "EmbedLayerNormalization",
            ["ids", "segment_ids", "words", "positions", "segments", "gamma", "beta", "mask32"],
            ["embedded", "mask_index"],
            domain=ms,
        ),
        helper.make_node(
            "Attention",
            ["embedded", "qkv", "qkv_bias", "mask_index"],
            ["attended"],
            domain=ms,
            num_heads=2,
        ),
        helper.make_node("MatMul", ["attended", "out"], ["projected"]),
        helper.make_node(
            "SkipLayerNormalization",
            ["projected", "embedded", "gamma", "beta", "out_bias"],
            ["normed"],
            domain=ms,
            epsilon=1e-5,
        ),
        helper.make_node("MatMul", ["normed", "up"], ["up_projected"]),
        helper.make_node("BiasGelu", ["up_projected", "up_bias"], ["activated"], domain=ms),
        helper.make_node("Unsqueeze", ["mask", "last"], ["mask_3d"]),
        helper.make_node("Cast", ["mask_3d"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["normed", "mask_float"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "sequence_axis"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_float", "sequence_axis"], ["counts"], keepdims=0),
        helper.make_node("Div", ["summed", "counts"], ["pooled"]),
        helper.make_node("Add", ["normed", "per_position"], ["by_position"]),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [
            helper.make_tensor_value_info(n, t, ["batch", "sequence"])
            for n, t in [
                ("ids", TensorProto.INT32),
                ("segment_ids", TensorProto.INT32),
                ("mask", TensorProto.INT64),
            ]
        ],
        [
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", HIDDEN]),
            helper.make_tensor_value_info(
                "activated", TensorProto.FLOAT, ["batch", "sequence", 2 * HIDDEN]
            ),
            helper.make_tensor_value_info(
                "by_position", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]
            ),
        ],
        [numpy_helper.from_array(a, n) for n, a in weights.items()]
        + [
            numpy_helper.from_array(np.array(v, np.int64), n)
            for n, v in [("last", [-1]), ("sequence_axis", [1])]
        ],
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(ms, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    mask = np.ones((3, 5), np.int64)
    mask[1, 3:] = mask[2, 1:] = 0  # right padding, down to a single real token
    feeds = {
        "ids": rng.integers(1, vocab, (3, 5)).astype(np.int32),
        "segment_ids": np.zeros((3, 5), np.int32),
        "mask": mask,
    }
    return model, feeds


@pytest.mark.parametrize("opset, decomposed", [(17, False), (18, False), (17, True), (18, True)])
def test_row_wise_operators_run_on_the_real_tokens_only_with_the_same_outputs(
    opset: int, decomposed: bool
) -> None:
    model, feeds = encoder_layer(opset)
    before = run(model, feeds)
    if decomposed:  # the layer norm in the eleven standard operators the export writes
        assert decompose_skip_layer_norms(model) == 1

    # the projections, the layer norm and BiasGelu; not the pooling's Mul by the mask (a tensor
    # that is not rows) nor the Add of a constant per position
    assert remove_padding(model) == (14 if decomposed else 4)
    onnx.checker.check_model(model)
    real = feeds["mask"].astype(bool)
    pooled, activated, by_position = run(model, feeds)
    np.testing.assert_allclose(pooled, before[0], atol=1e-5)
    np.testing.assert_allclose(activated[real], before[1][real], atol=1e-5)
    np.testing.assert_array_equal(activated[~real], 0.0)  # the padding's rows were not computed
    np.testing.assert_allclose(by_position[real], before[2][real], atol=1e-5)

    # what the projections read: the real tokens' rows, 1 + 3 + 5 of the 3 x 5 positions
    producer = {o: n for n in model.graph.node for o in n.output}
    (matmul,) = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == "up"]
    model.graph.output.append(
        helper.make_tensor_value_info(matmul.output[0], TensorProto.FLOAT, None)
    )
    assert run(model, feeds)[-1].shape == (1, 9, 2 * HIDDEN)
    assert producer[matmul.input[0]].op_type == ("Add" if decomposed else "SkipLayerNormalization")


def test_an_attention_outside_the_embeddings_batch_is_left_padded() -> None:
    """Attention over another input (another batch and sequence): its rows are not the
    embedding's real tokens, so nothing after it is gathered by that mask."""
    model, feeds = encoder_layer(18)
    g = model.graph
    g.input.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [2, 7, HIDDEN]))
    g.node.append(
        helper.make_node(
            "Attention",
            ["other", "qkv", "qkv_bias"],
            ["other_attended"],
            domain="com.microsoft",
            num_heads=2,
        )
    )
    g.node.append(helper.make_node("MatMul", ["other_attended", "out"], ["other_projected"]))
    g.output.append(helper.make_tensor_value_info("other_projected", TensorProto.FLOAT, None))
    feeds["other"] = np.random.default_rng(5).standard_normal((2, 7, HIDDEN)).astype(np.float32)
    before = run(model, feeds)
    assert remove_padding(model) == 4  # the encoder's, as without the other attention
    after = run(model, feeds)
    np.testing.assert_allclose(after[-1], before[-1], atol=1e-5)
    np.testing.assert_allclose(after[0], before[0], atol=1e-5)


@pytest.mark.parametrize("axis, rewritten", [(-1, 5), (2, 5), (1, 4)])
def test_a_layer_norm_is_row_wise_over_the_width_only(axis: int, rewritten: int) -> None:
    model, feeds = encoder_layer(18)
    model.graph.node.append(
        helper.make_node("LayerNormalization", ["normed", "gamma", "beta"], ["renormed"], axis=axis)
    )
    model.graph.output.append(helper.make_tensor_value_info("renormed", TensorProto.FLOAT, None))
    before = run(model, feeds)
    assert remove_padding(model) == rewritten  # over the sequence (axis 1): left padded
    after = run(model, feeds)[-1]
    assert after.shape == before[-1].shape
    if axis != 1:  # (over the sequence it reads the padding, now zeros: a masked pooling doesn't)
        real = feeds["mask"].astype(bool)
        np.testing.assert_allclose(after[real], before[-1][real], atol=1e-5)


def a_second_embedding(model: object) -> None:
    """Another fused embedding, reading the same mask (whose real tokens would it gather?)."""
    (embed,) = [n for n in model.graph.node if n.op_type == "EmbedLayerNormalization"]
    second = onnx.NodeProto()
    second.CopyFrom(embed)
    second.output[:] = ["embedded_again", "mask_index_again"]
    model.graph.node.append(second)


def a_subgraph_reading_a_row_wise_output(model: object) -> None:
    """An ``If`` whose branches read ``normed`` from the outer graph: they would get its rows."""
    branch = helper.make_graph(
        [helper.make_node("Identity", ["normed"], ["picked"])],
        "branch",
        [],
        [helper.make_tensor_value_info("picked", TensorProto.FLOAT, None)],
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "always"))
    model.graph.node.append(
        helper.make_node("If", ["always"], ["chosen"], then_branch=branch, else_branch=branch)
    )


@pytest.mark.parametrize("change", [None, a_second_embedding, a_subgraph_reading_a_row_wise_output])
def test_a_graph_the_rewrite_does_not_fit_keeps_its_padding(change) -> None:
    if change is None:  # no fused embedding: no mask to read
        model = model_of([helper.make_node("Relu", ["x"], ["y"])], ["x"], ["y"], {}, 18)
    else:
        model, _ = encoder_layer(18)
        change(model)
    before = model.SerializeToString()
    assert remove_padding(model) == 0
    assert model.SerializeToString() == before


def test_the_bias_is_added_where_onnx_runtime_folds_it_into_the_quantized_matmul(
    tmp_path: Path,
) -> None:
    """A layer norm's bias is the bias of the projection before it: written as the first Add
    after the MatMul, ONNX Runtime runs them as one DynamicQuantizeMatMul in the INT8 graph
    (one pass over the activations fewer per layer norm)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(1)
    weights = {
        "w": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32),
        **{n: rng.standard_normal(HIDDEN).astype(np.float32) for n in ("gamma", "beta", "bias")},
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["projected"]),
        helper.make_node(
            "SkipLayerNormalization",
            ["projected", "skip", "gamma", "beta", "bias"],
            ["y"],
            domain="com.microsoft",
        ),
    ]
    model = model_of(nodes, ["x", "skip"], ["y"], weights, 17)
    feeds = {n: rng.standard_normal((2, 5, HIDDEN)).astype(np.float32) for n in ("x", "skip")}
    before = run(model, feeds)
    assert decompose_skip_layer_norms(model) == 1
    onnx.save(model, tmp_path / "fp32.onnx")
    quantize_dynamic(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    got = run(onnx.load(tmp_path / "int8.onnx"), feeds, tmp_path / "run.onnx")
    np.testing.assert_allclose(got[0], before[0], atol=0.1)  # INT8: close, not equal
    ran = onnx.load(str(tmp_path / "run.onnx")).graph
    folded = [n for n in ran.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(folded) == 1 and len(folded[0].input) == 5, [n.op_type for n in ran.node]
    bias = {t.name for t in ran.initializer if t.name.startswith("bias")}
    assert not [n for n in ran.node if n.op_type == "Add" and set(n.input) & bias]


@pytest.mark.parametrize("form", ["transpose", "fused_matmul"])
def test_a_tied_output_projection_is_quantized_as_a_product_by_a_constant(
    form: str, tmp_path: Path
) -> None:
    """An LLM's lm_head tied to its embedding table, as torch.onnx writes it (``MatMul(h,
    Transpose(table))``) or as the generator's fusions leave it (``FusedMatMul(h, table,
    transB=1)``): INT8 multiplies by the transposed table as an integer weight instead of
    dequantizing the whole table on every run (or leaving it fp32)."""
    from sphana.config import Quantization
    from sphana.export import quantize

    rng = np.random.default_rng(2)
    vocab = 40
    table = rng.standard_normal((vocab, HIDDEN)).astype(np.float32)
    projection = {
        "transpose": [
            helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["hidden", "table_t"], ["logits"]),
        ],
        "fused_matmul": [
            helper.make_node(
                "FusedMatMul", ["hidden", "table"], ["logits"], domain="com.microsoft", transB=1
            )
        ],
    }[form]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["hidden"]), *projection],
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        [numpy_helper.from_array(table, "table")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    onnx.save(model, tmp_path / "fp32.onnx")
    feeds = {"ids": rng.integers(0, vocab, (2, 5))}
    want = run(model, feeds)[0]

    info = quantize(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", Quantization.per_channel)
    assert info["weight_transposes_folded"] == 1
    int8 = onnx.load(str(tmp_path / "int8.onnx"))
    producer = {o: n.op_type for n in int8.graph.node for o in n.output}
    ops = Counter(n.op_type for n in int8.graph.node)
    assert ops["Transpose"] == ops["FusedMatMul"] == ops["MatMul"] == 0, ops
    assert ops["MatMulInteger"] == 1, ops
    dequantized = [n for n in int8.graph.node if producer.get(n.input[-1]) == "DequantizeLinear"]
    assert not [n.op_type for n in dequantized if n.op_type.startswith("MatMul")]
    got = run(int8, feeds)[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # INT8: close, not equal
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_int8_weights_have_7_bits_without_vnni_or_when_asked(tmp_path: Path) -> None:
    """``reduce_range``: 7-bit weights where the CPU lacks VNNI (detected) or where the caller
    asks for them; 8 bits otherwise."""
    from sphana.config import Quantization
    from sphana.export import cpu_has_vnni, quantize

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    model = model_of(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], ["x"], ["y"], {"w": weight}, 17
    )
    onnx.save(model, tmp_path / "fp32.onnx")
    for asked, reduced in [(True, True), (False, False), (None, not cpu_has_vnni())]:
        dst = tmp_path / f"{asked}.onnx"
        info = quantize(tmp_path / "fp32.onnx", dst, Quantization.per_channel, reduce_range=asked)
        assert info["reduce_range"] is reduced and info["cpu_vnni"] is cpu_has_vnni()
        int8 = onnx.load(str(dst))
        (w,) = [numpy_helper.to_array(t) for t in int8.graph.initializer if len(t.dims) == 2]
        # per channel: each column's largest weight takes the end of the range
        assert np.abs(w.astype(int)).max() == (64 if reduced else 127), w.min()
