"""Sentence-embedding encoder: a transformer with mean pooling and L2 normalization, fine-tuned
with an in-batch-negatives contrastive (InfoNCE) loss, and its retrieval evaluation.

A fine-tune on the corpus alone gains in domain but can forget general retrieval. Two remedies work
together: training keeps each text's embedding near the base model's (:func:`anchor_embeddings`,
``embedding.distill``), and :func:`train` measures a general out-of-domain set
(:mod:`sphana.general_eval`) and ships the mix of the base and fine-tuned weights (WiSE-FT:
``w = (1 - a) * base + a * tuned``) that gains most in domain while keeping it.

Texts are tokenized by :mod:`sphana.tokenization` (:func:`tokenize`), the torch-free code a runtime
feeds ``sentence_embedding.onnx`` with.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sphana.config import EmbeddingConfig, PathsConfig, RuntimeConfig
from sphana.errors import GateError, InputError
from sphana.io import (
    atomic_dir,
    load_jsonl,
    write_json_atomic,
    write_live_without_steps,
    write_text_atomic,
)
from sphana.tokenization import backend
from sphana.tokenization import encode as encode_texts

ENCODER_FILE = "sphana_encoder.json"  # pooling settings saved beside the weights
OOD_METRICS = ("mrr", "recall@10")  # out-of-domain metrics the shipped model must keep


POOLING_MODES = ("mean", "cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len")


class Encoder(nn.Module):
    """``transformer -> pooling over the attention mask -> L2 normalize`` (optional).

    Pooling (sentence-transformers' names): ``mean`` of the tokens, the ``cls`` token, ``max``
    over the tokens, the last token (``lasttoken``; right padding), ``weightedmean`` (token *i*
    weighted by *i*), or the sum over ``sqrt`` of the length (``mean_sqrt_len``). Sphana trains
    with mean pooling and normalization; the others serve models converted from elsewhere. The
    export wraps exactly this module, so pooling and normalization live inside the ONNX graph.
    """

    def __init__(self, transformer: nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLING_MODES)}")
        self.transformer = transformer
        self.pooling, self.normalize = pooling, normalize

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        hidden = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling)
        if not self.normalize:
            return pooled
        # F.normalize's norm exports as ReduceL2, which ONNX Runtime's symbolic shape inference
        # cannot type at opset 18; without shapes the optimizer fuses no SkipLayerNormalization
        return pooled / (pooled * pooled).sum(dim=-1, keepdim=True).sqrt().clamp(min=1e-12)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row of ``hidden`` ``[batch, sequence, dim]`` (see :class:`Encoder`)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
    if mode == "lasttoken":
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0]), last]
    if mode == "weightedmean":
        mask = mask * torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype).view(1, -1, 1)
    total = (hidden * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1e-9)
    return total / (count.sqrt() if mode == "mean_sqrt_len" else count)


def load_encoder(cfg: EmbeddingConfig) -> tuple[Encoder, Any]:
    """The base encoder and its tokenizer, loaded offline (see :mod:`sphana.base_models`)."""
    from sphana.base_models import load_backbone

    transformer, tokenizer = load_backbone(
        cfg.base_model, "embedding.base_model", cfg.init, cfg.random_arch
    )
    return Encoder(transformer), tokenizer


def load_trained(model_dir: Path) -> tuple[Encoder, Any]:
    """An encoder saved by :func:`train` or :func:`import_model` (``pytorch/`` directory), with
    the pooling its ``sphana_encoder.json`` names."""
    import json

    from transformers import AutoModel, AutoTokenizer

    transformer = AutoModel.from_pretrained(
        model_dir, add_pooling_layer=False, local_files_only=True
    )
    meta = model_dir / ENCODER_FILE
    info = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
    encoder = Encoder(transformer, info.get("pooling", "mean"), info.get("normalize", True))
    return encoder.eval(), AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """``texts`` padded to the longest and truncated to ``max_length``:
    :func:`sphana.tokenization.encode` (what a runtime feeds the ONNX encoder) on the transformers
    tokenizer's backend."""
    backend_tokenizer, pad = backend(tokenizer)
    inputs = encode_texts(backend_tokenizer, texts, max_length, pad)
    return {name: torch.from_numpy(array) for name, array in inputs.items()}


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


def retrieval_ranks(
    query_emb: np.ndarray, corpus_emb: np.ndarray, corpus_ids: list[str], relevant: list[list[str]]
) -> np.ndarray:
    """Each query's rank (1 = best) of its first relevant passage under cosine retrieval;
    ``inf`` when none of them is in the corpus."""
    scores = unit(query_emb) @ unit(corpus_emb).T
    order = np.argsort(-scores, axis=1, kind="stable")
    id_index = {cid: i for i, cid in enumerate(corpus_ids)}
    ranks = []
    for q, rel in enumerate(relevant):
        rel_idx = {id_index[r] for r in rel if r in id_index}
        hits = np.flatnonzero(np.isin(order[q], list(rel_idx)))
        ranks.append(int(hits[0]) + 1 if len(hits) else math.inf)
    return np.array(ranks, dtype=float)


def unit(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (cosine = dot product), for models that do not normalize."""
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    """Recall@1/5/10 (the share of queries with a relevant passage in the top k) and MRR."""
    metrics = {f"recall@{k}": float(np.mean(ranks <= k)) for k in (1, 5, 10)}
    metrics["mrr"] = float(np.mean(1.0 / ranks))
    return metrics


def retrieval_metrics(
    query_emb: np.ndarray,
    corpus_emb: np.ndarray,
    corpus_ids: list[str],
    relevant: list[list[str]],
    positive_emb: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@1/5/10 and MRR of cosine retrieval (:func:`rank_metrics`); mean cosine of each
    query to its positive."""
    ranks = retrieval_ranks(query_emb, corpus_emb, corpus_ids, relevant)
    return _rounded_metrics(ranks, query_emb, positive_emb)


def _rounded_metrics(
    ranks: np.ndarray, query_emb: np.ndarray, positive_emb: np.ndarray | None
) -> dict[str, float]:
    metrics = rank_metrics(ranks)
    if positive_emb is not None:
        cosine = np.sum(unit(query_emb) * unit(positive_emb), axis=1)
        metrics["mean_cosine"] = float(np.mean(cosine))
    return {k: round(v, 6) for k, v in metrics.items()}


def paired_difference(
    base: np.ndarray, other: np.ndarray, seed: int = 0, samples: int = 2000
) -> dict[str, dict[str, float]]:
    """``other`` minus ``base`` in MRR and recall@10 over the same queries (their
    :func:`retrieval_ranks`), with a 95% paired-bootstrap confidence interval: whether a
    difference of a few queries is more than chance."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(base), size=(samples, len(base)))
    out = {}
    for name, of in (("mrr", lambda r: 1.0 / r), ("recall@10", lambda r: (r <= 10) * 1.0)):
        diff = of(other) - of(base)
        means = diff[draws].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        out[name] = {
            "difference": round(float(diff.mean()), 6),
            "ci95": [round(float(low), 6), round(float(high), 6)],
            "better": int((diff > 0).sum()),
            "worse": int((diff < 0).sum()),
        }
    return out


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

    @classmethod
    def from_pairs(cls, pairs: list[Any]) -> ValidationSet:
        """One relevant passage per query: ``pairs`` of ``.id``, ``.query``, ``.passage``
        (e.g. :class:`sphana.general_eval.Pair`); the passages are the corpus, shortest first
        (order does not change the metrics; batches of similar length pad less)."""
        pairs = sorted(pairs, key=lambda p: len(p.passage))
        return cls(
            queries=[p.query for p in pairs],
            positives=[p.passage for p in pairs],
            relevant=[[p.id] for p in pairs],
            corpus_ids=[p.id for p in pairs],
            corpus_texts=[p.passage for p in pairs],
        )

    def evaluate(self, embed: Any) -> dict[str, float]:
        """Metrics for ``embed(texts) -> np.ndarray`` (any backend: PyTorch or ONNX Runtime)."""
        return self.retrieve(embed)[0]

    def retrieve(self, embed: Any) -> tuple[dict[str, float], np.ndarray]:
        """:meth:`evaluate`'s metrics and each query's :func:`retrieval_ranks`."""
        corpus = embed(self.corpus_texts)
        row = {text: i for i, text in enumerate(self.corpus_texts)}
        if all(p in row for p in self.positives):  # positives from the corpus: embed them once
            positives = corpus[[row[p] for p in self.positives]]
        else:
            positives = embed(self.positives)
        queries = embed(self.queries)
        ranks = retrieval_ranks(queries, corpus, self.corpus_ids, self.relevant)
        return _rounded_metrics(ranks, queries, positives), ranks


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


@dataclass
class Anchors:
    """The base model's embeddings of the training texts (row ``rows[text]``), before any step."""

    rows: dict[str, int]
    embeddings: torch.Tensor  # [texts, dim], L2-normalized

    def distance(self, emb: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Mean cosine distance of ``emb`` (normalized, one row per text) to the anchors."""
        anchors = self.embeddings[[self.rows[t] for t in texts]].to(emb.device)
        return (1.0 - (emb * anchors).sum(dim=-1)).mean()


def anchor_embeddings(
    encoder: Encoder, tokenizer: Any, pairs: list[dict[str, Any]], cfg: EmbeddingConfig, device
) -> Anchors:
    """:class:`Anchors` of every query and passage of ``pairs``, embedded once by ``encoder``
    (the base model, before training): the targets of the distillation term."""
    # by length (batches pad less), then text: a set's order changes with the process's hash
    # seed, and a text's batch (its padding) moves its embedding in the last bits
    texts = sorted({r["query"] for r in pairs} | {r["positive"] for r in pairs}, key=_by_length)
    emb = encode(encoder, tokenizer, texts, cfg.eval_batch_size, cfg.max_seq_length, device)
    return Anchors({t: i for i, t in enumerate(texts)}, torch.from_numpy(emb))


def _by_length(text: str) -> tuple[int, str]:
    return len(text), text


def pair_loss(tokenizer: Any, cfg: EmbeddingConfig, anchors: Anchors | None = None):
    """The loss of a batch of ``{"query", "positive", "positive_id"}`` pairs, for the runtime:
    :func:`contrastive_loss`, plus ``cfg.distill`` times the mean cosine distance of the query
    and passage embeddings to their ``anchors`` (the base model's), which keeps the fine-tune
    close to the base's geometry so it forgets less outside the corpus."""

    def loss(model: nn.Module, batch: list[dict[str, Any]], dev: torch.device) -> torch.Tensor:
        def embed(texts: list[str]) -> torch.Tensor:
            features = tokenize(tokenizer, texts, cfg.max_seq_length)
            return model(**{k: v.to(dev) for k, v in features.items()}).float()

        # queries and passages are padded separately: short queries cost little
        queries, passages = [r["query"] for r in batch], [r["positive"] for r in batch]
        q, p = embed(queries), embed(passages)
        total = contrastive_loss(q, p, [r["positive_id"] for r in batch], cfg.temperature)
        if anchors is not None and cfg.distill:
            total = total + cfg.distill * (
                anchors.distance(q, queries) + anchors.distance(p, passages)
            )
        return total

    return loss


def training_job(
    cfg: EmbeddingConfig,
    encoder: Encoder,
    tokenizer: Any,
    pairs: list[dict],
    data_files: list[Path],
    anchors: Anchors | None = None,
):  # -> sphana.runtime.Job
    """The runtime job that fine-tunes ``encoder`` on ``pairs`` as ``cfg`` says (with the
    distillation term toward ``anchors`` where given)."""
    from sphana import runtime as rt

    return rt.Job.for_component(
        "embedding",
        cfg,
        ignore=(
            "eval_batch_size",
            "gate_metric",
            "metric_threshold",
            "interpolation",
            "ood_pairs",
            "ood_tolerance",
        ),
        model=encoder,
        examples=pairs,
        loss=pair_loss(tokenizer, cfg, anchors),
        data_files=data_files,
        min_batch=2,
    )


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s weights and buffers in CPU memory."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def interpolate(
    base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], a: float
) -> dict[str, torch.Tensor]:
    """``(1 - a) * base + a * tuned`` for every floating tensor (WiSE-FT); integer buffers are
    the base's. ``a = 0`` is exactly ``base`` and ``a = 1`` exactly ``tuned``."""
    if base.keys() != tuned.keys():
        raise ValueError("base and fine-tuned weights have different tensors; cannot interpolate")
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"interpolation weight {a} is outside [0, 1]")
    if a in (0.0, 1.0):
        return {k: v.clone() for k, v in (base if a == 0.0 else tuned).items()}
    return {
        k: torch.lerp(b, tuned[k], a) if b.is_floating_point() else b.clone()
        for k, b in base.items()
    }


def keeps_general(
    metrics: dict[str, float], base: dict[str, float], tolerance: float = 0.0
) -> bool:
    """Whether out-of-domain ``metrics`` lose no more than ``tolerance`` of the base's
    :data:`OOD_METRICS`."""
    return all(metrics[m] >= base[m] - tolerance for m in OOD_METRICS)


def select_mix(
    grid: list[dict[str, Any]],
    base_general: dict[str, float],
    gate_metric: str,
    tolerance: float = 0.0,
) -> dict[str, Any] | None:
    """The mix to ship: of the rows (``{"a", "in_domain", "out_of_domain"}``) whose
    out-of-domain figures keep the base's (:func:`keeps_general`), the best in-domain
    ``gate_metric``, then in-domain MRR, then the smallest ``a`` (closest to the base).
    None when no row keeps them (only possible when the grid lacks ``a = 0``)."""
    kept = [r for r in grid if keeps_general(r["out_of_domain"], base_general, tolerance)]
    if not kept:
        return None
    return max(kept, key=lambda r: (r["in_domain"][gate_metric], r["in_domain"]["mrr"], -r["a"]))


def check_general_gate(
    shipped: dict[str, float], base: dict[str, float], tolerance: float, a: float
) -> None:
    """Fail when the mix ``a`` lost more than ``tolerance`` of the base's out-of-domain
    :data:`OOD_METRICS` (on the general set's selection half).

    Raises:
        GateError: naming the metric, both values, the mix and the keys to change.
    """
    for m in OOD_METRICS:
        if shipped[m] < base[m] - tolerance:  # as keeps_general
            raise GateError(
                f"embedding out-of-domain gate failed: general set (selection half) {m} = "
                f"{shipped[m]:.4f} of the mix a = {a} < base model's {base[m]:.4f} - "
                f"embedding.ood_tolerance = {tolerance}; add 0.0 (the base model) to "
                "embedding.interpolation or raise embedding.ood_tolerance; nothing was written"
            )


def save(encoder: Encoder, tokenizer: Any, info: dict[str, Any], out_dir: Path) -> None:
    """``out_dir`` (written whole) in the trained layout :func:`load_trained` reads: the
    transformer's weights, the tokenizer with ``vocab.txt``, and ``sphana_encoder.json`` (the
    pooling and normalization, plus ``info``)."""
    with atomic_dir(out_dir) as tmp:
        encoder.transformer.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_vocab_txt(tokenizer, tmp / "vocab.txt")
        write_json_atomic(
            tmp / ENCODER_FILE,
            {"pooling": encoder.pooling, "normalize": encoder.normalize, **info},
        )


def import_model(
    cfg: EmbeddingConfig, paths: PathsConfig, datasets_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Ship ``embedding.import_from`` (a model trained elsewhere) instead of a fine-tune: read
    as ``sphana convert`` reads it (:func:`sphana.convert.plan`), L2-normalized, measured on the
    validation set and both halves of the general set, gated by ``embedding.metric_threshold``,
    and saved to ``out_dir`` in the trained model's layout with its lineage (path and sha256 of
    its files), which the export puts in the manifest.

    Raises:
        ConfigError: ``import_from`` outside ``paths.imports/embedding`` (the directory
            ``dvc.yaml`` tracks for it).
        InputError: a model ``sphana convert`` would refuse, with what to pass.
        GateError: below ``embedding.metric_threshold``.
    """
    from sphana import general_eval
    from sphana import runtime as rt
    from sphana.convert import import_plan
    from sphana.convert.embedding import load

    assert cfg.import_from is not None
    p, lineage = import_plan(
        "embedding",
        cfg.import_from,
        paths.imports,
        pooling=cfg.import_pooling,
        normalize=True,
        max_seq_length=cfg.max_seq_length,
    )
    encoder, tokenizer = load(p)

    def embed(texts: list[str]) -> np.ndarray:
        return encode(encoder, tokenizer, texts, cfg.eval_batch_size, cfg.max_seq_length)

    validation = ValidationSet.load(datasets_dir)
    metrics = validation.evaluate(embed)
    general_set = general_eval.build(cfg.ood_pairs)
    general = {
        half: ValidationSet.from_pairs(getattr(general_set, half)).evaluate(embed)
        for half in ("selection", "report")
    }
    rt.log(
        f"embedding imported from {cfg.import_from} ({p.layout}, {p.pooling} pooling): "
        f"in-domain {cfg.gate_metric} {metrics[cfg.gate_metric]:.4f}"
    )
    rt.check_gate("embedding", metrics, cfg.gate_metric, cfg.metric_threshold)
    info = {"max_seq_length": cfg.max_seq_length, "base_model": cfg.import_from}
    save(encoder, tokenizer, {**info, "imported_from": lineage}, out_dir)
    write_live_without_steps(Path(paths.live) / "train_embedding", metrics)
    return {
        "imported": {"source": lineage, "pooling": p.pooling, "pooling_from": p.pooling_from},
        "base": metrics,
        "fine_tuned": metrics,
        "out_of_domain": {"set": general_set.describe(), "shipped": general},
        "validation": {"queries": len(validation.queries), "corpus": len(validation.corpus_ids)},
    }


def train(
    cfg: EmbeddingConfig,
    runtime: RuntimeConfig,
    paths: PathsConfig,
    datasets_dir: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """Fine-tune the encoder on the shared runtime, mix it with the base weights so it keeps
    general retrieval, and save the mix to ``out_dir`` (rank 0). With ``embedding.import_from``
    set, :func:`import_model` ships that model instead.

    The mix ``a`` is chosen from ``embedding.interpolation`` with the in-domain validation set
    and the *selection* half of the general set (:func:`select_mix`), which also gates it; the
    held-out *report* half (other modules) only measures the base, raw and shipped models.

    Returns:
        In-domain validation metrics ``base``, ``fine_tuned`` (the shipped model) and
        ``before_interpolation`` (the raw fine-tune); ``out_of_domain`` (the general set and
        base / raw fine-tune / shipped figures on both halves); ``interpolation`` (the chosen
        ``a`` and every mix's figures); training figures.

    Raises:
        GateError: when the shipped model misses ``embedding.metric_threshold`` in domain, or
            loses more than ``embedding.ood_tolerance`` of the base's out-of-domain MRR or
            recall@10 on the selection half (possible only when the grid lacks ``a = 0``;
            ``out_dir`` is then not written, and the checkpoints are kept).
    """
    from sphana import general_eval
    from sphana import runtime as rt

    if cfg.import_from is not None:
        return import_model(cfg, paths, datasets_dir, out_dir)
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

    added_seconds = 0.0  # what the general set and the mixes cost: building and evaluating
    report_ranks: dict[str, np.ndarray] = {}  # model -> ranks on the report half

    def general(model: str, **halves: ValidationSet) -> dict[str, dict[str, float]]:
        nonlocal added_seconds
        start = time.perf_counter()
        out = {}
        for name, half in halves.items():
            out[name], ranks = half.retrieve(embed)
            if name == "report":
                report_ranks[model] = ranks
        added_seconds += time.perf_counter() - start
        return out

    base_metrics: dict[str, float] = {}
    if leader:
        base_metrics = validation.evaluate(embed)
        start = time.perf_counter()
        general_set = general_eval.build(cfg.ood_pairs)
        added_seconds += time.perf_counter() - start
        selection = ValidationSet.from_pairs(general_set.selection)
        report = ValidationSet.from_pairs(general_set.report)
        base_general = general("base", selection=selection, report=report)
        base_state = cpu_state(encoder)

    start = time.perf_counter()
    anchors = anchor_embeddings(encoder, tokenizer, pairs, cfg, device) if cfg.distill else None
    anchor_seconds = time.perf_counter() - start
    job = training_job(cfg, encoder, tokenizer, pairs, [train_file], anchors)
    result = rt.fit_stage(job, runtime, device, paths)
    metrics: dict[str, Any] = {}
    if leader:
        tuned_metrics = validation.evaluate(embed)
        tuned_general = general("fine_tuned", selection=selection, report=report)
        tuned_state = cpu_state(encoder)
        grid = []
        for a in sorted(set(cfg.interpolation)):
            if a == 0.0:  # the ends are the models measured already
                in_domain, ood = base_metrics, base_general["selection"]
            elif a == 1.0:
                in_domain, ood = tuned_metrics, tuned_general["selection"]
            else:
                start = time.perf_counter()
                encoder.load_state_dict(interpolate(base_state, tuned_state, a))
                in_domain = validation.evaluate(embed)
                added_seconds += time.perf_counter() - start
                ood = general(f"a={a}", selection=selection)["selection"]
            grid.append({"a": a, "in_domain": in_domain, "out_of_domain": ood})
            rt.log(
                f"embedding mix a={a}: in-domain {cfg.gate_metric} "
                f"{in_domain[cfg.gate_metric]:.4f}; out of domain (selection half) "
                + ", ".join(f"{m} {ood[m]:.4f}" for m in OOD_METRICS)
            )
        chosen = select_mix(grid, base_general["selection"], cfg.gate_metric, cfg.ood_tolerance)
        # none kept the base's figures (the grid lacks a = 0): the gate names the closest mix
        chosen = chosen or min(grid, key=lambda row: row["a"])
        a = chosen["a"]
        check_general_gate(chosen["out_of_domain"], base_general["selection"], cfg.ood_tolerance, a)
        encoder.load_state_dict(interpolate(base_state, tuned_state, a))
        shipped_metrics = chosen["in_domain"]
        if a == 0.0:
            shipped_general = base_general
            report_ranks["shipped"] = report_ranks["base"]
        elif a == 1.0:
            shipped_general = tuned_general
            report_ranks["shipped"] = report_ranks["fine_tuned"]
        else:
            shipped_general = {
                "selection": chosen["out_of_domain"],
                **general("shipped", report=report),
            }
        # held out, the report half says whether "keeps the base's figures" was more than luck
        held_out = paired_difference(report_ranks["base"], report_ranks["shipped"], runtime.seed)
        rt.log(
            "embedding shipped vs base, out of domain (report half): "
            + "; ".join(
                f"{m} {d['difference']:+.4f} (95% CI {d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f})"
                for m, d in held_out.items()
            )
        )
        rt.check_gate("embedding", shipped_metrics, cfg.gate_metric, cfg.metric_threshold)
        encoder.cpu().eval()
        info = {"max_seq_length": cfg.max_seq_length, "base_model": cfg.base_model}
        save(encoder, tokenizer, {**info, "init": cfg.init.value, "interpolation": a}, out_dir)
        rt.clear_checkpoints(Path(paths.checkpoints), "embedding")
        metrics = {
            "base": base_metrics,
            "fine_tuned": shipped_metrics,
            "before_interpolation": tuned_metrics,
            "out_of_domain": {
                "set": {
                    **general_set.describe(),
                    **_token_counts(tokenizer, general_set, cfg.max_seq_length),
                },
                "base": base_general,
                "fine_tuned": tuned_general,
                "shipped": shipped_general,
                "shipped_minus_base_report": held_out,
                "seconds": round(added_seconds, 2),  # incl. the mixes' in-domain evaluation
            },
            "interpolation": {"chosen": a, "grid": grid},
            "train": {
                "pairs": len(pairs),
                "epochs": cfg.epochs,
                "distill": cfg.distill,
                "anchor_seconds": round(anchor_seconds, 2),  # embedding the anchors, every rank
                **rt.summary(result, runtime),
            },
            "validation": {
                "queries": len(validation.queries),
                "corpus": len(validation.corpus_ids),
            },
        }
    rt.teardown()
    return metrics


def _token_counts(tokenizer: Any, general_set: Any, max_length: int) -> dict[str, float]:
    """Mean query and passage length in tokens, and the share of passages past ``max_length``."""
    pairs = [*general_set.selection, *general_set.report]
    queries = [len(ids) for ids in tokenizer([p.query for p in pairs])["input_ids"]]
    passages = [len(ids) for ids in tokenizer([p.passage for p in pairs])["input_ids"]]
    return {
        "mean_query_tokens": round(sum(queries) / len(queries), 1),
        "mean_passage_tokens": round(sum(passages) / len(passages), 1),
        "truncated_passages": round(sum(n > max_length for n in passages) / len(passages), 3),
    }


def write_vocab_txt(tokenizer: Any, path: Path) -> None:
    """``vocab.txt`` (one WordPiece token per line, line number = id) for consumers whose
    tokenizers read it (e.g. BERT tokenizers in .NET); transformers 5 saves only tokenizer.json."""
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in by_id] != list(range(len(by_id))):
        raise ValueError("tokenizer ids are not contiguous; cannot write vocab.txt")
    write_text_atomic(path, "".join(f"{token}\n" for token in by_id))
