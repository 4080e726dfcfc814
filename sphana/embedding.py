"""Sentence-embedding encoder: a transformer with mean pooling and L2 normalization, fine-tuned
with an in-batch-negatives contrastive (InfoNCE) loss, and its retrieval evaluation."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sphana.config import EmbeddingConfig, PathsConfig, RuntimeConfig
from sphana.errors import InputError
from sphana.io import atomic_dir, load_jsonl, write_json_atomic, write_text_atomic

ENCODER_FILE = "sphana_encoder.json"  # pooling settings saved beside the weights


class Encoder(nn.Module):
    """``transformer -> mean pooling over the attention mask -> L2 normalize``.

    The export wraps exactly this module, so pooling and normalization live inside the ONNX graph.
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        hidden = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=-1)


def load_encoder(cfg: EmbeddingConfig) -> tuple[Encoder, Any]:
    """The base encoder and its tokenizer, loaded offline (see :mod:`sphana.base_models`)."""
    from sphana.base_models import load_backbone

    transformer, tokenizer = load_backbone(
        cfg.base_model, "embedding.base_model", cfg.init, cfg.random_arch
    )
    return Encoder(transformer), tokenizer


def load_trained(model_dir: Path) -> tuple[Encoder, Any]:
    """An encoder saved by :func:`train` (``pytorch/`` directory)."""
    from transformers import AutoModel, AutoTokenizer

    transformer = AutoModel.from_pretrained(
        model_dir, add_pooling_layer=False, local_files_only=True
    )
    return Encoder(transformer).eval(), AutoTokenizer.from_pretrained(
        model_dir, local_files_only=True
    )


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=True,
    )


@torch.inference_mode()
def encode(
    encoder: Encoder,
    tokenizer: Any,
    texts: list[str],
    batch_size: int,
    max_length: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Embeddings (``[len(texts), dim]``, L2-normalized) in input order."""
    encoder.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        batch = {
            k: v.to(device)
            for k, v in tokenize(tokenizer, texts[i : i + batch_size], max_length).items()
        }
        out.append(encoder(**batch).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def retrieval_metrics(
    query_emb: np.ndarray,
    corpus_emb: np.ndarray,
    corpus_ids: list[str],
    relevant: list[list[str]],
    positive_emb: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@1/5/10 and MRR of cosine retrieval; mean cosine of each query to its positive.

    Recall@k is the share of queries with at least one relevant passage in the top k.
    """
    scores = query_emb @ corpus_emb.T
    order = np.argsort(-scores, axis=1, kind="stable")
    id_index = {cid: i for i, cid in enumerate(corpus_ids)}
    ranks = []
    for q, rel in enumerate(relevant):
        rel_idx = {id_index[r] for r in rel if r in id_index}
        hits = np.flatnonzero(np.isin(order[q], list(rel_idx)))
        ranks.append(int(hits[0]) + 1 if len(hits) else math.inf)
    ranks_arr = np.array(ranks, dtype=float)
    metrics = {f"recall@{k}": float(np.mean(ranks_arr <= k)) for k in (1, 5, 10)}
    metrics["mrr"] = float(np.mean(1.0 / ranks_arr))
    if positive_emb is not None:
        metrics["mean_cosine"] = float(np.mean(np.sum(query_emb * positive_emb, axis=1)))
    return {k: round(v, 6) for k, v in metrics.items()}


@dataclass
class ValidationSet:
    queries: list[str]
    positives: list[str]
    relevant: list[list[str]]
    corpus_ids: list[str]
    corpus_texts: list[str]

    @classmethod
    def load(cls, datasets_dir: Path) -> ValidationSet:
        records = load_jsonl(datasets_dir / "validation.jsonl")
        corpus = load_jsonl(datasets_dir / "validation_corpus.jsonl")
        if not records or not corpus:
            raise InputError(datasets_dir, "empty validation split; rerun build_datasets")
        return cls(
            queries=[r["query"] for r in records],
            positives=[r["positive"] for r in records],
            relevant=[r["relevant_ids"] for r in records],
            corpus_ids=[c["id"] for c in corpus],
            corpus_texts=[c["text"] for c in corpus],
        )

    def evaluate(self, embed: Any) -> dict[str, float]:
        """Metrics for ``embed(texts) -> np.ndarray`` (any backend: PyTorch or ONNX Runtime)."""
        return retrieval_metrics(
            embed(self.queries),
            embed(self.corpus_texts),
            self.corpus_ids,
            self.relevant,
            embed(self.positives),
        )


def contrastive_loss(
    q: torch.Tensor, p: torch.Tensor, positive_ids: list[str], temperature: float
) -> torch.Tensor:
    """InfoNCE over in-batch negatives. Entries where another row has the *same* positive passage
    are masked out, so a duplicate passage is never pushed away as a negative."""
    logits = (q @ p.T) / temperature
    same = torch.tensor(
        [[a == b for b in positive_ids] for a in positive_ids], device=logits.device
    )
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, torch.finfo(logits.dtype).min)
    return nn.functional.cross_entropy(logits, torch.arange(len(q), device=logits.device))


def pair_loss(tokenizer: Any, cfg: EmbeddingConfig):
    """The loss of a batch of ``{"query", "positive", "positive_id"}`` pairs, for the runtime."""

    def loss(model: nn.Module, batch: list[dict[str, Any]], dev: torch.device) -> torch.Tensor:
        def embed(texts: list[str]) -> torch.Tensor:
            features = tokenize(tokenizer, texts, cfg.max_seq_length)
            return model(**{k: v.to(dev) for k, v in features.items()}).float()

        # queries and passages are padded separately: short queries cost little
        q = embed([r["query"] for r in batch])
        p = embed([r["positive"] for r in batch])
        return contrastive_loss(q, p, [r["positive_id"] for r in batch], cfg.temperature)

    return loss


def training_job(
    cfg: EmbeddingConfig,
    encoder: Encoder,
    tokenizer: Any,
    pairs: list[dict],
    data_files: list[Path],
):  # -> sphana.runtime.Job
    """The runtime job that fine-tunes ``encoder`` on ``pairs`` as ``cfg`` says."""
    from sphana import runtime as rt

    return rt.Job.for_component(
        "embedding",
        cfg,
        ignore=("eval_batch_size", "gate_metric", "metric_threshold"),
        model=encoder,
        examples=pairs,
        loss=pair_loss(tokenizer, cfg),
        data_files=data_files,
        min_batch=2,
    )


def train(
    cfg: EmbeddingConfig,
    runtime: RuntimeConfig,
    paths: PathsConfig,
    datasets_dir: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """Fine-tune the encoder on the shared runtime; save it to ``out_dir`` (rank 0).

    Returns base and fine-tuned validation metrics and training figures.

    Raises:
        GateError: when the fine-tuned model misses ``embedding.metric_threshold``
            (``out_dir`` is then not written, and the checkpoints are kept).
    """
    from sphana import runtime as rt

    device = rt.setup(runtime)
    train_file = datasets_dir / "train.jsonl"
    pairs = load_jsonl(train_file)
    if not pairs:
        raise InputError(train_file, "no training pairs; rerun build_datasets")
    if cfg.max_train_pairs and len(pairs) > cfg.max_train_pairs:
        pairs = random.Random(runtime.seed).sample(pairs, cfg.max_train_pairs)
    validation = ValidationSet.load(datasets_dir)
    encoder, tokenizer = load_encoder(cfg)
    encoder.to(device)
    leader = rt.rank() == 0

    def embed(texts: list[str]) -> np.ndarray:
        return encode(encoder, tokenizer, texts, cfg.eval_batch_size, cfg.max_seq_length, device)

    base_metrics = validation.evaluate(embed) if leader else {}

    job = training_job(cfg, encoder, tokenizer, pairs, [train_file])
    result = rt.fit_stage(job, runtime, device, paths)
    metrics: dict[str, Any] = {}
    if leader:
        tuned_metrics = validation.evaluate(embed)
        rt.check_gate("embedding", tuned_metrics, cfg.gate_metric, cfg.metric_threshold)
        encoder.cpu().eval()
        with atomic_dir(out_dir) as tmp:
            encoder.transformer.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_vocab_txt(tokenizer, tmp / "vocab.txt")
            write_json_atomic(
                tmp / ENCODER_FILE,
                {
                    "pooling": "mean",
                    "normalize": True,
                    "max_seq_length": cfg.max_seq_length,
                    "base_model": cfg.base_model,
                    "init": cfg.init.value,
                },
            )
        rt.clear_checkpoints(Path(paths.checkpoints), "embedding")
        metrics = {
            "base": base_metrics,
            "fine_tuned": tuned_metrics,
            "train": {"pairs": len(pairs), "epochs": cfg.epochs, **rt.summary(result, runtime)},
            "validation": {
                "queries": len(validation.queries),
                "corpus": len(validation.corpus_ids),
            },
        }
    rt.teardown()
    return metrics


def write_vocab_txt(tokenizer: Any, path: Path) -> None:
    """``vocab.txt`` (one WordPiece token per line, line number = id) for consumers whose
    tokenizers read it (e.g. BERT tokenizers in .NET); transformers 5 saves only tokenizer.json."""
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in by_id] != list(range(len(by_id))):
        raise ValueError("tokenizer ids are not contiguous; cannot write vocab.txt")
    write_text_atomic(path, "".join(f"{token}\n" for token in by_id))
