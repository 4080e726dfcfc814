"""``sphana convert --kind llm``: a causal language model trained elsewhere (Qwen2 or Llama).

A transformers ``*ForCausalLM`` directory (or state dict) whose ``config.json`` ``model_type`` is
one of :data:`sphana.llm.ARCHITECTURES` and whose tokenizer (``tokenizer.json``) has the ChatML
tokens the runtime's prompt format uses (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``:
Qwen2, SmolLM2 and their fine-tunes). It goes through the pipeline's generator export
(:func:`sphana.export.llm.export_generator`): the KV cache as inputs and outputs, fp32 logits
against PyTorch on a prefill and on cached steps, greedy generations identical in fp32, INT8
greedy token agreement, and perplexity on ``--eval`` texts (JSON Lines of ``{"text"}``, else the
general set's passages of real text).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sphana.convert import Plan, load_transformer, read_json
from sphana.errors import InputError

INT8_GATES = "greedy token agreement"
EXPORT_STEPS = [
    "export: the pipeline's generator export, every batch and length axis dynamic",
    "gate fp32: logits vs PyTorch on a left-padded prefill and 8 cached steps; greedy "
    "generations identical",
]
HEAD = "ForCausalLM"


def details(
    model: Path, model_dir: Path, config: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """Check the config is a causal LM and the tokenizer has the prompt format's tokens."""
    from sphana.llm import SPECIAL_TOKENS

    architectures = config.get("architectures") or []
    if not any(str(a).endswith(HEAD) for a in architectures):
        raise InputError(
            model_dir / "config.json",
            f"architectures {architectures}: --kind llm needs a causal LM (*{HEAD}, as "
            "AutoModelForCausalLM saves it)",
        )
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise InputError(
            model_dir,
            "no tokenizer.json: the runtime tokenizes with the tokenizers library; save the "
            "model's fast tokenizer beside it",
        )
    tokenizer = read_json(tokenizer_file)
    known = {t.get("content") for t in tokenizer.get("added_tokens", [])}
    missing = [t for t in SPECIAL_TOKENS if t not in known]
    if missing:
        raise InputError(
            tokenizer_file,
            f"lacks the special tokens {missing}: the runtime prompts in the ChatML format "
            "(<|im_start|>user ... <|im_end|>, <|endoftext|> to end a text) that Qwen2 and "
            "SmolLM2 models use; convert a model trained with them",
        )
    return {
        "steps": [
            "wrap: logits and the KV cache (past_key_values.<i>.key/value in, present.* out), "
            "ChatML prompts",
        ]
    }


def load(p: Plan, trust_pickle: bool = False) -> tuple[Any, Any]:
    """The causal LM (fp32, eval mode) and its tokenizer, as ``tokenizer.json`` says."""
    import torch
    from transformers import AutoModelForCausalLM

    from sphana.llm import CHAT_TEMPLATE, read_tokenizer

    tokenizer = read_tokenizer(Path(p.model_dir))
    tokenizer.chat_template = CHAT_TEMPLATE  # the runtime's prompt format (no system turn)
    model = load_transformer(p, AutoModelForCausalLM, tokenizer, trust_pickle, dtype=torch.float32)
    return model.eval(), tokenizer


def eval_records(eval_file: Path | None, passages: int = 64) -> tuple[list[dict[str, Any]], str]:
    """Texts to measure perplexity on and to take prompts from, as dataset records
    (``{"kind": "passage", "text"}``): ``eval_file``'s ``{"text"}`` lines, else the general
    set's passages; and where they came from."""
    if eval_file is None:
        from sphana import general_eval

        texts = [p.passage for p in general_eval.build(2 * passages).selection][:passages]
        source = "general set (stdlib)"
    else:
        from sphana.io import load_jsonl

        texts = []
        for line, record in enumerate(load_jsonl(eval_file), 1):
            if not isinstance(record.get("text"), str) or not record["text"].strip():
                raise InputError(eval_file, 'needs a non-empty string field "text"', line)
            texts.append(record["text"])
        if len(texts) < 2:
            raise InputError(eval_file, "needs at least 2 texts")
        source = str(eval_file)
    return [{"kind": "passage", "text": t} for t in texts], source


def export(
    p: Plan,
    model: Any,
    tokenizer: Any,
    out: Path,
    eval_file: Path | None,
    threads: int,
    cfg: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export, gate and quantize into ``out``: the report (with its ``table``: perplexity as
    % of PyTorch's, size, tokens/s) and the manifest's ``evaluation``.

    Raises:
        ParityError: naming each missed gate.
    """
    from sphana.export.llm import export_generator
    from sphana.llm import meta, sample_prompts
    from sphana.pipeline import int4_evaluation

    records, source = eval_records(eval_file)
    prompts = sample_prompts(records, cfg.parity.llm_prompts)
    info = meta(model, tokenizer, p.source, p.max_seq_length)
    report = export_generator(model, tokenizer, info, prompts, records, out, cfg, threads)
    report["eval"] = {"source": source, "texts": len(records), "prompts": len(prompts)}
    perplexity = {
        "pytorch": report["pytorch"]["metrics"]["perplexity"],
        "onnx fp32": report["fp32"]["metrics"]["perplexity"],
        "onnx int8": report["int8"]["metrics"]["perplexity"],
    }
    if report["files"]["int4"]:
        perplexity["onnx int4"] = report["int4"]["metrics"]["perplexity"]
    report["table"] = decode_table(
        model, tokenizer, info, prompts, out, report, perplexity, threads
    )
    evaluation = {
        "validation": report["pytorch"]["metrics"],
        "onnx_fp32_validation": report["fp32"]["metrics"],
        "onnx_int8_validation": report["int8"]["metrics"],
        "int8_token_agreement": report["int8"]["token_agreement"],
        **int4_evaluation(report),
    }
    return report, evaluation


def decode_table(
    model: Any,
    tokenizer: Any,
    info: dict[str, Any],
    prompt_texts: list[str],
    out: Path,
    report: dict[str, Any],
    perplexity: dict[str, float],
    threads: int,
    new_tokens: int = 16,
) -> list[dict[str, Any]]:
    """PyTorch, ONNX fp32, INT8 and (when it shipped) 4-bit decoding with the KV cache at the
    same thread count: perplexity as % of PyTorch's (its perplexity over theirs: lower is
    better), size, tokens/s for four prompts at once, and ms per token for one prompt (p50/p95
    over the prompts). Every run decodes exactly ``new_tokens`` (end tokens ignored), so each
    does the same work."""
    import numpy as np
    import torch

    from sphana.export import model_bytes, session
    from sphana.generation import generate_ids, ort_step
    from sphana.llm import cache_shape, torch_step

    if threads:
        torch.set_num_threads(threads)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts][:8]
    shape, pad_id = cache_shape(model.config), info["pad_token_id"]
    files = report["files"]
    steps = {
        "pytorch": (torch_step(model), None),
        "onnx fp32": (ort_step(session(out / files["fp32"], threads)), out / files["fp32"]),
        "onnx int8": (ort_step(session(out / files["int8"], threads)), out / files["int8"]),
    }
    if files["int4"]:
        steps["onnx int4"] = (ort_step(session(out / files["int4"], threads)), out / files["int4"])

    def decode(step: Any, batch: list[list[int]]) -> float:
        start = time.perf_counter()
        generate_ids(step, batch, new_tokens, shape, [], pad_id)
        return time.perf_counter() - start

    rows = []
    for backend, (step, path) in steps.items():
        decode(step, prompts[:1])  # warm-up
        per_token = [1000 * decode(step, [q]) / new_tokens for q in prompts]
        batch = prompts[:4]
        rows.append(
            {
                "backend": backend,
                "metric": "perplexity",
                "of_pytorch": round(perplexity["pytorch"] / perplexity[backend], 4),
                "size_mib": round(model_bytes(path) / 2**20, 1) if path else None,
                "tokens_per_s": round(len(batch) * new_tokens / decode(step, batch), 1),
                "p50_ms": round(float(np.percentile(per_token, 50)), 2),
                "p95_ms": round(float(np.percentile(per_token, 95)), 2),
            }
        )
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
    return rows
