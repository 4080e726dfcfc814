"""Export of the generator: ``llm_generator.onnx`` with the KV cache as inputs and outputs, its
INT8 sibling, the tokenizer, and the parity gates that decide whether the export lands.

Signature: ``input_ids``, ``attention_mask`` (past + new tokens), ``position_ids`` and
``past_key_values.<layer>.{key,value}`` (``[batch, kv_heads, past_sequence, head_dim]``; length 0
on the prefill) -> ``logits`` ``[batch, sequence, vocab]`` and ``present.<layer>.{key,value}``
(past + new), every batch and length axis dynamic.

Gates (``export.parity``): fp32 logits within ``llm_max_abs_diff`` of PyTorch on a left-padded
prefill and on every cached step after it; greedy decoding of ``llm_prompts`` validation prompts x
``llm_new_tokens`` tokens identical between PyTorch and ONNX fp32 (:mod:`sphana.generation`
drives both); INT8 greedy tokens equal to PyTorch's for at least ``int8_min_token_agreement`` of
the positions. Validation perplexity is reported for PyTorch, fp32 and INT8.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sphana.config import ExportConfig, LlmConfig
from sphana.export import (
    OnnxSpec,
    check_parity,
    export_onnx,
    external_data,
    fold_weight_transposes,
    model_bytes,
    quantize_gated,
    register,
    sample_feeds,
    save_model,
    session,
    signature,
)
from sphana.export.llm_graph import fuse_generator
from sphana.generation import (
    INPUTS,
    ONNX_FILE,
    empty_cache,
    generate_ids,
    ort_step,
    pad,
    past_names,
    positions,
    present_names,
)
from sphana.io import atomic_dir, write_json_atomic
from sphana.llm import (
    META_FILE,
    cache_shape,
    collate,
    encode,
    load_split,
    load_trained,
    perplexity,
    sample_prompts,
    save_tokenizer,
    torch_step,
)

log = logging.getLogger(__name__)
CACHED_STEPS = 8  # cached decoding steps compared logit by logit after the prefill
QUANTIZED_NAMES = {"int8": "INT8", "int4": "4-bit"}  # a quantized file, as the gates name it


def spec(layers: int) -> OnnxSpec:
    past = past_names(layers)
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
        **{name: {0: "batch", 2: "past_sequence"} for name in past},
        **{name: {0: "batch", 2: "total_sequence"} for name in present_names(layers)},
    }
    return register(
        OnnxSpec("llm", ONNX_FILE, (*INPUTS, *past), ("logits", *present_names(layers)), axes)
    )


def _max_diff(got: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Max abs logit difference over the real (unpadded) positions."""
    return float(np.max(np.abs(got - ref)[mask.astype(bool)]))


def cached_parity(
    torch_fn: Any, ort_fn: Any, prompts: list[list[int]], shape: tuple[int, int, int], pad_id: int
) -> list[dict]:
    """Logit differences on a left-padded prefill (empty past) and on CACHED_STEPS steps after
    it, each backend reading its own cache; the next token is PyTorch's greedy choice."""
    ids, mask = pad(prompts, pad_id, side="left")
    empty = empty_cache(len(prompts), shape)
    pos = positions(mask)
    (ref, ref_past), (got, got_past) = (f(ids, mask, pos, empty) for f in (torch_fn, ort_fn))
    checks = [
        {
            "step": "prefill",
            "sequence": int(ids.shape[1]),
            "max_abs_diff": _max_diff(got, ref, mask),
        }
    ]
    for k in range(CACHED_STEPS):
        token = ref[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        pos = pos[:, -1:] + 1
        ref, ref_past = torch_fn(token, mask, pos, ref_past)
        got, got_past = ort_fn(token, mask, pos, got_past)
        checks.append(
            {
                "step": k + 1,
                "past": int(ref_past[0].shape[2]) - 1,
                "max_abs_diff": float(np.max(np.abs(got - ref))),
            }
        )
    return checks


def ort_perplexity(
    step: Any, examples: list[dict], shape: tuple[int, int, int], pad_id: int, batch: int = 8
) -> dict:
    """Validation loss and perplexity through an ONNX step function (full sequences, empty
    past)."""
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch):
        x = {k: v.numpy() for k, v in collate(examples[i : i + batch], pad_id).items()}
        empty = empty_cache(len(x["input_ids"]), shape)
        logits, _ = step(x["input_ids"], x["attention_mask"], x["position_ids"], empty)
        labels = x["labels"][:, 1:]
        keep = labels != -100
        rows = logits[:, :-1][keep]  # [labelled tokens, vocab]: padding and prompts dropped
        picked = rows[np.arange(len(rows)), labels[keep]].astype(np.float64)
        top = rows.max(-1, keepdims=True)
        log_z = np.log(np.exp(rows - top).sum(-1, dtype=np.float64)) + top[:, 0]
        total += float((log_z - picked).sum())
        tokens += len(rows)
    return perplexity(total, tokens)


def int4_sibling(fp32_path: Path, int4_path: Path, cfg: ExportConfig, gate: Any) -> dict[str, Any]:
    """The generator's 4-bit weight-only sibling (``export.llm_int4_block_size``): every MatMul
    with a constant weight becomes ONNX Runtime's ``MatMulNBits`` (symmetric 4-bit blocks along
    K, int8 activations: ``accuracy_level`` 4), kept only when ``gate(path) -> (result,
    failures)`` passes (the INT8 gates, with ``export.parity.int4_min_token_agreement``). Unlike
    INT8 it is optional: a miss removes the file and the report says why; the export goes on."""
    block = cfg.llm_int4_block_size
    if not block:
        return {"passed": False, "reason": "export.llm_int4_block_size is 0"}
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(fp32_path))
    folded = fold_weight_transposes(model)  # a tied lm_head: 4-bit as well
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=block, is_symmetric=True, accuracy_level=4
    )
    quantizer.process()
    graph = quantizer.model.model
    ops = [n.op_type for n in graph.graph.node]
    save_model(graph, int4_path, cfg.external_data_mb)
    result, missed = gate(int4_path)
    del result["tokens"]
    result.update(
        block_size=block,
        matmul_nbits=ops.count("MatMulNBits"),
        matmul_fp32=ops.count("MatMul"),  # MatMuls without a constant weight (attention)
        weight_transposes_folded=folded,
    )
    if missed:
        result["reason"] = "; ".join(missed) + ": not shipped"
        log.warning("llm: %s", result["reason"])
        int4_path.unlink()
        external_data(int4_path).unlink(missing_ok=True)
    return result


def token_agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Share of reference positions where ``other`` generated the same token."""
    same = sum(
        sum(a == b for a, b in zip(r, o, strict=False))
        for r, o in zip(reference, other, strict=True)
    )
    return same / max(sum(len(r) for r in reference), 1)


def run(
    llm_cfg: LlmConfig,
    cfg: ExportConfig,
    pytorch_dir: Path,
    datasets_dir: Path,
    onnx_dir: Path,
    threads: int = 0,
) -> dict[str, Any]:
    """Export, quantize and gate the trained generator. ``onnx_dir`` is written whole, and only
    if every gate passes.

    Raises:
        ParityError: naming the gate, the measured value and the threshold.
    """
    model, tokenizer, info = load_trained(pytorch_dir)
    _, validation_records = load_split(datasets_dir)
    prompts = sample_prompts(validation_records, cfg.parity.llm_prompts)
    if not prompts:
        from sphana.errors import InputError

        raise InputError(
            datasets_dir / "validation.jsonl",
            "no validation examples to decode for the generation parity gate; rerun build_datasets",
        )
    with atomic_dir(onnx_dir) as tmp:
        return export_generator(
            model, tokenizer, info, prompts, validation_records, tmp, cfg, threads
        )


def trace_example(vocab_size: int, shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """The inputs a causal LM with cache ``shape`` (:func:`cache_shape`) is traced with: a
    cached step of batch 2, 3 new tokens after 4 past ones. Every dynamic axis gets a distinct
    size of at least 2, since torch.export specializes an axis traced at 0 or 1."""
    batch, sequence, past = 2, 3, 4
    layers, kv_heads, head_dim = shape
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, vocab_size, (batch, sequence), generator=generator),
        "attention_mask": torch.ones(batch, past + sequence, dtype=torch.int64),
        "position_ids": torch.arange(past, past + sequence).expand(batch, sequence).contiguous(),
        **{
            name: torch.randn(batch, kv_heads, past, head_dim, generator=generator)
            for name in past_names(layers)
        },
    }


def export_generator(
    model: Any,
    tokenizer: Any,
    info: dict[str, Any],
    prompt_texts: list[str],
    records: list[dict[str, Any]],
    out: Path,
    cfg: ExportConfig,
    threads: int = 0,
) -> dict[str, Any]:
    """Export a causal LM (Qwen2 or Llama, :data:`sphana.llm.ARCHITECTURES`) with its KV cache
    into ``out``, quantize and gate it: what the pipeline's export and ``sphana convert --kind
    llm`` both run. ``info`` is its :func:`sphana.llm.meta`; ``prompt_texts`` are decoded
    greedily by PyTorch and ONNX; ``records`` (dataset records) give the perplexities.

    Raises:
        ParityError: naming the gate, the measured value and the threshold.
    """
    from sphana.llm import CachedLM, answer_quality, evaluate

    validation = encode(tokenizer, records, info["max_seq_length"])
    shape = cache_shape(model.config)
    onnx_spec = spec(info["layers"])
    p = cfg.parity
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]

    example = trace_example(info["vocab_size"], shape)
    torch_fn = torch_step(model)
    decode = {"eos_ids": info["eos_token_ids"], "pad_id": info["pad_token_id"]}
    fp32_path, int8_path = out / onnx_spec.file_name, out / onnx_spec.int8_file_name
    fusion = export_onnx(
        CachedLM(model),
        example,
        onnx_spec,
        fp32_path,
        cfg.opset,
        cfg.external_data_mb,
        rewrite=fuse_generator,
    )
    if not fusion["attention_fused"]:
        log.warning("llm: attention did not fuse (%s); the graph is exact, only slower", fusion)
    save_tokenizer(tokenizer, out)
    write_json_atomic(out / META_FILE, info)

    def timed(step: Any) -> tuple[list[list[int]], float]:
        """Greedy new tokens of every prompt and the tokens per second it took (KV cache)."""
        start = time.perf_counter()
        tokens = generate_ids(step, prompts, p.llm_new_tokens, shape, **decode)
        return tokens, round(sum(map(len, tokens)) / (time.perf_counter() - start), 1)

    reference, torch_speed = timed(torch_fn)
    # the quantized files' answers are gated against these (export.parity.llm_max_answer_drop)
    torch_answers = answer_quality(torch_fn, tokenizer, info, records)

    def generations(step: Any) -> dict[str, Any]:
        """A step's greedy generations against PyTorch's, and its speed: what the gates read."""
        tokens, speed = timed(step)
        return {
            "token_agreement": round(token_agreement(reference, tokens), 6),
            "identical_generations": float(
                np.mean([a == b for a, b in zip(reference, tokens, strict=True)])
            ),
            "tokens_per_second": speed,
            "tokens": tokens,
        }

    def perplexity_of(step: Any) -> dict[str, Any]:
        """Validation perplexity: measured once for a file that ships, not for every INT8
        recipe the gate tries."""
        return {"metrics": ort_perplexity(step, validation, shape, info["pad_token_id"])}

    def gate(
        path: Path, precision: str = "int8", with_perplexity: bool = False
    ) -> tuple[dict[str, Any], list[str]]:
        """A quantized file's generations and answers, and the gates it missed: greedy token
        agreement with PyTorch on the prompts (``export.parity.<precision>_min_token_agreement``)
        and its answers to the validation questions against PyTorch's (when there are any)."""
        step = ort_step(session(path, threads))
        result = {**generations(step), "answers": answer_quality(step, tokenizer, info, records)}
        if with_perplexity:
            result.update(perplexity_of(step))
        name, key = QUANTIZED_NAMES[precision], f"{precision}_min_token_agreement"
        minimum, missed = getattr(p, key), []
        if not result["token_agreement"] >= minimum:
            missed.append(
                f"{name} greedy token agreement {result['token_agreement']:.2%} < "
                f"export.parity.{key}={minimum}"
            )
        if torch_answers and result["answers"]:
            ours, theirs = (a["answer_contained"] for a in (result["answers"], torch_answers))
            if not theirs - ours <= p.llm_max_answer_drop:
                missed.append(
                    f"{name} answers contain the gold answer for {ours:.1%} of the validation "
                    f"questions, PyTorch's for {theirs:.1%}: more than "
                    f"export.parity.llm_max_answer_drop={p.llm_max_answer_drop} below"
                )
        result.update(min_token_agreement=minimum, passed=not missed)
        return result, missed

    fp32_fn = ort_step(session(fp32_path, threads))
    checks = cached_parity(torch_fn, fp32_fn, prompts[:4], shape, info["pad_token_id"])
    worst = float(np.max([c["max_abs_diff"] for c in checks]))  # NaN never passes
    fp32 = generations(fp32_fn)
    identical = fp32["identical_generations"]
    fp32 = {
        "max_abs_diff": worst,
        "threshold": p.llm_max_abs_diff,
        "checks": checks,
        "prompts": len(prompts),
        "new_tokens": p.llm_new_tokens,
        "identical_generations": identical,
        "tokens_per_second": fp32["tokens_per_second"],
        **perplexity_of(fp32_fn),
        "answers": answer_quality(fp32_fn, tokenizer, info, records),
        "passed": bool(np.isfinite(worst) and worst <= p.llm_max_abs_diff) and identical == 1,
    }

    def prefill(chunk: list[list[int]]) -> dict[str, np.ndarray]:
        ids, mask = pad(chunk, info["pad_token_id"], "left")
        arrays = (ids, mask, positions(mask), *empty_cache(len(chunk), shape))
        return dict(zip(onnx_spec.input_names, arrays, strict=True))

    # per_channel_sensitive ranks the nodes by their error on the prompts' prefill logits
    feeds = sample_feeds(prompts, prefill, batches=8, size=1)  # one prompt each: no padding
    quantization, int8, int8_failures = quantize_gated(
        fp32_path, int8_path, cfg.quantization, gate, feeds
    )
    int8_tokens = int8.pop("tokens")
    int8.update(perplexity_of(ort_step(session(int8_path, threads))))  # the recipe that ships
    int4_path = out / onnx_spec.int4_file_name
    int4 = int4_sibling(
        fp32_path,
        int4_path,
        cfg,
        partial(gate, precision="int4", with_perplexity=True),
    )
    report = {
        "fusion": {"exporter": "dynamo", **fusion},
        "fp32": fp32,
        "int8": int8,
        "int4": int4,
        "pytorch": {
            "metrics": evaluate(model, validation, info["pad_token_id"], 16),
            "answers": torch_answers,
            "tokens_per_second": torch_speed,
        },
        "samples": [
            {
                "prompt": tokenizer.decode(q),
                "pytorch": tokenizer.decode(r),
                "onnx_int8": tokenizer.decode(i),
            }
            for q, r, i in list(zip(prompts, reference, int8_tokens, strict=True))[:3]
        ],
        "quantization": quantization,
        "signature": signature(fp32_path),
        "files": {
            "fp32": onnx_spec.file_name,
            "int8": onnx_spec.int8_file_name,
            "int4": int4_path.name if int4["passed"] else None,
        },
        "sizes": {
            "fp32": model_bytes(fp32_path),
            "int8": model_bytes(int8_path),
            "int4": model_bytes(int4_path) if int4["passed"] else None,
        },
        "model_config": {
            **info,  # layers, heads, special ids, chat template, base model
            "int4_file": int4_path.name if int4["passed"] else None,
            "inputs": list(onnx_spec.input_names),
            "outputs": list(onnx_spec.output_names),
            "cache": "past_key_values.<i>.{key,value} [batch, kv_heads, past_sequence, "
            "head_dim]; length 0 on the prefill; feed present.* back as the next past",
            "tokenizer": "tokenizer.json",
            "opset": cfg.opset,
        },
    }
    failures = []
    if not worst <= p.llm_max_abs_diff:
        failures.append(
            f"fp32 max abs logit diff {worst:.3g} (prefill and {CACHED_STEPS} cached steps) > "
            f"export.parity.llm_max_abs_diff={p.llm_max_abs_diff}"
        )
    if identical < 1:
        failures.append(
            f"fp32 greedy generations identical to PyTorch for {identical:.0%} of "
            f"{len(prompts)} prompts (must be 100%)"
        )
    check_parity("llm", [*failures, *int8_failures], cfg.quantization)
    return report
