from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sphana import general_eval
from sphana.embedding import (
    OOD_METRICS,
    ValidationSet,
    anchor_embeddings,
    check_general_gate,
    contrastive_loss,
    cpu_state,
    encode,
    interpolate,
    load_encoder,
    pair_loss,
    paired_difference,
    retrieval_metrics,
    select_mix,
)
from sphana.errors import GateError


def test_retrieval_metrics_by_hand() -> None:
    corpus = np.eye(4, dtype=np.float32)  # passages a, b, c, d
    ids = ["a", "b", "c", "d"]
    queries = np.array([[1, 0, 0, 0], [0.9, 0.5, 0, 0], [0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    relevant = [["a"], ["b"], ["a", "zzz"]]  # ranks: 1, 2, 4 (zzz is not in the pool)
    m = retrieval_metrics(queries, corpus, ids, relevant, positive_emb=corpus[[0, 1, 0]])
    assert m["recall@1"] == pytest.approx(1 / 3, abs=1e-6)
    assert m["recall@5"] == 1.0 and m["recall@10"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3, abs=1e-6)
    # cosine, not the dot product: these queries are not unit vectors
    cosines = [1, 0.5 / math.hypot(0.9, 0.5), 0.1 / math.sqrt(0.01 + 0.04 + 0.09 + 0.16)]
    assert m["mean_cosine"] == pytest.approx(sum(cosines) / 3, abs=1e-6)


def test_paired_difference_by_hand() -> None:
    base = np.array([1.0, 2.0, 11.0, 4.0] * 25)
    same = paired_difference(base, base)
    assert same["mrr"] == {"difference": 0.0, "ci95": [0.0, 0.0], "better": 0, "worse": 0}
    # one query in four moves from rank 11 to rank 1: +0.25 recall@10, +(1 - 1/11)/4 MRR
    other = np.array([1.0, 2.0, 1.0, 4.0] * 25)
    d = paired_difference(base, other)
    assert d["recall@10"]["difference"] == pytest.approx(0.25)
    assert d["mrr"]["difference"] == pytest.approx((1 - 1 / 11) / 4, abs=1e-6)
    assert d["recall@10"]["better"] == 25 and d["recall@10"]["worse"] == 0
    assert 0 < d["recall@10"]["ci95"][0] < 0.25 < d["recall@10"]["ci95"][1] < 0.5


def test_unretrieved_query_counts_as_a_miss() -> None:
    m = retrieval_metrics(
        np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), ["a", "b"], [["a"], ["nope"]]
    )
    assert m["recall@10"] == 0.5 and m["mrr"] == 0.5


def test_contrastive_loss_is_cross_entropy_over_in_batch_negatives() -> None:
    q = torch.nn.functional.normalize(
        torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=1
    )
    p = torch.nn.functional.normalize(
        torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=1
    )
    logits = q @ p.T / 0.1
    expected = -torch.log_softmax(logits, dim=1).diag().mean()
    assert contrastive_loss(q, p, ["x", "y", "z"], 0.1).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_duplicate_positive_is_not_a_negative() -> None:
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # the same passage twice
    # without masking, each row would be a 50/50 split: loss log(2)
    assert contrastive_loss(q, p, ["same", "same"], 0.05).item() == pytest.approx(0.0, abs=1e-6)
    assert contrastive_loss(q, p, ["a", "b"], 0.05).item() == pytest.approx(math.log(2), rel=1e-6)


def test_distillation_keeps_the_fine_tune_near_the_base_embeddings() -> None:
    """The same steps with and without the distillation term: with it, the training texts'
    embeddings stay closer to the base model's, and the term is 0 before the first step."""
    from conftest import REPO

    from sphana.config import compose, validate

    cfg = validate(compose(REPO / "conf", ["embedding=tiny"])).embedding
    pairs = [
        {
            "query": f"Who designed array {i}?",
            "positive": f"Person {i} designed array {i} in {1980 + i}.",
            "positive_id": f"doc#{i}",
        }
        for i in range(8)
    ]
    texts = [r["query"] for r in pairs] + [r["positive"] for r in pairs]

    def drift(distill: float) -> float:
        torch.manual_seed(0)
        encoder, tokenizer = load_encoder(cfg)
        anchors = anchor_embeddings(encoder, tokenizer, pairs, cfg, "cpu")
        loss = pair_loss(tokenizer, replace(cfg, distill=distill), anchors)
        contrastive = pair_loss(tokenizer, replace(cfg, distill=0.0), anchors)
        with torch.no_grad():  # eval mode: no dropout
            assert loss(encoder.eval(), pairs, "cpu").item() == pytest.approx(
                contrastive(encoder, pairs, "cpu").item(), abs=1e-5
            ), "at the base weights the embeddings are their anchors"
        encoder.train()
        optimizer = torch.optim.SGD(encoder.parameters(), lr=0.5)
        for _ in range(5):
            optimizer.zero_grad()
            loss(encoder, pairs, "cpu").backward()
            optimizer.step()
        after = encode(encoder, tokenizer, texts, 16, cfg.max_seq_length)
        rows = [anchors.rows[t] for t in texts]
        return float(np.mean(1.0 - np.sum(after * anchors.embeddings.numpy()[rows], axis=1)))

    plain, distilled = drift(0.0), drift(10.0)
    assert 0.0 < distilled < plain / 2, (plain, distilled)


def test_training_and_export_are_deterministic(built_tiny, tmp_path) -> None:
    """Same data, params and seed: the same weights and ONNX bytes, the same metrics."""
    import copy
    from pathlib import Path

    from sphana import pipeline

    cfg, results = built_tiny
    again = copy.deepcopy(cfg)
    again.paths.artifacts = str(tmp_path / "artifacts")
    again.paths.metrics = str(tmp_path / "metrics")
    again.paths.live = str(tmp_path / "live")
    again.paths.checkpoints = str(tmp_path / "checkpoints")
    metrics = pipeline.train(again, "embedding")
    pipeline.export(again, "embedding")
    assert metrics["fine_tuned"] == results["train_embedding"]["fine_tuned"]
    assert metrics["base"] == results["train_embedding"]["base"]
    for kind, name in [
        ("pytorch", "model.safetensors"),
        ("onnx", "embedding.onnx"),
        ("onnx", "embedding.int8.onnx"),
        ("onnx", "vocab.txt"),
    ]:
        first = pipeline.component_dir(cfg, "embedding", kind) / name
        second = pipeline.component_dir(again, "embedding", kind) / name
        assert Path(first).read_bytes() == Path(second).read_bytes(), name


def test_export_fuses_attention_and_names_the_int8_recipe(built_tiny) -> None:
    """The shipped graph holds ONNX Runtime's fused operators (one Attention per layer), and the
    report names the INT8 recipe chosen and every recipe tried."""
    import onnx

    cfg, results = built_tiny
    report = results["export_embedding"]
    onnx_dir = Path(cfg.paths.artifacts) / "embedding" / cfg.embedding.version / "onnx"
    ops = Counter(n.op_type for n in onnx.load(str(onnx_dir / "embedding.onnx")).graph.node)
    layers = cfg.embedding.random_arch.num_hidden_layers
    assert ops["Attention"] == layers and ops["EmbedLayerNormalization"] == 1, ops
    # residual add + layer norm after attention and after the FFN, in standard operators (fast
    # on CPU); attention masks padding with the value that keeps it fast
    assert ops["SkipLayerNormalization"] == 0 and ops["ReduceMean"] == 2 * 2 * layers, ops
    assert report["fusion"]["layer_norms_in_standard_operators"] == 2 * layers
    assert report["fusion"]["fused_operators"]["Attention"] == layers
    assert report["fusion"]["attention_fused"] and report["fp32"]["passed"]
    for model in ("embedding.onnx", "embedding.int8.onnx"):
        attention = [
            n for n in onnx.load(str(onnx_dir / model)).graph.node if "Attention" in n.op_type
        ]
        values = [
            [
                onnx.helper.get_attribute_value(a)
                for a in n.attribute
                if a.name == "mask_filter_value"
            ]
            for n in attention
        ]
        assert values == [[-60.0]] * layers, (model, values)
    quantization = report["quantization"]
    tried = [t["preset"] for t in quantization["tried"]]
    assert tried == [r.value for r in cfg.export.quantization][: len(tried)]
    assert quantization["preset"] == tried[-1] and quantization["tried"][-1]["failures"] == []


def test_operator_shares_split_the_graphs_kernel_time_by_operator(built_tiny) -> None:
    """The profiler's breakdown of the shipped graphs: shares of their own operators, largest
    first, summing to one (what ``benchmarks/export_speed.py --profile`` prints)."""
    from transformers import AutoTokenizer

    from sphana.export.embedding import numpy_inputs
    from sphana.export.speed import operator_shares

    cfg, _ = built_tiny
    onnx_dir = Path(cfg.paths.artifacts) / "embedding" / cfg.embedding.version / "onnx"
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    batches = [numpy_inputs(tokenizer, ["a short one", "and a much longer sentence here"], 32)]
    fp32 = operator_shares(onnx_dir / "embedding.onnx", 1, batches)
    int8 = operator_shares(onnx_dir / "embedding.int8.onnx", 1, batches)
    for shares in (fp32, int8):
        assert abs(sum(shares.values()) - 1) < 0.01, shares
        assert list(shares.values()) == sorted(shares.values(), reverse=True)
    assert {"Attention", "ReduceMean"} <= set(fp32), fp32
    assert "Attention" not in int8 and "DynamicQuantizeMatMul" in int8, int8  # quantized kernels


def test_speed_figures_come_from_backends_taking_turns(built_tiny) -> None:
    """The speed table's and the benchmark's throughput: the backends alternate pass by pass, so
    a machine that slows down during the measurement slows every backend, not the last; each
    batch counts at its median run, so one run slowed by another process does not count, and
    neither does one lucky run of a backend whose runs are otherwise slow."""
    import itertools
    import time

    from transformers import AutoTokenizer

    from sphana.export import session
    from sphana.export.embedding import numpy_inputs
    from sphana.export.speed import onnx_runner, side_by_side

    cfg, _ = built_tiny
    onnx_dir = Path(cfg.paths.artifacts) / "embedding" / cfg.embedding.version / "onnx"
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    batches = [
        numpy_inputs(tokenizer, texts, 32)
        for texts in (["a short one", "and a much longer sentence here"], ["one more", "two"])
    ]
    calls: list[str] = []

    slow = 0.3  # seconds another process takes the CPU for

    def recorded(name: str, file: str, slow_calls: tuple[int, ...] = ()) -> Callable:
        run = onnx_runner(session(onnx_dir / file, 1))

        def timed(feed: dict) -> np.ndarray:
            calls.append(name)
            if len(calls) in slow_calls:
                time.sleep(slow)
            return run(feed)

        return timed

    # the 5th call is int8's first timed run: after a warm-up each and fp32's first pass
    runs = {
        "fp32": recorded("fp32", "embedding.onnx"),
        "int8": recorded("int8", "embedding.int8.onnx", slow_calls=(5,)),
    }
    rates = side_by_side(runs, batches, seconds=1e-6, passes=3)
    warm_up, one_pass = [("fp32", 1), ("int8", 1)], [("fp32", 2), ("int8", 2)]
    assert [(n, len(list(g))) for n, g in itertools.groupby(calls)] == warm_up + one_pass * 3
    assert set(rates) == {"fp32", "int8"} and all(rate > 0 for rate in rates.values()), rates
    # the slowed run did not count: all three passes' 12 inputs in `slow` s would be slower
    assert rates["int8"] > 3 * 4 / slow, rates
    # now every int8 run is slowed but batch 0's first (call 5): the median counts 2 * slow a
    # pass, where the fastest runs would count about slow and the mean 5 / 3 * slow
    calls.clear()
    runs["int8"] = recorded("int8", "embedding.int8.onnx", slow_calls=(6, 9, 10, 13, 14))
    rates = side_by_side(runs, batches, seconds=1e-6, passes=3)
    assert rates["int8"] < 4 / (1.8 * slow), rates
    runs["int8"] = recorded("int8", "embedding.int8.onnx")
    before = len(calls)
    side_by_side(runs, batches, seconds=0.3, passes=1)  # more passes until 0.3 s are spent
    assert len(calls) - before > 2 + 4, len(calls) - before


def test_int8_recipes_are_tried_until_the_gate_passes(built_tiny, tmp_path) -> None:
    """A gate the fastest recipe misses (it wants fp32 MatMuls left) gets the next recipe; a gate
    no recipe meets returns the misses of the last one."""
    import onnx

    from sphana.config import Quantization
    from sphana.export import quantize_gated

    cfg, _ = built_tiny
    src = Path(cfg.paths.artifacts) / "embedding" / cfg.embedding.version / "onnx/embedding.onnx"
    recipes = [Quantization.per_channel, Quantization.per_channel_ffn_fp32]

    def keeps_fp32_matmul(path: Path) -> tuple[dict, list[str]]:
        ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        return dict(ops), [] if ops["MatMul"] else ["no fp32 MatMul left"]

    info, ops, failures = quantize_gated(src, tmp_path / "a.onnx", recipes, keeps_fp32_matmul)
    assert [t["preset"] for t in info["tried"]] == ["per_channel", "per_channel_ffn_fp32"]
    assert info["tried"][0]["failures"] == ["no fp32 MatMul left"] and failures == []
    assert info["preset"] == "per_channel_ffn_fp32" and info["fp32_nodes"] == ops["MatMul"] > 0
    assert info["reduce_range"] is not info["cpu_vnni"]  # 7-bit weights only without VNNI

    def never(path: Path) -> tuple[dict, list[str]]:
        return {}, [f"missed by {path.name}"]

    info, _, failures = quantize_gated(src, tmp_path / "b.onnx", recipes, never)
    assert failures == ["missed by b.onnx"] and len(info["tried"]) == 2


def test_general_set_is_real_stdlib_text_built_deterministically() -> None:
    first = general_eval.build(600)
    assert len(first.selection) == len(first.report) == 300
    pairs = [*first.selection, *first.report]
    assert len({p.id for p in pairs}) == len(pairs)
    files = {h: {p.id.split(":")[0] for p in getattr(first, h)} for h in ("selection", "report")}
    assert not files["selection"] & files["report"], "the report half is other modules"
    assert min(len(f) for f in files.values()) >= 30, "spread over the library"
    assert len({p.query for p in pairs}) == len({p.passage for p in pairs}) == len(pairs)
    for p in pairs:
        assert p.query.strip() and p.passage.strip() and p.query not in p.passage
        assert 5 <= len(p.query.split()) <= 40 and 40 <= len(p.passage.split()) <= 100, p.id
    assert first.describe()["pairs"] == {"selection": 300, "report": 300}
    # built again, a smaller set is the start of the larger one: deterministic, and the tiny
    # and default configs measure alike
    small = general_eval.build(64)
    assert small.selection == first.selection[:32] and small.report == first.report[:32]
    assert small.python == first.python and small.digest != first.digest
    with pytest.raises(ValueError, match="ood_pairs = 100000"):
        general_eval.build(100_000)
    assert ValidationSet.from_pairs(small.report).evaluate(_bag_of_words)["recall@10"] > 0.5


def _bag_of_words(texts: list[str]) -> np.ndarray:
    """A torch-free lexical embedding: hashed word counts, L2-normalized."""
    out = np.zeros((len(texts), 512), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().split():
            out[i, sum(word.encode()) % 512] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_docstring_pair_keeps_prose_and_trims_at_a_sentence_end() -> None:
    prose = " ".join(f"Sentence number {i} says something." for i in range(30))  # 120 words
    doc = f"Return the frobnicated widget of a gadget.\n\n{prose}\n\n>>> frob(1)\n2"
    query, passage = general_eval._pair(doc, 40, 100)
    assert query == "Return the frobnicated widget of a gadget."
    assert len(passage.split()) == 100 and passage.endswith("something.")
    assert general_eval._pair("Too short.\n\n" + prose, 40, 100) is None
    assert general_eval._pair("Return the frobnicated widget please.\n\nOne line.", 40, 100) is None
    code = "Return the frobnicated widget please.\n\nExample:\n\n    " + prose
    assert general_eval._pair(code, 40, 100) is None, "an indented block is code"
    inline = f"Return the frobnicated widget please.\n\n{prose[:300]}\n>>> frob(2)\n3"
    assert general_eval._pair(inline, 40, 100)[1] == prose[:300], "a doctest line ends it"


def test_interpolation_ends_are_exactly_base_and_tuned() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model.register_buffer("position_ids", torch.arange(5))
    base = cpu_state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    tuned = cpu_state(model)
    for a, expected in [(0.0, base), (1.0, tuned)]:
        mixed = interpolate(base, tuned, a)
        assert all(torch.equal(mixed[k], expected[k]) for k in base), a
    half = interpolate(base, tuned, 0.5)
    assert torch.allclose(half["0.weight"], (base["0.weight"] + tuned["0.weight"]) / 2)
    assert torch.equal(half["position_ids"], base["position_ids"])
    model.load_state_dict(half)  # a mix loads into the same architecture
    assert base["0.weight"].data_ptr() != model[0].weight.data_ptr(), "copies, not views"
    with pytest.raises(ValueError, match="outside"):
        interpolate(base, tuned, 1.5)


def _row(a: float, in_domain: float, mrr: float, recall10: float) -> dict:
    return {
        "a": a,
        "in_domain": {"recall@5": in_domain, "mrr": in_domain - 0.1},
        "out_of_domain": {"mrr": mrr, "recall@10": recall10},
    }


BASE_OOD = {"mrr": 0.70, "recall@10": 0.95}


def test_selection_picks_the_best_in_domain_mix_that_keeps_out_of_domain() -> None:
    grid = [
        _row(0.0, 0.90, 0.70, 0.95),  # the base
        _row(0.5, 0.93, 0.71, 0.95),  # better in domain, no worse out of domain
        _row(0.75, 0.95, 0.70, 0.94),  # recall@10 dropped
        _row(1.0, 0.96, 0.67, 0.96),  # the raw fine-tune forgot: MRR dropped
    ]
    assert select_mix(grid, BASE_OOD, "recall@5")["a"] == 0.5
    # a tolerance lets a small loss through
    assert select_mix(grid, BASE_OOD, "recall@5", tolerance=0.011)["a"] == 0.75
    # a tie in domain goes to the mix closest to the base
    tie = [_row(0.0, 0.9, 0.7, 0.95), _row(0.25, 0.93, 0.7, 0.95), _row(0.5, 0.93, 0.72, 0.96)]
    assert select_mix(tie, BASE_OOD, "recall@5")["a"] == 0.25


def test_selection_falls_back_to_the_base_and_gate_names_the_metric() -> None:
    grid = [_row(0.0, 0.90, 0.70, 0.95), _row(0.5, 0.99, 0.69, 0.99), _row(1.0, 0.99, 0.6, 0.9)]
    assert select_mix(grid, BASE_OOD, "recall@5")["a"] == 0.0
    assert select_mix(grid[1:], BASE_OOD, "recall@5") is None, "no a = 0, nothing qualifies"
    check_general_gate({"mrr": 0.70, "recall@10": 0.95}, BASE_OOD, 0.0, 0.5)
    message = r"recall@10 = 0\.9400 of the mix a = 1\.0 < base model's 0\.9500 - embedding\.ood_t"
    with pytest.raises(GateError, match=message):
        check_general_gate({"mrr": 0.71, "recall@10": 0.94}, BASE_OOD, 0.0, 1.0)
    check_general_gate({"mrr": 0.71, "recall@10": 0.94}, BASE_OOD, 0.02, 1.0)


@pytest.mark.parametrize("value", ["[]", "[0.5,1.5]"])
def test_interpolation_grid_is_checked(value: str) -> None:
    from conftest import REPO

    from sphana.config import compose, validate
    from sphana.errors import ConfigError

    with pytest.raises(ConfigError, match=r"embedding\.interpolation"):
        validate(compose(REPO / "conf", [f"embedding.interpolation={value}"]))


def test_train_metrics_report_out_of_domain_and_the_chosen_mix(built_tiny) -> None:
    cfg, results = built_tiny
    metrics = results["train_embedding"]
    ood, mix = metrics["out_of_domain"], metrics["interpolation"]
    assert ood["set"]["pairs"] == {"selection": 32, "report": 32}
    assert ood["set"]["mean_passage_tokens"] > ood["set"]["mean_query_tokens"] > 5
    grid = {row["a"]: row for row in mix["grid"]}
    assert sorted(grid) == sorted(cfg.embedding.interpolation)
    chosen = grid[mix["chosen"]]
    # `fine_tuned` is the shipped model; the raw fine-tune and the base are the grid's ends
    assert metrics["fine_tuned"] == chosen["in_domain"]
    assert grid[0.0]["in_domain"] == metrics["base"]
    assert grid[1.0]["in_domain"] == metrics["before_interpolation"]
    assert grid[1.0]["out_of_domain"] == ood["fine_tuned"]["selection"]
    assert ood["shipped"]["selection"] == chosen["out_of_domain"]
    # the selection half chose (and gates): the shipped mix keeps the base's figures there;
    # the held-out report half is only measured
    base = ood["base"]["selection"]
    assert all(ood["shipped"]["selection"][m] >= base[m] for m in OOD_METRICS)
    assert set(ood["shipped"]["report"]) == set(base)
    assert select_mix(mix["grid"], ood["base"]["selection"], cfg.embedding.gate_metric) == chosen
    # the held-out difference comes with its interval, and agrees with the two report figures
    held_out = ood["shipped_minus_base_report"]
    for m in ("mrr", "recall@10"):
        d = held_out[m]
        shipped_minus_base = ood["shipped"]["report"][m] - ood["base"]["report"][m]
        assert d["difference"] == pytest.approx(shipped_minus_base, abs=2e-6)
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]


def test_the_sensitive_recipe_keeps_the_nodes_measured_worst_in_fp32(built_tiny, tmp_path) -> None:
    """Each weighted node is quantized alone and ranked by the error it causes on real inputs;
    the 1, 2, 4, ... worst stay fp32 until the gate passes, and the report names them."""
    import numpy as np
    import onnx

    from sphana.config import Quantization
    from sphana.export import quantize, quantize_gated, sample_feeds, session, weighted_nodes
    from sphana.tokenization import encode, load

    cfg, _ = built_tiny
    onnx_dir = Path(cfg.paths.artifacts) / "embedding" / cfg.embedding.version / "onnx"
    src = onnx_dir / "embedding.onnx"
    tokenizer, pad = load(onnx_dir)
    texts = [p.passage for p in general_eval.build(64).selection]
    feeds = sample_feeds(texts, lambda chunk: encode(tokenizer, chunk, 64, pad), 2, 8)
    expected = [session(src).run(None, feed)[0] for feed in feeds]

    def error(path: Path) -> float:
        sess = session(path)
        return float(
            np.mean(
                [
                    np.linalg.norm(sess.run(None, f)[0] - e) / np.linalg.norm(e)
                    for f, e in zip(feeds, expected, strict=True)
                ]
            )
        )

    quantize(src, tmp_path / "plain.onnx", Quantization.per_channel)
    bound = error(tmp_path / "plain.onnx") / 4  # plain per-channel INT8 misses it

    def gate(path: Path) -> tuple[dict, list[str]]:
        e = error(path)
        return {"error": e}, [] if e <= bound else [f"relative error {e:.2e} > {bound:.2e}"]

    recipes = [Quantization.per_channel, Quantization.per_channel_sensitive]
    dst = tmp_path / "int8.onnx"
    info, result, failures = quantize_gated(src, dst, recipes, gate, feeds)
    assert failures == [] and result["error"] <= bound
    tried = info["tried"]
    assert tried[0]["preset"] == "per_channel" and tried[0]["failures"]
    ranking = info["sensitivity"]
    kept = [t["fp32_nodes"] for t in tried[1:]]
    assert kept == [min(2**i, len(ranking) - 1) for i in range(len(kept))]
    assert sorted(r["node"] for r in ranking) == sorted(weighted_nodes(onnx.load(str(src))))
    errors = [r["relative_error"] for r in ranking]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0
    assert info["preset"] == "per_channel_sensitive"
    assert info["fp32_node_names"] == [r["node"] for r in ranking[: kept[-1]]]
    graph = onnx.load(str(dst)).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    by_name = {n.name: n for n in graph.node}
    for name in info["fp32_node_names"]:  # still the original operator, on fp32 weights
        assert any(i in floats for i in by_name[name].input), name

    info, _, failures = quantize_gated(src, tmp_path / "none.onnx", recipes[1:], gate)
    assert info["tried"] == [
        {"preset": "per_channel_sensitive", "skipped": "no inputs to measure it on"}
    ]
    assert failures and info["preset"] is None


@pytest.mark.parametrize("component", ["gnn", "llm"])
def test_the_ranker_and_the_generator_rank_their_int8_sensitivity_on_real_inputs(
    built_tiny, tmp_path, component: str
) -> None:
    """``per_channel_sensitive`` for the other components: their exports measure each weighted
    node on real inputs (validation queries' graphs; the prompts' prefill) and keep the most
    sensitive in fp32."""
    import importlib

    import onnx

    from sphana.config import Quantization
    from sphana.export import weighted_nodes

    cfg, _ = built_tiny
    export_cfg = replace(cfg.export, quantization=[Quantization.per_channel_sensitive])
    trained = Path(cfg.paths.artifacts) / component / getattr(cfg, component).version / "pytorch"
    out = tmp_path / "onnx"
    report = importlib.import_module(f"sphana.export.{component}").run(
        getattr(cfg, component), export_cfg, trained, Path(cfg.paths.datasets) / component, out
    )
    info = report["quantization"]
    assert info["preset"] == "per_channel_sensitive"
    graph = onnx.load(str(out / report["files"]["fp32"]))
    ranking = info["sensitivity"]
    assert sorted(r["node"] for r in ranking) == sorted(weighted_nodes(graph))
    errors = [r["relative_error"] for r in ranking]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0
    kept = info["tried"][-1]["fp32_nodes"]
    assert info["fp32_node_names"] == [r["node"] for r in ranking[:kept]]


def test_an_imported_model_ships_with_its_own_pooling_and_its_lineage(built_tiny, tmp_path) -> None:
    """``embedding.import_from``: a sentence-transformers model (CLS pooling, no Normalize)
    is measured, saved in the trained layout with its pooling and lineage, normalized, and
    exported with both in the report; a path outside ``paths.imports/embedding`` is refused."""
    from conftest import minilm_cut, sentence_transformers_dir
    from sentence_transformers import SentenceTransformer

    from sphana import embedding
    from sphana.errors import ConfigError
    from sphana.export.embedding import run as export

    cfg, _ = built_tiny
    layers = minilm_cut(tmp_path / "two_layers")
    st_dir = sentence_transformers_dir(layers, tmp_path / "models/embedding/cls", "cls", False)

    paths = replace(cfg.paths, imports=str(tmp_path / "models"), live=str(tmp_path / "live"))
    emb = replace(cfg.embedding, import_from=str(st_dir))
    datasets = Path(cfg.paths.datasets) / "embedding"
    out = tmp_path / "pytorch"
    metrics = embedding.train(emb, cfg.runtime, paths, datasets, out)
    assert metrics["imported"]["pooling"] == "cls"
    assert metrics["imported"]["source"]["path"] == str(st_dir)
    assert metrics["base"] == metrics["fine_tuned"] and 0 <= metrics["fine_tuned"]["recall@5"] <= 1
    assert (tmp_path / "live/train_embedding/metrics.json").is_file()

    encoder, tokenizer = embedding.load_trained(out)
    assert (encoder.pooling, encoder.normalize) == ("cls", True)
    texts = ["A short one.", "Block until the internal flag is true, or until the timeout."]
    theirs = SentenceTransformer(str(st_dir), device="cpu").encode(texts)
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    ours = embedding.encode(encoder, tokenizer, texts, 8, 64)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)

    relaxed = replace(
        cfg.export, parity=replace(cfg.export.parity, int8_min_mean_cosine=0.9, max_texts=64)
    )
    report = export(emb, relaxed, out, datasets, tmp_path / "onnx")
    assert report["model_config"]["pooling"] == "cls"
    assert report["model_config"]["source"] == metrics["imported"]["source"]
    assert report["model_config"]["base_model"] == str(st_dir)

    outside = replace(emb, import_from=str(layers))
    with pytest.raises(ConfigError, match=r"lies outside .*models/embedding/"):
        embedding.train(outside, cfg.runtime, paths, datasets, tmp_path / "no")
    assert not (tmp_path / "no").exists()
