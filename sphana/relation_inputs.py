"""The relation extractor's inputs and the reading of its outputs, shared by the build
(:mod:`sphana.relation`) and a runtime: numpy and ``tokenizers`` only (no torch, no transformers).

An example is a sentence with two entity spans, ``{"text", "entity1", "entity2"}`` (each entity
``{"start", "end"}`` in the sentence, optionally its ``"text"``), the subject first. A candidate
pair (a ``relations.jsonl`` row, or one of :func:`sphana.entities.detect`) becomes one with
:func:`sphana.datasets.pair_example`. :func:`mark` wraps the entities in the marker tokens,
``[E1]subject[/E1]`` and ``[E2]object[/E2]`` (special tokens of the model's tokenizer), and
:func:`relation_inputs` tokenizes the marked texts (:func:`sphana.tokenization.encode`) into what
``relation_extraction.onnx`` takes; its output is one logit per label (``labels.json``).

A candidate pair is unordered (entities in text order), so :func:`pair_examples` reads it both
ways and :func:`pair_relations` keeps the more probable predicted relation of the two
(:func:`orient`): ``(subject, object, label)`` with the pair's entity dicts, or ``None`` when both
orders predict ``no_relation``. The graph ranker's relation nodes are these
(:mod:`sphana.graph_inputs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sphana.tokenization import Pad, Padding, encode

MARKERS = ("[E1]", "[/E1]", "[E2]", "[/E2]")
NO_RELATION = "no_relation"  # the label of a pair that states no relation
Relation = tuple[dict[str, Any], dict[str, Any], str]  # (subject, object, label) entity spans


def mark(text: str, e1: dict[str, Any], e2: dict[str, Any]) -> str:
    """``text`` with ``[E1]…[/E1]`` around ``e1`` and ``[E2]…[/E2]`` around ``e2``.

    Raises:
        ValueError: a span outside ``text``, not matching its ``text`` field, or the two overlap.
    """
    spans = []
    for name, entity, (open_tag, close_tag) in (
        ("entity1", e1, MARKERS[:2]),
        ("entity2", e2, MARKERS[2:]),
    ):
        start, end = entity["start"], entity["end"]
        if not 0 <= start < end <= len(text):
            raise ValueError(f"{name} span {start}:{end} is outside the text ({len(text)} chars)")
        if "text" in entity and text[start:end] != entity["text"]:
            raise ValueError(
                f"{name} text {entity['text']!r} != {text[start:end]!r} at {start}:{end}"
            )
        spans.append((start, end, open_tag, close_tag))
    (s1, e1_, *_), (s2, e2_, *_) = spans
    if s1 < e2_ and s2 < e1_:
        raise ValueError(f"entity spans {s1}:{e1_} and {s2}:{e2_} overlap")
    out = text
    for start, end, open_tag, close_tag in sorted(spans, reverse=True):  # right to left
        out = out[:start] + open_tag + out[start:end] + close_tag + out[end:]
    return out


def relation_inputs(
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    max_length: int,
    pad: Pad,
    padding: Padding = "longest",
) -> dict[str, np.ndarray]:
    """The model inputs of ``examples``: their marked texts tokenized (``tokenizer`` a
    ``tokenizers.Tokenizer`` with the markers, ``max_length`` the model's ``max_seq_length``):
    ``input_ids``, ``token_type_ids``, ``attention_mask``, int64 ``[len(examples), sequence]``.
    """
    texts = [mark(x["text"], x["entity1"], x["entity2"]) for x in examples]
    return encode(tokenizer, texts, max_length, pad, padding)


def pair_examples(pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The examples that score candidate ``pairs`` (``{"sentence": {"start", "text"}, "e1",
    "e2"}``, offsets in the section): each pair in text order, then each pair reversed."""
    from sphana.datasets import pair_example

    examples = [pair_example(p) for p in pairs]
    return examples + [{**x, "entity1": x["entity2"], "entity2": x["entity1"]} for x in examples]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Label probabilities of ``logits [examples, labels]`` (float32)."""
    z = np.asarray(logits, dtype=np.float32)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def orient(forward: np.ndarray, backward: np.ndarray, labels: list[str]) -> tuple[bool, str] | None:
    """Given label probabilities for a pair read in text order (``forward``) and reversed:
    ``(reversed, label)`` of the more probable predicted relation (forward on a tie), or ``None``
    when both orders predict ``no_relation``."""
    options = [
        (float(probs.max()), reverse, labels[int(probs.argmax())])
        for reverse, probs in ((False, forward), (True, backward))
    ]
    options = [o for o in options if o[2] != NO_RELATION]
    if not options:
        return None
    _, reverse, label = max(options, key=lambda o: o[0])
    return reverse, label


def pair_relations(
    pairs: Sequence[dict[str, Any]], probs: np.ndarray, labels: list[str]
) -> list[Relation | None]:
    """The relation each candidate pair states: ``probs`` are the label probabilities of
    :func:`pair_examples` (``2 * len(pairs)`` rows, e.g. :func:`softmax` of the model's logits)."""
    if len(probs) != 2 * len(pairs):
        raise ValueError(f"{len(probs)} rows of probabilities for {len(pairs)} pairs (need 2x)")
    found: list[Relation | None] = []
    for p, forward, backward in zip(pairs, probs[: len(pairs)], probs[len(pairs) :], strict=True):
        choice = orient(forward, backward, labels)
        if choice is None:
            found.append(None)
        else:
            reverse, label = choice
            found.append((p["e2"], p["e1"], label) if reverse else (p["e1"], p["e2"], label))
    return found
