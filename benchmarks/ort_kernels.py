"""Where the encoders' ONNX speed is capped: ONNX Runtime's CPU kernels vs PyTorch's, one building
block at a time, at the shape of a batch of 32 passages through the embedding encoder.

    python benchmarks/ort_kernels.py [--threads 2] [--seconds 2] [--batch 32] [--sequence 128]

Each block runs 8 times in a chain inside one graph (one ``run``, so feeding and fetching arrays
cost little) and in PyTorch eager, writing the FFN-wide tensors into buffers allocated once (as
ONNX Runtime's arena does: a fresh 25 MB tensor per op can cost PyTorch more in page faults than
the op itself); it prints milliseconds per block for both, side by side:

- fp32 GEMMs (an FFN's up and down projections, no activation) and the INT8 ones the exported
  INT8 graph runs (``DynamicQuantizeMatMul``: activations quantized per call, per-channel weights);
- residual add + LayerNorm (``SkipLayerNormalization``, and the same computed by the ten standard
  operators the export writes instead) and bias + GELU (``BiasGelu``);
- the attention core (softmax(QK^T)V over 12 heads) with a padding mask, as every padded batch
  needs: ONNX Runtime's default mask value (-10000: denormal probabilities after the softmax)
  and the export's (sphana.export.cpu_graph); and without one (``MultiHeadAttention``;
  PyTorch's ``scaled_dot_product_attention``).

No Sphana model is needed. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from sphana.export.cpu_graph import MASK_FILTER_VALUE, decompose_skip_layer_norms

REPEATS = 8  # blocks chained in one graph / one PyTorch call
HIDDEN, FFN, HEADS = 384, 1536, 12  # the embedding encoder's (all-MiniLM-L6-v2's) widths


def per_block_ms(run: Any, seconds: float) -> float:
    run()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        done += 1
    return (time.perf_counter() - start) / done / REPEATS * 1000


def ort_chain(
    nodes: list[Any], inputs: list[Any], inits: list[Any], threads: int, rewrite: Any = None
) -> Any:
    """An ONNX Runtime session of the graph ``nodes`` make (after ``rewrite(model)``, if given)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "chain", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    if rewrite is not None:
        rewrite(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def chain(block: Any, count: int = REPEATS) -> list[Any]:
    """``count`` blocks in a row, x -> ... -> y: ``block(src, dst, i)`` gives block ``i``'s
    nodes (names it makes inside carry ``i``)."""
    names = ["x"] + [f"t{i}" for i in range(1, count)] + ["y"]
    return [node for i in range(count) for node in block(names[i], names[i + 1], i)]


def chained(op: str, inputs: list[str], domain: str = "", **attrs: Any) -> list[Any]:
    """``REPEATS`` nodes: x -> op(x, *inputs) -> ... -> y."""
    from onnx import helper

    return chain(
        lambda src, dst, i: [helper.make_node(op, [src, *inputs], [dst], domain=domain, **attrs)]
    )


def main() -> None:
    from onnx import TensorProto, helper, numpy_helper

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="per block and backend")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sequence", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    b, s, t = args.batch, args.sequence, args.seconds
    rng = np.random.default_rng(0)

    def array(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def value(name: str, shape: list[int], dtype: int = TensorProto.FLOAT) -> Any:
        return helper.make_tensor_value_info(name, dtype, shape)

    x, residual = array(b, s, HIDDEN), array(b, s, HIDDEN)
    gamma, beta = array(HIDDEN), array(HIDDEN)
    up, down = array(HIDDEN, FFN, scale=0.05), array(FFN, HIDDEN, scale=0.05)
    lengths = rng.integers(s // 2, s + 1, size=b)
    mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int32)  # padded batch
    rows: list[tuple[str, float | None, float]] = []

    # fp32 GEMMs: x -> up -> down, REPEATS / 2 times (REPEATS GEMMs)
    ffn_nodes = chain(
        lambda src, dst, i: [
            helper.make_node("MatMul", [src, "up"], [f"u{i}"]),
            helper.make_node("MatMul", [f"u{i}", "down"], [dst]),
        ],
        REPEATS // 2,
    )
    weights = [numpy_helper.from_array(up, "up"), numpy_helper.from_array(down, "down")]
    sess = ort_chain(ffn_nodes, [value("x", [b, s, HIDDEN])], weights, args.threads)
    tx, tup, tdown = torch.from_numpy(x), torch.from_numpy(up), torch.from_numpy(down)

    hidden, wide = torch.empty(b, s, HIDDEN), torch.empty(b, s, FFN)

    def torch_ffn() -> None:
        torch.matmul(tx, tup, out=wide)
        torch.matmul(wide, tdown, out=hidden)
        for _ in range(REPEATS // 2 - 1):
            torch.matmul(hidden, tup, out=wide)
            torch.matmul(wide, tdown, out=hidden)

    rows.append(
        (
            "one FFN GEMM fp32 (384x1536 or 1536x384)",
            per_block_ms(torch_ffn, t),
            per_block_ms(lambda: sess.run(None, {"x": x}), t),
        )
    )

    # INT8 GEMMs as the INT8 graph runs them: per-channel int8 weights, activations per call
    def quantized(w: np.ndarray, name: str) -> list[Any]:
        scale = np.abs(w).max(axis=0) / 127
        q = np.round(w / scale).astype(np.int8)
        return [
            numpy_helper.from_array(q, f"{name}_q"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
        ]

    q_nodes = [
        helper.make_node(
            "DynamicQuantizeMatMul",
            [n.input[0], f"{n.input[1]}_q", f"{n.input[1]}_scale"],
            list(n.output),
            domain="com.microsoft",
        )
        for n in ffn_nodes
    ]
    q_weights = quantized(up, "up") + quantized(down, "down")
    sess = ort_chain(q_nodes, [value("x", [b, s, HIDDEN])], q_weights, args.threads)
    int8_ms = per_block_ms(lambda: sess.run(None, {"x": x}), t)
    rows.append(("the same GEMM INT8 (DynamicQuantizeMatMul)", None, int8_ms))

    # residual add + LayerNorm
    norm = [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(beta, "b")]
    nodes = chained("SkipLayerNormalization", ["r", "g", "b"], "com.microsoft", epsilon=1e-12)
    inputs = [value("x", [b, s, HIDDEN]), value("r", [b, s, HIDDEN])]
    sess = ort_chain(nodes, inputs, norm, args.threads)
    tr, tg, tb = torch.from_numpy(residual), torch.from_numpy(gamma), torch.from_numpy(beta)

    def torch_norm() -> None:
        h = tx
        for _ in range(REPEATS):
            h = torch.nn.functional.layer_norm(h + tr, (HIDDEN,), tg, tb, 1e-12)

    rows.append(
        (
            "residual add + LayerNorm",
            per_block_ms(torch_norm, t),
            per_block_ms(lambda: sess.run(None, {"x": x, "r": residual}), t),
        )
    )

    # the same in standard ONNX operators: the export's rewrite (export.layer_norm standard)
    sess = ort_chain(nodes, inputs, norm, args.threads, decompose_skip_layer_norms)
    rows.append(
        (
            "the same in standard ONNX operators",
            None,
            per_block_ms(lambda: sess.run(None, {"x": x, "r": residual}), t),
        )
    )

    # bias + GELU (erf) on the FFN's width
    # a bias near 1 keeps the chained values positive and normal: an input drifting towards 0
    # reaches denormal floats, which slow PyTorch's GELU tenfold and would measure that instead
    h, bias = array(b, s, FFN), 1 + array(FFN, scale=0.1)
    nodes = chained("BiasGelu", ["bias"], "com.microsoft")
    sess = ort_chain(
        nodes, [value("x", [b, s, FFN])], [numpy_helper.from_array(bias, "bias")], args.threads
    )
    th, tbias = torch.from_numpy(h), torch.from_numpy(bias)

    shifted, out = torch.empty(b, s, FFN), th.clone()

    def torch_gelu() -> None:
        out.copy_(th)
        for _ in range(REPEATS):
            torch.add(out, tbias, out=shifted)
            torch._C._nn.gelu(shifted, out=out)

    rows.append(
        (
            "bias + GELU",
            per_block_ms(torch_gelu, t),
            per_block_ms(lambda: sess.run(None, {"x": h}), t),
        )
    )

    # the attention core, q chained through, k and v fixed
    k, v = array(b, s, HIDDEN), array(b, s, HIDDEN)
    qkv = [value("x", [b, s, HIDDEN]), value("k", [b, s, HIDDEN]), value("v", [b, s, HIDDEN])]
    head = HIDDEN // HEADS

    def heads(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).view(b, s, HEADS, head).transpose(1, 2)

    tq, tk, tv = heads(x), heads(k), heads(v)
    tmask = torch.from_numpy(mask.astype(bool))[:, None, None, :]
    variants = (  # ONNX Runtime's default mask value, the export's, none
        ("padding mask of -10000", True, {}),
        (f"padding mask of {MASK_FILTER_VALUE:g}", True, {"mask_filter_value": MASK_FILTER_VALUE}),
        ("no mask", False, {}),
    )
    for label, use_mask, attrs in variants:
        extra = ["", "mask"] if use_mask else []
        nodes = chained(
            "MultiHeadAttention", ["k", "v", *extra], "com.microsoft", num_heads=HEADS, **attrs
        )
        inputs = qkv + ([value("mask", [b, s], TensorProto.INT32)] if use_mask else [])
        sess = ort_chain(nodes, inputs, [], args.threads)
        feed = {"x": x, "k": k, "v": v, **({"mask": mask} if use_mask else {})}

        def torch_attention(use_mask: bool = use_mask) -> None:
            out = tq
            for _ in range(REPEATS):
                out = torch.nn.functional.scaled_dot_product_attention(
                    out, tk, tv, attn_mask=tmask if use_mask else None
                )

        rows.append(
            (
                f"attention core, {label}",
                per_block_ms(torch_attention, t),
                per_block_ms(lambda feed=feed, sess=sess: sess.run(None, feed), t),
            )
        )

    print(
        f"batch {b} x {s} tokens, hidden {HIDDEN}, FFN {FFN}, {HEADS} heads, {args.threads} "
        f"threads; ms per block (mean of {REPEATS} chained)"
    )
    print(f"  {'block':44s} {'PyTorch':>8s} {'ONNX Runtime':>13s}")
    for name, torch_ms, ort_ms in rows:
        ours = f"{torch_ms:8.2f}" if torch_ms is not None else f"{'-':>8s}"
        ratio = f"  ({ort_ms / torch_ms:.2f}x PyTorch's time)" if torch_ms else ""
        print(f"  {name:44s} {ours} {ort_ms:13.2f}{ratio}")


if __name__ == "__main__":
    main()
