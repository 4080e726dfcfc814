from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sphana.embedding import contrastive_loss, retrieval_metrics


def test_retrieval_metrics_by_hand() -> None:
    corpus = np.eye(4, dtype=np.float32)  # passages a, b, c, d
    ids = ["a", "b", "c", "d"]
    queries = np.array([[1, 0, 0, 0], [0.9, 0.5, 0, 0], [0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    relevant = [["a"], ["b"], ["a", "zzz"]]  # ranks: 1, 2, 4 (zzz is not in the pool)
    m = retrieval_metrics(queries, corpus, ids, relevant, positive_emb=corpus[[0, 1, 0]])
    assert m["recall@1"] == pytest.approx(1 / 3, abs=1e-6)
    assert m["recall@5"] == 1.0 and m["recall@10"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3, abs=1e-6)
    assert m["mean_cosine"] == pytest.approx((1 + 0.5 + 0.1) / 3, abs=1e-6)


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
