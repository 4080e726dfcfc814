"""The generator's fused graph (sphana.export.llm_graph): ONNX Runtime's attention, rotary and RMS
norm operators, exact against PyTorch under the export's contract (left-padded prefill, cached
steps after it, explicit position ids)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sphana.export import export_onnx, session
from sphana.export.llm import cached_parity, spec, trace_example
from sphana.export.llm_graph import fuse_generator
from sphana.generation import ort_step
from sphana.llm import CachedLM, cache_shape, torch_step

# left-padded batches of unequal prompts: every row but the longest is padded
PROMPTS = ([[5, 6, 7, 8, 9, 10], [11, 12, 13]], [[5, 6, 7, 8, 9, 10, 1, 2, 3, 4], [11, 12], [40]])


def _tiny(kind: str, kv_heads: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),  # with q/k/v biases
    }[kind]
    torch.manual_seed(0)
    config = config_class(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return model_class(config).eval()


def _export(model: torch.nn.Module, path: Path) -> dict:
    example = trace_example(model.config.vocab_size, cache_shape(model.config))
    layers = model.config.num_hidden_layers
    return export_onnx(CachedLM(model), example, spec(layers), path, 18, rewrite=fuse_generator)


@pytest.mark.parametrize(
    ("kind", "kv_heads"),
    [
        ("llama", 2),  # grouped-query attention
        ("qwen2", 2),  # with q/k/v biases
        ("llama", 4),  # as many key/value heads as query heads
    ],
)
def test_fused_generator_is_exact_on_left_padded_batches(
    kind: str, kv_heads: int, tmp_path: Path
) -> None:
    model = _tiny(kind, kv_heads)
    path = tmp_path / "llm_generator.onnx"
    fusion = _export(model, path)
    layers = model.config.num_hidden_layers
    assert fusion["attention_fused"]
    assert fusion["fused_operators"]["MultiHeadAttention"] == layers
    assert fusion["fused_operators"]["RotaryEmbedding"] == 2 * layers  # query and key
    assert fusion["fused_operators"]["SkipSimplifiedLayerNormalization"] == 2 * layers
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["MultiHeadAttention"] == layers and not ops["Softmax"] and not ops["Neg"]
    step = ort_step(session(path))
    for prompts in PROMPTS:  # the prefill and 8 cached steps, each padded row included
        checks = cached_parity(torch_step(model), step, prompts, cache_shape(model.config), 0)
        assert max(c["max_abs_diff"] for c in checks) < 1e-5, checks

    # several new tokens after a past, in a batch: what ONNX Runtime's GroupQueryAttention refuses
    generator = np.random.default_rng(0)
    layers_, kv, head_dim = cache_shape(model.config)
    past = [generator.standard_normal((2, kv, 4, head_dim)).astype(np.float32)] * (2 * layers_)
    ids = generator.integers(0, 300, (2, 3))
    mask = np.ones((2, 7), np.int64)
    mask[1, :2] = 0  # the second row's past starts with padding
    pos = np.array([[4, 5, 6], [2, 3, 4]])
    got, ref = (f(ids, mask, pos, past) for f in (step, torch_step(model)))
    assert np.abs(got[0] - ref[0]).max() < 1e-5
    assert all(np.abs(g - r).max() < 1e-5 for g, r in zip(got[1], ref[1], strict=True))


def test_fused_attention_reads_the_given_positions(tmp_path: Path) -> None:
    """Positions are the caller's, not counted from lengths: the same tokens at other relative
    positions give PyTorch's (different) logits."""
    model = _tiny("llama", 2)
    path = tmp_path / "llm_generator.onnx"
    _export(model, path)
    step, reference = ort_step(session(path)), torch_step(model)
    layers, kv_heads, head_dim = cache_shape(model.config)
    ids = np.array([[5, 6, 7, 8]], np.int64)
    mask = np.ones_like(ids)
    empty = [np.zeros((1, kv_heads, 0, head_dim), np.float32)] * (2 * layers)
    outs = []
    for stride in (1, 3):
        pos = np.arange(0, 4 * stride, stride, dtype=np.int64)[None]
        got, ref = step(ids, mask, pos, empty)[0], reference(ids, mask, pos, empty)[0]
        assert np.abs(got - ref).max() < 1e-5
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3
