"""`sphana convert` on small models the tests save in each layout: sentence-transformers (CLS
pooling + Normalize; mean pooling without), plain transformers, state dicts and pickles. The
weights are all-MiniLM-L6-v2's first two layers (real weights, so the gates mean something)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from conftest import minilm_cut, sentence_transformers_dir

from sphana import general_eval
from sphana.config import ExportConfig, LayerNorm, ParityConfig, Quantization
from sphana.convert import REPORT_FILE, convert, load, plan
from sphana.errors import InputError, ParityError

# A two-layer cut of MiniLM is fragile under INT8: looser INT8 gates than the pipeline's (as
# conf/export/tiny.yaml); the fp32 gate stays as strict
TINY = ExportConfig(
    parity=ParityConfig(
        int8_min_recall_retention=0.9,
        int8_min_spearman_retention=0.9,
        int8_min_mean_cosine=0.95,
        max_texts=64,
    )
)
# The relation head below is untrained on two layers: [CLS] barely varies between inputs, so
# its margins are a few INT8 rounding steps wide and INT8 flips about a fifth of its labels
# (however few nodes are quantized). A trained classifier's are wider; here the gates are wired
# as in the pipeline, set loose
RELATION = replace(
    TINY, parity=replace(TINY.parity, int8_min_argmax_agreement=0.7, int8_min_f1_retention=0.7)
)
# MiniLM was not trained to pool at [CLS]: its recall there is noise, and INT8 moves it freely
CLS = replace(TINY, parity=replace(TINY.parity, int8_min_recall_retention=0.0))


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers directory: MiniLM cut to two layers, with its tokenizer."""
    return minilm_cut(tmp_path_factory.mktemp("two_layers"))


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


@pytest.mark.parametrize(
    ("pooling", "normalize", "layer_norm"),
    [("cls", True, LayerNorm.fused), ("mean", False, LayerNorm.standard)],
)
def test_sentence_transformers_model_converts_with_its_pooling_in_the_graph(
    two_layers, eval_file, tmp_path, pooling, normalize, layer_norm
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
    cfg = replace(CLS if pooling == "cls" else TINY, layer_norm=layer_norm)
    report = convert(p, out, eval_file, seconds=0.05, cfg=cfg)
    fusion, norms = report["fusion"], 2 * p.layers  # after attention and after the FFN
    assert fusion["attention_fused"] and fusion["attention_mask_filter_value"] == -60.0
    # the layer norms as fused kernels or as standard operators: the same vectors either way
    standard = layer_norm is LayerNorm.standard
    assert fusion["fused_operators"]["SkipLayerNormalization"] == (0 if standard else norms)
    assert fusion["layer_norms_in_standard_operators"] == (norms if standard else 0)
    # on the real tokens only: per layer its three projections and GELU, and each layer norm
    # (fused, or its eleven standard operators with the projection's bias)
    assert fusion["operators_on_real_tokens"] == p.layers * 4 + norms * (11 if standard else 1)
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
    # the table times the eval set's short queries and long passages alike, not a slice of it
    shape = saved["table_inputs"]  # 80 queries, then their 80 passages: 64 of each
    assert (shape["inputs"], shape["batch"]) == (128, 32) and shape["padded_to"] > 32, shape
    assert {r["backend"] for r in saved["table"]} == {"pytorch", "onnx fp32", "onnx int8"}


def test_the_speed_table_times_the_eval_sets_lengths_sorted_into_batches() -> None:
    """What the table times: inputs at even steps from the eval set's first to its last (its
    short queries and its long passages alike), sorted by length into batches of 32; every
    fourth alone for the latency. A set of fewer inputs is timed whole."""
    from sphana.export.speed import batches_described, speed_inputs

    def feed(chunk: list[str]) -> dict[str, np.ndarray]:
        mask = np.zeros((len(chunk), max(map(len, chunk))), np.int64)
        for row, text in zip(mask, chunk, strict=True):
            row[: len(text)] = 1
        return {"input_ids": mask, "attention_mask": mask}

    def lengths(inputs: dict[str, Any]) -> list[int]:
        return [int(n) for b in inputs["batches"] for n in b["attention_mask"].sum(1)]

    # 200 queries of 2 to 4 characters, then 200 passages of 12 to 257, longest last
    queries = [f"q{i}" for i in range(200)]
    passages = sorted((f"passage {i} " + "word " * (i % 50) for i in range(200)), key=len)
    inputs = speed_inputs(queries + passages, len, feed)
    timed = lengths(inputs)
    assert len(timed) == 128 and timed == sorted(timed)
    assert sum(n <= 4 for n in timed) == 64  # the queries' half, and no more
    assert max(timed) == len(passages[-1])  # the longest passage is in
    assert [len(s["input_ids"][0]) for s in inputs["singles"]] == timed[::4]
    shape = batches_described(inputs["batches"])
    assert shape == {
        "inputs": 128,
        "batch": 32,
        "tokens_per_input": round(float(np.mean(timed)), 1),
        "padded_to": round(float(np.mean([max(timed[i : i + 32]) for i in (0, 32, 64, 96)])), 1),
    }
    for count, batches, singles in [(50, [32, 18], 13), (1, [1], 1)]:
        items = passages[:count]
        inputs = speed_inputs(items, len, feed)
        assert [len(b["input_ids"]) for b in inputs["batches"]] == batches
        assert len(inputs["singles"]) == singles
        assert sorted(lengths(inputs)) == sorted(map(len, items))


def test_export_traces_eager_attention_and_gives_the_model_back_as_it_was(two_layers, tmp_path):
    """The fusion needs eager attention while tracing; the PyTorch figures taken from the same
    module afterwards (parity references, the speed table's PyTorch row) are those of the model
    as its users run it, with its own attention implementation."""
    from sphana.export import export_text_encoder
    from sphana.export.embedding import SPEC, numpy_inputs

    p = plan(two_layers, "embedding", pooling="mean")
    encoder, tokenizer = load(p)
    own = encoder.transformer.config._attn_implementation
    assert own != "eager"  # transformers' default, sdpa
    example = {k: torch.from_numpy(v) for k, v in numpy_inputs(tokenizer, ["a", "b c"], 8).items()}
    fusion = export_text_encoder(encoder, example, SPEC, tmp_path / "e.onnx", TINY)
    assert fusion["attention_fused"]
    assert encoder.transformer.config._attn_implementation == own


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
                "--layer-norm",
                "fused",
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
    # the fixed recipes only (per_channel_sensitive can keep nearly every node fp32, and pass)
    strict = replace(
        TINY,
        quantization=[Quantization.per_channel, Quantization.per_channel_ffn_fp32],
        parity=replace(TINY.parity, int8_min_mean_cosine=0.99999),
    )
    out = tmp_path / "out"
    with pytest.raises(ParityError, match=r"int8_min_mean_cosine.*per_channel, per_channel_ffn"):
        convert(
            plan(two_layers, "embedding", pooling="mean"), out, eval_file, seconds=0.05, cfg=strict
        )
    assert not out.exists()


def test_unsupported_inputs_say_what_is_supported(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(
        InputError,
        match=r"model_type 'gpt2' is not supported for --kind embedding; supported: bert",
    ):
        plan(tmp_path, "embedding", pooling="mean")
    with pytest.raises(InputError, match="neither modules.json nor config.json"):
        plan(tmp_path / "..", "embedding")
    with pytest.raises(InputError, match="--kind vision is not supported"):
        plan(tmp_path, "vision")


def test_the_converted_bundle_verifies_and_serves(two_layers, eval_file, tmp_path) -> None:
    """``sphana verify`` accepts the output as a bundle, ``sphana serve`` (without torch) serves
    its INT8 graph, and the manifest names the source and its hash as the lineage."""
    from conftest import serving

    from sphana.cli import main
    from sphana.convert import source_lineage

    source = sentence_transformers_dir(two_layers, tmp_path / "st", "mean", True)
    p = plan(source, "embedding")
    out = tmp_path / "bundle"
    convert(p, out, eval_file, seconds=0.05, cfg=TINY, name="my-encoder", version="1.2.0")
    assert main(["verify", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["components"]["embedding"]
    assert (manifest["name"], manifest["version"], entry["version"]) == (
        "my-encoder",
        "1.2.0",
        "1.2.0",
    )
    lineage = manifest["provenance"]["converted_from"]
    assert lineage == entry["model_config"]["source"] == source_lineage(p)
    assert lineage["path"] == str(source.resolve()) and lineage["layout"] == "sentence-transformers"
    assert entry["metrics"]["val_cosine_sim"] > 0 and entry["model_config"]["quantized"]

    texts = ["A short one.", "Block until the internal flag is true, or until the timeout."]
    with serving(str(out), "--threads", "1") as url:
        info = httpx.get(f"{url}/info").json()
        assert info["version"] == "1.2.0"
        body = {"model": "embedding", "input": texts}
        got = httpx.post(f"{url}/v1/embeddings", json=body, timeout=30).json()["data"]
    served = np.array([d["embedding"] for d in got])
    from sphana.export import session
    from sphana.tokenization import encode, load

    tokenizer, pad = load(out)
    expected = session(out / entry["path"]).run(None, encode(tokenizer, texts, 64, pad))[0]
    np.testing.assert_allclose(served, expected, atol=1e-5)

    weights = next(source.rglob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert source_lineage(p)["sha256"] != lineage["sha256"], "the hash covers the weights"
    (out / "vocab.txt").write_text("tampered\n")
    assert main(["verify", str(out)]) == 1


RELATION_LABELS = ["no_relation", "founded_by", "located_in"]
RELATION_TEXT = "Ines Varga founded the Northreach Tidal Computing Lab in Halvard."


def relation_examples() -> list[dict]:
    """Candidate pairs detected in real text (the general set's passages), each read both ways."""
    from sphana.entities import detect
    from sphana.relation_inputs import pair_examples

    passages = [p.passage for p in general_eval.build(120).selection]
    pairs = [pair for text in passages for s in detect(text, 400) for pair in s["pairs"]][:150]
    return [{k: x[k] for k in ("text", "entity1", "entity2")} for x in pair_examples(pairs)]


@pytest.fixture(scope="module")
def classifier(two_layers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers relation classifier: MiniLM's two layers, Sphana's entity markers as
    special tokens, three named labels. Untrained, its head reads the three directions along
    which the pooled outputs of real candidate pairs vary most, so its labels depend on the
    input (a random head gives near ties that any rounding flips)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sphana.relation import tokenize
    from sphana.relation_inputs import MARKERS

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("classifier")
    tokenizer = AutoTokenizer.from_pretrained(two_layers, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    model = AutoModelForSequenceClassification.from_pretrained(
        two_layers,
        id2label=dict(enumerate(RELATION_LABELS)),
        label2id={label: i for i, label in enumerate(RELATION_LABELS)},
        local_files_only=True,
    ).eval()
    model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        model.bert.pooler.dense.weight.copy_(torch.eye(model.config.hidden_size))
        model.bert.pooler.dense.bias.zero_()
        pooled = model.bert(**tokenize(tokenizer, relation_examples(), 128)).pooler_output
        centred = pooled - pooled.mean(0)
        directions = torch.linalg.svd(centred, full_matrices=False).Vh[:3]
        scale = centred @ directions.T
        model.classifier.weight.copy_(directions / scale.std(0)[:, None] * 4)
        model.classifier.bias.copy_(-(pooled.mean(0) @ model.classifier.weight.T))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def relation_eval_file(classifier: Path, path: Path) -> Path:
    """:func:`relation_examples` labelled with the source model's own predictions (so
    PyTorch's macro-F1 is 1)."""
    from sphana.convert.relation import load
    from sphana.relation import predict_logits

    examples = relation_examples()
    model, tokenizer = load(plan(classifier, "relation"))
    predicted = predict_logits(model, tokenizer, examples, 64, 128).argmax(1)
    path.write_text(
        "".join(
            json.dumps({**x, "label": RELATION_LABELS[i]}) + "\n"
            for x, i in zip(examples, predicted, strict=True)
        )
    )
    return path


def test_a_relation_classifier_converts_and_serves_as_the_relation_component(
    classifier, tmp_path
) -> None:
    from conftest import serving

    from sphana.cli import main
    from sphana.export import session
    from sphana.relation_inputs import pair_examples, relation_inputs, softmax
    from sphana.tokenization import load as load_tokenizer

    p = plan(classifier, "relation", max_seq_length=128)
    assert (p.layout, p.labels, p.pooling) == ("transformers", RELATION_LABELS, "cls")
    eval_file = relation_eval_file(classifier, tmp_path / "relations.jsonl")
    out = tmp_path / "bundle"
    report = convert(p, out, eval_file, seconds=0.05, cfg=RELATION)
    assert report["fusion"]["attention_fused"]
    assert report["pytorch"]["metrics"]["macro_f1"] == 1.0
    assert report["int8"]["argmax_agreement"] >= RELATION.parity.int8_min_argmax_agreement
    assert [r["metric"] for r in report["table"]] == ["macro-F1"] * 3
    assert main(["verify", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["components"]["relation"]
    assert entry["metrics"]["val_macro_f1"] == 1.0
    assert entry["model_config"]["labels"] == RELATION_LABELS
    assert json.loads((out / "labels.json").read_text())["labels"] == RELATION_LABELS

    with serving(str(out), "--threads", "1") as url:
        served = httpx.post(f"{url}/v1/relations", json={"text": RELATION_TEXT}, timeout=30)
    assert served.status_code == 200, served.text
    pairs = served.json()["pairs"]
    assert len(pairs) == 3  # every two of the three names, each read both ways
    # the same pairs through the INT8 graph alone, tokenized torch-free as a runtime does
    tokenizer, pad = load_tokenizer(out)
    found = [
        {"sentence": {"start": 0, "end": len(RELATION_TEXT), "text": RELATION_TEXT}, **pair}
        for pair in ({"e1": x["e1"], "e2": x["e2"]} for x in pairs)
    ]
    feed = relation_inputs(tokenizer, pair_examples(found), 128, pad)
    probs = softmax(session(out / entry["path"]).run(None, feed)[0])
    for k, pair in enumerate(pairs):
        got = [pair["scores"]["e1->e2"][label] for label in RELATION_LABELS]
        np.testing.assert_allclose(got, probs[k], atol=1e-4)


def test_relation_inputs_that_cannot_be_served_are_refused_with_what_to_do(
    classifier, two_layers, tmp_path
) -> None:
    import shutil

    def variant(name: str, **config_changes) -> Path:
        path = tmp_path / name
        shutil.copytree(classifier, path)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **config_changes}))
        return path

    with pytest.raises(InputError, match=r"lack 'no_relation'"):
        plan(variant("labels", id2label={"0": "founded_by", "1": "located_in"}), "relation")
    with pytest.raises(InputError, match=r"names no labels"):
        plan(variant("default", id2label={"0": "LABEL_0", "1": "LABEL_1"}), "relation")
    with pytest.raises(InputError, match=r"needs a sequence classifier"):
        plan(variant("encoder", architectures=["BertModel"]), "relation")
    no_markers = variant("no_markers")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (two_layers / name).is_file():
            shutil.copy2(two_layers / name, no_markers / name)
    with pytest.raises(InputError, match=r"lacks the entity markers \['\[E1\]'"):
        plan(no_markers, "relation")
    with pytest.raises(InputError, match=r"sentence-transformers directory is an embedding"):
        plan(sentence_transformers_dir(two_layers, tmp_path / "st", "mean", False), "relation")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"--kind relation needs labelled examples"):
        convert(plan(classifier, "relation"), out)
    assert not out.exists()


def test_a_checkpoint_missing_weights_is_refused_not_filled_at_random(
    two_layers, classifier, chat_tokenizer, tmp_path
) -> None:
    """transformers fills weights a checkpoint lacks with random ones and only logs it; every
    gate after compares the export with that same model, so the conversion has to refuse it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sphana.base_models import load_backbone
    from sphana.config import Init

    def without(source: Path, name: str, drop: str) -> Path:
        path = tmp_path / name
        shutil.copytree(source, path)
        weights = load_file(path / "model.safetensors")
        kept = {k: v for k, v in weights.items() if drop not in k}
        assert len(kept) < len(weights)
        save_file(kept, path / "model.safetensors", metadata={"format": "pt"})
        return path

    encoder = without(two_layers, "encoder", "layer.1.")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"lacks 16 of the weights of the BertModel.*layer\.1\."):
        convert(plan(encoder, "embedding", pooling="mean"), out, seconds=0.05, cfg=TINY)
    assert not out.exists()
    # the classic: an encoder's checkpoint under a classifier's config.json (no trained head)
    headless = without(classifier, "headless", "classifier.")
    with pytest.raises(InputError, match=r"BertForSequenceClassification.*classifier\.bias"):
        load(plan(headless, "relation"))
    lm = without(causal_lm("qwen2", chat_tokenizer, tmp_path / "qwen2"), "lm", "layers.0.")
    with pytest.raises(InputError, match=r"Qwen2ForCausalLM.*layers\.0\."):
        load(plan(lm, "llm"))
    # the pipeline's base models (embedding.base_model, relation.base_model) load the same way
    with pytest.raises(InputError, match=r"lacks 16 of the weights"):
        load_backbone(str(encoder), "embedding.base_model", Init.pretrained, None)


def test_tensors_a_model_has_no_place_for_are_named_not_dropped_silently(
    two_layers, classifier, caplog
) -> None:
    """A checkpoint's tensors the chosen class has no place for (a classifier's head, read as an
    encoder) are left out as transformers does, with a warning that names them; the pooler an
    embedding leaves out by design is not warned about."""
    import logging

    from transformers import AutoModel

    from sphana.base_models import from_pretrained

    with caplog.at_level(logging.WARNING, logger="sphana"):
        load(plan(classifier, "embedding", pooling="mean"))
    [warning] = [r.getMessage() for r in caplog.records if r.name == "sphana.base_models"]
    assert str(classifier) in warning and "not part of the BertModel" in warning, warning
    assert "2 tensors" in warning and "classifier.bias, classifier.weight" in warning, warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sphana"):
        load(plan(two_layers, "embedding", pooling="mean"))  # its pooler left out by design
        from_pretrained(AutoModel, two_layers, left_out=("encoder.layer.1.",), num_hidden_layers=1)
    assert not [r for r in caplog.records if r.name == "sphana.base_models"], caplog.text
    with caplog.at_level(logging.WARNING, logger="sphana"):
        from_pretrained(AutoModel, two_layers, num_hidden_layers=1)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "sphana.base_models"]
    assert "16 tensors" in warning and "encoder.layer.1." in warning, warning


def test_tokens_added_without_resizing_the_embeddings_are_refused(classifier, tmp_path) -> None:
    import shutil

    from transformers import AutoTokenizer

    from sphana.relation_inputs import MARKERS

    source = tmp_path / "added"
    shutil.copytree(classifier, source)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [*MARKERS, "[E3]"]})
    tokenizer.save_pretrained(source)
    with pytest.raises(InputError, match=r"tokenizer has \d+ tokens but .*resize_token_emb"):
        load(plan(source, "relation"))


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A byte-level BPE with the ChatML tokens, trained on real text (the general set)."""
    from sphana.llm import train_tokenizer

    texts = [p.passage for p in general_eval.build(200).selection]
    return train_tokenizer(texts, 600, 2)


def causal_lm(kind: str, tokenizer: Any, out: Path) -> Path:
    """A tiny random causal LM of ``kind`` (llama | qwen2), saved with ``tokenizer``."""
    from conftest import tiny_causal_lm

    from sphana.llm import save_tokenizer

    tiny_causal_lm(kind, tokenizer).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


# a random-weight model has near-tied logits: INT8 may change any greedy token (as the
# pipeline's conf/export/tiny.yaml); fp32 must still decode exactly as PyTorch
LLM = replace(
    TINY,
    parity=replace(TINY.parity, llm_prompts=4, llm_new_tokens=8, int8_min_token_agreement=0.0),
)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_llama_or_qwen2_causal_lm_converts_with_its_kv_cache_and_serves(
    kind, chat_tokenizer, tmp_path
) -> None:
    from conftest import serving

    from sphana.cli import main
    from sphana.generation import OnnxGenerator, chat_prompt

    source = causal_lm(kind, chat_tokenizer, tmp_path / kind)
    p = plan(source, "llm")
    assert (p.layout, p.architecture, p.layers) == ("transformers", kind, 2)
    out = tmp_path / "bundle"
    report = convert(p, out, cfg=LLM)
    assert report["fp32"]["identical_generations"] == 1.0
    assert report["fp32"]["max_abs_diff"] <= LLM.parity.llm_max_abs_diff
    assert report["model_config"]["architecture"] == model_class_name(kind)
    int4 = ["onnx int4"] if report["int4"]["passed"] else []  # where its tokens agreed
    assert report["files"]["int4"] == ("llm_generator.int4.onnx" if int4 else None)
    assert [r["backend"] for r in report["table"]] == ["pytorch", "onnx fp32", "onnx int8", *int4]
    assert all(r["tokens_per_s"] > 0 and r["metric"] == "perplexity" for r in report["table"])
    assert report["table"][1]["of_pytorch"] == pytest.approx(1.0, abs=1e-3)
    assert main(["verify", str(out)]) == 0
    if kind == "qwen2":
        return
    entry = json.loads((out / "manifest.json").read_text())["components"]["llm"]
    expected = OnnxGenerator(out, Path(entry["path"]).name).generate(
        [chat_prompt("Which module does this describe?")], 6
    )
    body = {"prompt": "Which module does this describe?", "max_new_tokens": 6}
    with serving(str(out), "--threads", "1") as url:
        response = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["generated_text"] == expected[0]


def model_class_name(kind: str) -> str:
    return {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[kind]


def test_a_causal_lm_without_the_chat_tokens_is_refused(
    chat_tokenizer, two_layers, tmp_path
) -> None:
    source = causal_lm("llama", chat_tokenizer, tmp_path / "m")
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [
        t for t in tokenizer["added_tokens"] if t["content"] != "<|im_end|>"
    ]
    (source / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(InputError, match=r"lacks the special tokens \['<\|im_end\|>'\]"):
        plan(source, "llm")
    with pytest.raises(InputError, match=r"model_type 'bert' is not supported for --kind llm"):
        plan(two_layers, "llm")


def test_scored_sentence_pairs_gate_on_spearman(two_layers, tmp_path) -> None:
    """An --eval of STS-style pairs ({"sentence1", "sentence2", "score"}) makes Spearman's rank
    correlation the task metric (equal to scipy's) and its INT8 retention a gate."""
    from scipy.stats import spearmanr

    from sphana.convert.embedding import spearman

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(float)  # ties, as STS scores have
    noisy = scores + rng.normal(0, 1.5, 200)
    assert spearman(noisy, scores) == pytest.approx(spearmanr(noisy, scores).statistic, abs=1e-12)

    pairs = general_eval.build(160).selection
    lines = [
        {"sentence1": q.query, "sentence2": p.passage, "score": 5.0 if q is p else 1.0}
        for i, q in enumerate(pairs)
        for p in (q, pairs[(i + 7) % len(pairs)])
    ]
    eval_file = tmp_path / "sts.jsonl"
    eval_file.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    report = convert(
        plan(two_layers, "embedding", pooling="mean"), out, eval_file, seconds=0.05, cfg=TINY
    )
    assert report["eval"]["task"] == "spearman"
    assert report["pytorch"]["metrics"]["spearman"] > 0.3  # matching passages score higher
    int8 = report["int8"]
    assert int8["spearman_retention"] >= TINY.parity.int8_min_spearman_retention
    assert int8["spearman"] == int8["metrics"]["spearman"] and "recall@5" not in int8
    assert [r["metric"] for r in report["table"]] == ["spearman"] * 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["embedding"]["metrics"]["val_cosine_sim"] > 0

    eval_file.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"sentence1": "a"}) + "\n")
    with pytest.raises(InputError, match=r"sts.jsonl:2: needs sentence1, sentence2, score"):
        convert(plan(two_layers, "embedding", pooling="mean"), tmp_path / "no", eval_file)


def test_weights_past_the_external_data_threshold_are_written_beside_the_graph(
    chat_tokenizer, two_layers, eval_file, tmp_path
) -> None:
    """A model over ONNX's 2 GiB protobuf limit keeps its weights in ``<file>.data``: with the
    threshold (``export.external_data_mb``) set below these small models' size they take that
    layout, pass the same gates, verify as a bundle and serve."""
    from conftest import serving

    from sphana.cli import main
    from sphana.generation import OnnxGenerator, chat_prompt

    out = tmp_path / "encoder"
    cfg = replace(TINY, external_data_mb=1)
    report = convert(
        plan(two_layers, "embedding", pooling="mean"), out, eval_file, seconds=0.05, cfg=cfg
    )
    assert report["fusion"]["attention_fused"]
    for name in ("embedding.onnx", "embedding.int8.onnx"):
        assert (out / f"{name}.data").stat().st_size > 2**20 > (out / name).stat().st_size
    assert main(["verify", str(out)]) == 0

    out = tmp_path / "generator"
    convert(
        plan(causal_lm("llama", chat_tokenizer, tmp_path / "m"), "llm"),
        out,
        cfg=replace(LLM, external_data_mb=0.1),
    )
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["components"]["llm"]["files"]}
    assert {"llm_generator.onnx.data", "llm_generator.int8.onnx.data"} <= listed
    assert main(["verify", str(out)]) == 0
    entry = manifest["components"]["llm"]
    expected = OnnxGenerator(out, Path(entry["path"]).name).generate([chat_prompt("Why?")], 6)
    with serving(str(out), "--threads", "1") as url:
        body = {"prompt": "Why?", "max_new_tokens": 6}
        response = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
    assert response.json()["generated_text"] == expected[0]
