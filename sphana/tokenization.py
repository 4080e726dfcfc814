"""Tokenization of the text models' inputs (embedding encoder, relation extractor), shared by the
build and a runtime: numpy and ``tokenizers`` only (no torch, no transformers).

:func:`encode` turns texts into what ``embedding.onnx`` and ``relation_extraction.onnx``
take: ``input_ids``, ``token_type_ids`` and ``attention_mask``, int64 ``[batch, sequence]``. It
does what a transformers fast tokenizer called with ``truncation=True, max_length=...,
padding=...`` does: it sets that truncation (``longest_first``, stride 0, on the right) and
padding (on the right, with the tokenizer's pad token; ``longest``: to the longest text of the
batch, ``max_length``: to ``max_length``) on the ``tokenizers.Tokenizer``, only where they differ
from its current ones, then encodes with the special tokens (``[CLS] … [SEP]``). The build calls
it on the backend of its transformers tokenizer (:func:`backend`), so the settings left on it,
which ``save_pretrained`` writes into ``tokenizer.json``, are the same as before; a runtime calls
it on the ``tokenizer.json`` shipped beside the ONNX file (:func:`load`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"  # names the pad token (pad_token, pad_token_type_id)
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")  # the order transformers returns
Padding = Literal["longest", "max_length"]


@dataclass(frozen=True)
class Pad:
    """What a sequence is padded with: the tokenizer's pad token, its id and its type id."""

    id: int
    token: str
    type_id: int = 0


def encode(
    tokenizer: Any,
    texts: list[str],
    max_length: int,
    pad: Pad,
    padding: Padding = "longest",
) -> dict[str, np.ndarray]:
    """``texts`` tokenized, truncated to ``max_length`` tokens and padded: ``input_ids``,
    ``token_type_ids``, ``attention_mask`` (int64 ``[len(texts), sequence]``).

    ``tokenizer`` is a ``tokenizers.Tokenizer``; its truncation and padding are set as described
    in the module docstring (so a tokenizer shared by threads should only ever see one setting).
    """
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', not {padding!r}")
    truncation = {
        "max_length": max_length,
        "stride": 0,
        "strategy": "longest_first",
        "direction": "right",
    }
    current = tokenizer.truncation
    if current is None or {k: current.get(k) for k in truncation} != truncation:
        tokenizer.enable_truncation(**truncation)
    target = {
        "length": max_length if padding == "max_length" else None,
        "direction": "right",
        "pad_id": pad.id,
        "pad_token": pad.token,
        "pad_type_id": pad.type_id,
        "pad_to_multiple_of": None,
    }
    if tokenizer.padding != target:
        tokenizer.enable_padding(**target)
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=True)
    if not encodings:
        return {name: np.zeros((0, 0), dtype=np.int64) for name in INPUT_NAMES}
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def load(directory: Path) -> tuple[Any, Pad]:
    """The ``tokenizers.Tokenizer`` of ``directory/tokenizer.json`` and the pad token that
    ``tokenizer_config.json`` beside it names (``[PAD]`` when it names none): what a model
    directory (``pytorch/``, ``onnx/`` or a bundle) holds."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    config_file = directory / CONFIG_FILE
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    for side in ("padding_side", "truncation_side"):
        if config.get(side, "right") != "right":
            raise ValueError(f"{config_file}: {side} {config[side]!r}; only 'right' is supported")
    token = config.get("pad_token") or "[PAD]"
    if isinstance(token, dict):  # an AddedToken written out in full
        token = token["content"]
    pad_id = tokenizer.token_to_id(token)
    if pad_id is None:
        raise ValueError(f"{directory / TOKENIZER_FILE}: no pad token {token!r} in the vocabulary")
    return tokenizer, Pad(pad_id, token, int(config.get("pad_token_type_id", 0)))


def backend(tokenizer: Any) -> tuple[Any, Pad]:
    """The ``tokenizers.Tokenizer`` inside a transformers fast tokenizer and its pad token: what
    the build passes to :func:`encode`."""
    for side in ("padding_side", "truncation_side"):
        if getattr(tokenizer, side) != "right":
            raise ValueError(f"tokenizer {side} is {getattr(tokenizer, side)!r}; need 'right'")
    pad = Pad(tokenizer.pad_token_id, tokenizer.pad_token, tokenizer.pad_token_type_id)
    return tokenizer.backend_tokenizer, pad
