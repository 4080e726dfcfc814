"""Text generation with ``llm_generator.onnx`` on ONNX Runtime alone (numpy, onnxruntime,
tokenizers: no torch), the way a consumer in any language decodes with it.

The decode loop (:func:`generate_ids`) is written against a *step function*
``step(input_ids, attention_mask, position_ids, past) -> (logits, present)``: :func:`ort_step`
runs the ONNX file, :func:`sphana.llm.torch_step` runs the PyTorch model, so parity checks compare
the models and nothing else. Prompts are left-padded; position ids count real tokens only.

With ``use_cache`` (the point of the export) the prefix is run once and every new token is one
step over the cached keys/values; without it every step recomputes the whole sequence (the
baseline the decode-speed benchmark compares against).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Step = Callable[
    [np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]
]
ONNX_FILE = "llm_generator.onnx"
EOS_TEXT = "<|endoftext|>"  # ends a plain text; the padding token
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # one chat turn: <|im_start|>role\n…<|im_end|>
INPUTS = ("input_ids", "attention_mask", "position_ids")  # then past_key_values.<i>.{key,value}


def chat_prompt(user: str) -> str:
    """One user turn and the assistant's opening: what ``apply_chat_template(...,
    add_generation_prompt=True)`` renders with the tokenizer's chat template."""
    return f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"


def qa_prompt(context: str, question: str) -> str:
    """The user turn of a question-answer example (the generator answers from the context)."""
    return f"Context: {context}\nQuestion: {question}"


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation and articles dropped, whitespace collapsed (SQuAD's rule)."""
    import unicodedata

    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def answer_scores(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """How well generated answers match the gold ones, averaged: ``contained`` (the normalized
    gold answer appears in the normalized prediction: an instruct model answers in sentences),
    ``exact_match`` and ``token_f1`` (SQuAD's definitions), over ``questions``."""
    from collections import Counter

    contained = exact = f1 = 0.0
    for prediction, gold in zip(predictions, golds, strict=True):
        p, g = normalize_answer(prediction), normalize_answer(gold)
        contained += f" {g} " in f" {p} " if g else p == ""
        exact += p == g
        common = sum((Counter(p.split()) & Counter(g.split())).values())
        if common:
            precision, recall = common / len(p.split()), common / len(g.split())
            f1 += 2 * precision * recall / (precision + recall)
        else:
            f1 += float(p == g)
    n = max(len(golds), 1)
    return {
        "answer_contained": round(contained / n, 4),
        "answer_exact_match": round(exact / n, 4),
        "answer_token_f1": round(f1 / n, 4),
        "questions": len(golds),
    }


def pad(
    sequences: list[list[int]], pad_id: int, side: str = "right"
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, attention_mask)`` int64 arrays, padded on ``side`` (left for generation)."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for i, s in enumerate(sequences):
        where = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, where] = s
        mask[i, where] = 1
    return ids, mask


def positions(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids counted over real tokens only (0 on left padding)."""
    return np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)


def empty_cache(batch: int, cache_shape: tuple[int, int, int]) -> list[np.ndarray]:
    """The past of a prefill: ``key, value`` per layer, each ``[batch, kv_heads, 0, head_dim]``
    (``cache_shape`` is ``(layers, kv_heads, head_dim)``)."""
    layers, kv_heads, head_dim = cache_shape
    return [np.zeros((batch, kv_heads, 0, head_dim), dtype=np.float32)] * (2 * layers)


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``top_k`` is 1 (the default); otherwise sample from the ``top_k`` most
    probable tokens within nucleus ``top_p``, at ``temperature``, from a seeded generator."""

    top_k: int = 1
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0 or self.temperature <= 0.0:
            raise ValueError("top_k must be >= 0 (0 = all), top_p in (0, 1], temperature > 0")


def _pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """One next token per row of ``logits [batch, vocab]``."""
    if sampling.top_k == 1:
        return logits.argmax(axis=-1)
    out = np.empty(len(logits), dtype=np.int64)
    for i, row in enumerate(logits.astype(np.float64) / sampling.temperature):
        order = np.argsort(-row, kind="stable")
        if sampling.top_k:
            order = order[: sampling.top_k]
        probs = np.exp(row[order] - row[order[0]])
        probs /= probs.sum()
        # the smallest nucleus holding top_p (all of it when rounding leaves the sum under 1)
        keep = min(int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1, len(order))
        probs = probs[:keep] / probs[:keep].sum()
        out[i] = order[rng.choice(keep, p=probs)]
    return out


def decode_steps(
    step: Step,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    cache_shape: tuple[int, int, int],
    eos_ids: Sequence[int],
    pad_id: int,
    sampling: Sampling = Sampling(),
    use_cache: bool = True,
) -> Iterator[np.ndarray]:
    """The decode loop: yields each step's new token per prompt (``pad_id`` for a prompt that
    has ended), until every prompt has produced an end token or ``max_new_tokens`` steps.

    ``cache_shape`` is ``(layers, kv_heads, head_dim)``.
    """
    if not prompts:
        return
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    batch = len(prompts)
    ids, mask = pad(prompts, pad_id, side="left")
    rng = np.random.default_rng(sampling.seed)
    ends = np.asarray(list(eos_ids), dtype=np.int64)
    done = np.zeros(batch, dtype=bool)
    past, step_ids, step_mask = empty_cache(batch, cache_shape), ids, mask
    for k in range(max_new_tokens):
        position = positions(step_mask)
        if use_cache and k:
            position = position[:, -1:]
        logits, present = step(step_ids, step_mask, position, past)
        token = np.where(done, pad_id, _pick(logits[:, -1], sampling, rng))
        yield token
        done |= np.isin(token, ends)
        if done.all():
            break
        step_mask = np.concatenate([step_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        if use_cache:
            past, step_ids = present, token[:, None]
        else:
            step_ids = np.concatenate([step_ids, token[:, None]], axis=1)


def generate_ids(
    step: Step,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    cache_shape: tuple[int, int, int],
    eos_ids: Sequence[int],
    pad_id: int,
    sampling: Sampling = Sampling(),
    use_cache: bool = True,
) -> list[list[int]]:
    """New token ids for each prompt (up to and without the first end token), from
    :func:`decode_steps`."""
    generated = list(
        decode_steps(
            step, prompts, max_new_tokens, cache_shape, eos_ids, pad_id, sampling, use_cache
        )
    )
    out = []
    for row in np.stack(generated, axis=1) if generated else np.zeros((len(prompts), 0), np.int64):
        tokens = row.tolist()
        end = next((k for k, t in enumerate(tokens) if t in set(eos_ids)), len(tokens))
        out.append(tokens[:end])
    return out


def ort_step(session: Any) -> Step:
    """A step function over an ONNX Runtime session of ``llm_generator.onnx``."""
    names = [i.name for i in session.get_inputs()]
    past_inputs = names[len(INPUTS) :]

    def step(
        input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = dict(zip(INPUTS, (input_ids, attention_mask, position_ids), strict=True))
        feed.update(zip(past_inputs, past, strict=True))
        logits, *present = session.run(None, feed)
        return logits, present

    return step


class OnnxGenerator:
    """``llm_generator.onnx`` (or its INT8 sibling) with its tokenizer, from an export directory
    (``target/artifacts/llm/<version>/onnx/`` or a bundle)."""

    def __init__(
        self, onnx_dir: Path, file_name: str = ONNX_FILE, threads: int = 0, session: Any = None
    ) -> None:
        """``session``: an ONNX Runtime session of the file already made (the server's, with
        its options); else one is created on the CPU with ``threads`` intra-op threads."""
        from tokenizers import Tokenizer

        self.info = json.loads((onnx_dir / "llm.json").read_text(encoding="utf-8"))
        self.tokenizer = Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))
        if session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            session = ort.InferenceSession(
                str(onnx_dir / file_name), options, providers=["CPUExecutionProvider"]
            )
        self.session = session
        self.step = ort_step(self.session)

    def steps(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling()
    ) -> Iterator[np.ndarray]:
        """:func:`decode_steps` on this model (with the KV cache)."""
        info = self.info
        return decode_steps(
            self.step,
            prompts,
            max_new_tokens,
            (info["layers"], info["kv_heads"], info["head_dim"]),
            info["eos_token_ids"],
            info["pad_token_id"],
            sampling,
        )

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        use_cache: bool = True,
    ) -> list[list[int]]:
        info = self.info
        return generate_ids(
            self.step,
            prompts,
            max_new_tokens,
            (info["layers"], info["kv_heads"], info["head_dim"]),
            info["eos_token_ids"],
            info["pad_token_id"],
            sampling,
            use_cache,
        )

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        use_cache: bool = True,
    ) -> list[str]:
        """Continuations of raw ``prompts`` (wrap a question with :func:`chat_prompt`)."""
        ids = [e.ids for e in self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)]
        out = self.generate_ids(ids, max_new_tokens, sampling, use_cache)
        return self.tokenizer.decode_batch(out, skip_special_tokens=True)
