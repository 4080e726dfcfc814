"""The serving engine: a verified release's components in warmed ONNX Runtime sessions.

:class:`Engine` holds one :class:`Model` per component the release has (``embedding``,
``relation``, ``gnn``, ``llm``), each an ONNX Runtime session of the file the precision asks for
(the manifest's INT8 ``path`` or its ``fp32_path``). Text goes through the component's own
``tokenizer.json``, the same file the build exported beside the model, with truncation and padding
done here (never the tokenizer file's fixed padding), so a batch pads to its longest input only.

Nothing here imports torch: numpy, onnxruntime and tokenizers only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sphana.errors import ConfigError

log = logging.getLogger("sphana.serve")

COMPONENTS = ("embedding", "relation", "gnn", "llm")
PRECISIONS = ("int8", "fp32", "int4")  # int4: the generator's 4-bit weight-only sibling
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
PROVIDERS = ("cpu", "cuda")
WARMUP_LENGTHS = (8, 64)  # tokens: representative shapes each text session runs once before ready


@dataclass(frozen=True)
class SessionSettings:
    """ONNX Runtime session options, the same for every component."""

    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per physical core)
    inter_op_threads: int = 0
    graph_optimization: str = "all"
    provider: str = "cpu"  # "cuda" uses CUDAExecutionProvider when onnxruntime-gpu has it
    # thread-pool threads spin waiting for work: a little less latency for a lone request, but
    # under load they take the cores the server's event loop needs (measured: benchmarks/)
    spin: bool = False

    def __post_init__(self) -> None:
        if self.graph_optimization not in OPTIMIZATION_LEVELS:
            raise ConfigError(
                f"--graph-optimization {self.graph_optimization!r}: choose one of "
                f"{', '.join(OPTIMIZATION_LEVELS)}"
            )
        if self.provider not in PROVIDERS:
            raise ConfigError(f"--provider {self.provider!r}: choose one of {', '.join(PROVIDERS)}")

    def providers(self) -> list[str]:
        import onnxruntime as ort

        if self.provider == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                return ["CUDAExecutionProvider", "CPUExecutionProvider"]
            log.warning(
                "--provider cuda: this onnxruntime has no CUDAExecutionProvider "
                "(pip install 'sphana[gpu]'); running on CPU"
            )
        return ["CPUExecutionProvider"]

    def session(self, path: Path) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        if not self.spin:  # idle pool threads sleep: the event loop gets the CPU they would burn
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.graph_optimization]
        return ort.InferenceSession(str(path), options, providers=self.providers())


def parse_precision(spec: Sequence[str]) -> dict[str, str]:
    """``--precision`` values: ``int8`` or ``fp32`` for every component, or ``name=precision``
    for one (later values win): ``["int8", "llm=fp32"]``; ``llm=int4`` for the generator's
    4-bit sibling."""
    out = dict.fromkeys(COMPONENTS, "int8")
    for item in spec:
        name, _, value = item.rpartition("=")
        valid = value in PRECISIONS and (value != "int4" or name == "llm")
        if not valid or (name and name not in COMPONENTS):
            raise ConfigError(
                f"--precision {item!r}: give int8 or fp32, for all components or as "
                f"COMPONENT=PRECISION with COMPONENT one of {', '.join(COMPONENTS)} "
                "(and llm=int4 for the generator's 4-bit weights)"
            )
        for component in [name] if name else COMPONENTS:
            out[component] = value
    return out


@dataclass
class Model:
    """One component's session and what describes it (``/info``, ``/v2/models/{name}``)."""

    name: str
    version: str
    precision: str
    path: Path
    config: dict[str, Any]
    session: Any
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.inputs = [_meta(i) for i in self.session.get_inputs()]
        self.outputs = [_meta(o) for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[Any]:
        return self.session.run(outputs, feed)


_ORT_TO_NUMPY = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _meta(arg: Any) -> dict[str, Any]:
    return {
        "name": arg.name,
        "dtype": _ORT_TO_NUMPY.get(arg.type, arg.type),
        "shape": [d if isinstance(d, int) else -1 for d in arg.shape],
    }


class InputTooLong(ValueError):
    """A text longer than the model takes, with truncation off."""

    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(
            f"{tokens} tokens, more than the model's {limit}: shorten it or ask for truncation "
            '(TEI: "truncate": true; server: --auto-truncate)'
        )
        self.index, self.tokens, self.limit = index, tokens, limit


class InvalidInput(ValueError):
    """A request field the engine cannot use: ``field`` names it, the message says what to give."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_spans(text: str, spans: Sequence[Any]) -> None:
    """Given entity spans must be ``{"start", "end"}`` integers inside ``text``."""
    for i, e in enumerate(spans):
        start, end = (e.get("start"), e.get("end")) if isinstance(e, dict) else (None, None)
        ints = isinstance(start, int) and isinstance(end, int)
        if not ints or not 0 <= start < end <= len(text):
            raise InvalidInput(
                f"entities[{i}]",
                f"span [{start}, {end}) is not inside the text (length {len(text)}); "
                "give 0 <= start < end <= length",
            )


def check_ranks(ranks: Sequence[Any], count: int) -> None:
    """First-stage ranks: one integer >= 0 per text."""
    if len(ranks) != count or not all(isinstance(r, int) and r >= 0 for r in ranks):
        raise InvalidInput("ranks", f"one rank >= 0 per text ({count})")


class Embedder:
    """The embedding component: texts -> L2-normalized vectors (pooling is in the graph).

    Texts are counted on the event loop (:meth:`lengths`: the limit check and the batch cost)
    and tokenized for the model with the build's own :func:`sphana.tokenization.encode`, on
    the batch's thread (:meth:`run`)."""

    def __init__(self, model: Model, files: Path) -> None:
        from sphana import tokenization

        self.model = model
        config = model.config
        self.max_length = int(config["max_seq_length"])
        self.tokenizer, self.pad = tokenization.load(files)
        self.counter, _ = tokenization.load(files)  # whole lengths: never truncates or pads
        self.counter.no_truncation()
        self.counter.no_padding()
        self.dimension = int(config.get("output_dimension", config.get("dimension", 0)))

    def lengths(self, texts: Sequence[str], truncate: bool) -> list[int]:
        """Tokens per text (at most the model's limit); :class:`InputTooLong` for the first
        text over it unless ``truncate``."""
        out = []
        for i, e in enumerate(self.counter.encode_batch(list(texts))):
            if len(e.ids) > self.max_length and not truncate:
                raise InputTooLong(i, len(e.ids), self.max_length)
            out.append(min(len(e.ids), self.max_length))
        return out

    def run(self, texts: Sequence[str]) -> np.ndarray:
        from sphana.tokenization import encode

        return self.model.run(encode(self.tokenizer, list(texts), self.max_length, self.pad))[0]

    def embed(self, texts: Sequence[str], truncate: bool = True) -> np.ndarray:
        self.lengths(texts, truncate)
        return self.run(texts)

    def warm(self) -> None:
        for n in WARMUP_LENGTHS:
            self.embed([" ".join(["word"] * n)] * 2)


class RelationExtractor:
    """The relation component: candidate entity pairs -> label probabilities, read both ways
    (:mod:`sphana.relation_inputs`, the build's code)."""

    def __init__(self, model: Model, files: Path) -> None:
        from sphana import tokenization

        self.model = model
        self.labels: list[str] = list(model.config["labels"])
        self.max_length = int(model.config["max_seq_length"])
        self.tokenizer, self.pad = tokenization.load(files)

    def score(self, pairs: Sequence[dict[str, Any]]) -> tuple[np.ndarray, list[Any]]:
        """``(probabilities [2 * len(pairs), labels]: each pair in text order, then reversed;
        the relation each pair states or None)``."""
        from sphana.relation_inputs import pair_examples, pair_relations, relation_inputs, softmax

        if not pairs:
            return np.zeros((0, len(self.labels)), dtype=np.float32), []
        feed = relation_inputs(self.tokenizer, pair_examples(pairs), self.max_length, self.pad)
        probs = softmax(self.model.run(feed)[0])
        return probs, pair_relations(pairs, probs, self.labels)


class Spans:
    """A parser that finds the entity spans it is given (``{"start", "end", "type"?}``) and the
    sentences the ``simple`` parser finds, so given spans pair as detected ones do."""

    version = "given-spans"

    def __init__(self, spans: Sequence[dict[str, Any]]) -> None:
        self.mentions = sorted((e["start"], e["end"], e.get("type")) for e in spans)

    def parse(self, text: str) -> Any:
        from sphana.documents import split_sentences
        from sphana.entities import Parse

        return Parse(split_sentences(text), list(self.mentions))


def stage_params(manifest: dict[str, Any], stage: str, section: str) -> dict[str, Any]:
    """The params a build stage ran with (the manifest's provenance), e.g. ``ingest``'s
    ``ingest`` section; empty when the release does not record that stage."""
    params = manifest.get("provenance", {}).get("stages", {}).get(stage, {}).get("params", {})
    return dict(params.get(section) or {})


class Decoding:
    """One generation, step by step: iterate for ``(token id, new text)`` pieces as they are
    decoded (a piece is held back while it ends inside a UTF-8 character); afterwards
    ``text``, ``finish_reason`` (``eos``, ``stop``, ``length`` or ``cancelled``) and ``tokens``
    say how it ended. ``cancel()`` (from any thread) stops it at the next step."""

    def __init__(
        self,
        generator: Any,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: Any,
        stop: Sequence[str],
    ) -> None:
        self.generator, self.prompt_ids = generator, prompt_ids
        self.max_new_tokens, self.sampling, self.stop = max_new_tokens, sampling, list(stop)
        self.text, self.finish_reason, self.tokens = "", "length", 0
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self) -> Iterator[tuple[int, str]]:
        gen = self.generator
        eos = set(gen.info["eos_token_ids"])
        out: list[int] = []
        for step in gen.steps([self.prompt_ids], self.max_new_tokens, self.sampling):
            token = int(step[0])
            if self.cancelled:
                self.finish_reason = "cancelled"
                return
            if token in eos:
                self.finish_reason = "eos"
                return
            out.append(token)
            self.tokens = len(out)
            full = gen.tokenizer.decode(out, skip_special_tokens=True)
            hit = min((full.index(s) for s in self.stop if s and s in full), default=None)
            if hit is not None:
                full = full[:hit]
            if not full.endswith("\ufffd") and len(full) > len(self.text):
                piece, self.text = full[len(self.text) :], full
                yield token, piece
            if hit is not None:
                self.text, self.finish_reason = full, "stop"
                return


class Engine:
    """Every component of a loaded release, ready to serve."""

    def __init__(
        self,
        manifest: dict[str, Any],
        root: Path,
        precision: dict[str, str],
        settings: SessionSettings,
    ) -> None:
        self.manifest = manifest
        self.root = root
        self.settings = settings
        self.models: dict[str, Model] = {}
        self.embedder: Embedder | None = None
        self.extractor: RelationExtractor | None = None
        self.generator: Any = None
        self.timings: dict[str, float] = {}
        ingest = stage_params(manifest, "ingest", "ingest")
        self.max_pair_chars = int(ingest.get("max_pair_chars", 400))
        self.parser_name = str(ingest.get("parser", "simple"))
        graph = stage_params(manifest, "build_graphs", "gnn.graph")
        self.max_entities = int(graph.get("max_entities", 8))
        self.index = self._index()
        for name, entry in sorted(manifest["components"].items()):
            start = time.perf_counter()
            config = entry["model_config"]
            wanted = precision.get(name, "int8")
            if wanted == "int4" and config.get("int4_file"):
                rel = (Path(entry["path"]).parent / config["int4_file"]).as_posix()
            elif wanted != "fp32" and config.get("quantized"):  # int4 without one: int8
                rel, wanted = entry["path"], "int8"
            else:
                rel, wanted = config.get("fp32_path", entry["path"]), "fp32"
            path = root / rel
            model = Model(name, entry["version"], wanted, path, config, settings.session(path))
            self.models[name] = model
            if name == "embedding":
                self.embedder = Embedder(model, path.parent)
            elif name == "relation":
                self.extractor = RelationExtractor(model, path.parent)
            elif name == "llm":
                from sphana.generation import OnnxGenerator

                self.generator = OnnxGenerator(path.parent, path.name, session=model.session)
            self.timings[name] = time.perf_counter() - start
            log.info(
                "loaded %s %s (%s, %s) in %.2f s on %s",
                name,
                entry["version"],
                wanted,
                rel,
                self.timings[name],
                model.session.get_providers()[0],
            )

    def _index(self) -> Any:
        """The release's corpus index (:mod:`sphana.index`), None without one; refused unless
        its vectors came from this release's embedding model."""
        entry = self.manifest.get("index")
        if entry is None:
            return None
        from sphana.errors import VerifyError
        from sphana.index import Index

        embedding = self.manifest["components"].get("embedding")
        if embedding is None:
            raise VerifyError(
                "the release has a corpus index but no embedding model to embed queries with; "
                "load the embedding bundle with it"
            )
        start = time.perf_counter()
        index = Index(self.root / Path(entry["path"]).parent)
        index.check_embedding([f["sha256"] for f in embedding["files"]])
        self.timings["index"] = time.perf_counter() - start
        log.info(
            "loaded the corpus index: %d passages in %.2f s", len(index), self.timings["index"]
        )
        return index

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    def warm(self) -> None:
        """Run every session on representative shapes (the first run of a shape is slow)."""
        start = time.perf_counter()
        if self.embedder is not None:
            self.embedder.warm()
        if self.generator is not None:
            self.generator.generate(["Hello"], max_new_tokens=2)
        for name, model in self.models.items():
            if name in ("embedding", "llm"):
                continue
            for feed in _warm_feeds(model):
                model.run(feed)
        if self.parser_name != "simple" and ("relation" in self.models or "gnn" in self.models):
            self.parser()  # fails now, not on the first request, when spaCy is missing
        self.timings["warmup"] = time.perf_counter() - start
        log.info("warmed up in %.2f s", self.timings["warmup"])

    def replay_samples(self) -> list[str]:
        """Replay each component's parity samples (:mod:`sphana.samples`, shipped beside its
        model) on this engine's own sessions; every mismatch, empty when all match. A component
        whose release carries no samples (built before they shipped) is skipped and logged."""
        from sphana import samples

        start = time.perf_counter()
        problems = []
        for name, model in self.models.items():
            entry = self.manifest["components"][name]
            rel = (Path(entry["path"]).parent / samples.FILE_NAME).as_posix()
            if rel not in {f["path"] for f in entry["files"]}:
                log.warning("%s %s: the release has no parity samples", name, model.version)
                continue
            data = json.loads((self.root / rel).read_text(encoding="utf-8"))
            generator = self.generator if name == "llm" else None
            found = samples.replay_on(data, {model.precision: (generator, model.session)})
            problems += [f"{name} {model.version} {p}" for p in found]
        self.timings["parity"] = time.perf_counter() - start
        return problems

    def parser(self) -> Any:
        """The entity parser ``ingest`` used (its params in the manifest's provenance)."""
        if not hasattr(self, "_parser"):
            from sphana.config import ParserName
            from sphana.entities import load_parser

            spacy_model = stage_params(self.manifest, "ingest", "ingest").get("spacy_model", "")
            self._parser = load_parser(ParserName(self.parser_name), spacy_model)
        return self._parser

    def candidates(self, text: str, spans: Sequence[dict[str, Any]] | None = None) -> list[dict]:
        """Entity mentions and candidate pairs per sentence of ``text``, as ``ingest`` finds them
        (:func:`sphana.entities.detect`), or, with ``spans`` (``{"start", "end", "type"?}``),
        every two of those spans that lie in one sentence within ``max_pair_chars``."""
        from sphana.entities import detect

        if spans is not None:
            check_spans(text, spans)
        return detect(text, self.max_pair_chars, self.parser() if spans is None else Spans(spans))

    def relations(self, text: str, spans: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The entities of ``text`` and, for each candidate pair, the label probabilities of
        both readings and the relation it states (the more probable non-``no_relation``
        reading, as the build decides), or ``None``."""
        assert self.extractor is not None
        sentences = self.candidates(text, spans)
        pairs = [p for s in sentences for p in s["pairs"]]
        probs, found = self.extractor.score(pairs)
        labels = self.extractor.labels
        out = []
        for k, (pair, relation) in enumerate(zip(pairs, found, strict=True)):
            forward, backward = probs[k], probs[len(pairs) + k]
            item = {
                "e1": pair["e1"],
                "e2": pair["e2"],
                "scores": {
                    "e1->e2": _by_label(labels, forward),
                    "e2->e1": _by_label(labels, backward),
                },
                "relation": None,
            }
            if relation is not None:
                subject, obj, label = relation
                reverse = subject is pair["e2"]
                item["relation"] = {
                    "subject": subject,
                    "object": obj,
                    "label": label,
                    "score": round(
                        float((backward if reverse else forward)[labels.index(label)]), 6
                    ),
                }
            out.append(item)
        mentions = [m for s in sentences for m in s["mentions"]]
        return {"entities": mentions, "pairs": out}

    def rerank(
        self, query: str, texts: Sequence[str], ranks: Sequence[int] | None = None
    ) -> tuple[list[float], str]:
        """A score per text for ``query`` (higher is better) and what scored it: the graph
        ranker over the candidates' graphs, built as in training (:mod:`sphana.graph_inputs`;
        relation nodes from the relation extractor when the ranker was trained with them), or
        the embedding's cosine similarity when the release has no ranker.

        ``ranks``: each text's rank in the first stage that retrieved it (0 = best), a feature
        of its graph as in training; by default its rank among ``texts`` by cosine."""
        assert self.embedder is not None
        if ranks is not None:
            check_ranks(ranks, len(texts))
        vectors = self.embedder.run([query, *texts])
        query_vec, passage_vecs = vectors[0], vectors[1:]
        cosine = passage_vecs @ query_vec
        if "gnn" not in self.models:
            return [float(c) for c in cosine], "embedding"
        from sphana.graph_inputs import passage

        if ranks is None:
            order = np.argsort(-cosine, kind="stable")
            by_cosine = np.empty(len(texts), dtype=np.int64)
            by_cosine[order] = np.arange(len(texts))
            ranks = by_cosine.tolist()
        pairs = [[p for s in self.candidates(text) for p in s["pairs"]] for text in texts]
        relations: list[Any] = [None] * len(texts)
        if self.ranker_reads_relations:  # every candidate's pairs in one call of the extractor
            assert self.extractor is not None
            found = self.extractor.score([p for ps in pairs for p in ps])[1]
            bounds = np.cumsum([0, *map(len, pairs)])
            relations = [found[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        passages = [
            passage(str(i), text, ps, rs)
            for i, (text, ps, rs) in enumerate(zip(texts, pairs, relations, strict=True))
        ]
        return self.graph_scores(query, query_vec, passages, passage_vecs, ranks), "gnn"

    @property
    def ranker_reads_relations(self) -> bool:
        """Whether the ranker was trained with relation nodes and the release can find them."""
        ranker = self.models.get("gnn")
        return (
            ranker is not None
            and bool(ranker.config.get("relation_nodes"))
            and (self.extractor is not None)
        )

    def graph_scores(
        self,
        query: str,
        query_vec: np.ndarray,
        passages: Sequence[Any],
        passage_vecs: np.ndarray,
        ranks: Sequence[int],
    ) -> list[float]:
        """The ranker's score of each candidate (:class:`sphana.graph_inputs.Passage`) for
        ``query``, its graph built as in training."""
        from sphana.graph_inputs import query_graphs, ranker_inputs

        graphs = query_graphs(
            query,
            passages,
            [int(r) for r in ranks],
            self.embedder.run,
            self.max_entities,
            query_vec=query_vec,
            passage_vecs=passage_vecs,
        )
        return [float(s) for s in self.models["gnn"].run(ranker_inputs(graphs))[0]]

    def decoding(
        self,
        prompt: str,
        *,
        chat: bool = True,
        max_new_tokens: int = 64,
        sampling: Any = None,
        stop: Sequence[str] = (),
    ) -> Decoding:
        """A generation of ``prompt`` (a user turn in the chat template when ``chat``), to run
        by iterating it; greedy unless ``sampling`` (:class:`sphana.generation.Sampling`)."""
        from sphana.generation import Sampling, chat_prompt

        text = chat_prompt(prompt) if chat else prompt
        ids = self.generator.tokenizer.encode(text, add_special_tokens=False).ids
        return Decoding(self.generator, ids, max_new_tokens, sampling or Sampling(), stop)

    def describe(self) -> dict[str, Any]:
        """What ``/info`` says of the release and each model."""
        return {
            "name": self.manifest.get("name"),
            "version": self.version,
            "components": {
                name: {
                    "version": m.version,
                    "precision": m.precision,
                    "file": m.path.relative_to(self.root).as_posix(),
                    "sha256": _listed_sha(self.manifest["components"][name], m.path, self.root),
                    "provider": m.session.get_providers()[0],
                    "inputs": m.inputs,
                    "outputs": m.outputs,
                    "load_seconds": round(self.timings.get(name, 0.0), 3),
                }
                for name, m in self.models.items()
            },
            "skipped_components": self.manifest.get("skipped_components", {}),
            "index": None
            if self.index is None
            else {
                k: self.index.info[k]
                for k in ("passages", "dimension", "search", "embedding")
                if k in self.index.info
            },
        }


def _by_label(labels: list[str], probs: np.ndarray) -> dict[str, float]:
    return {label: round(float(p), 6) for label, p in zip(labels, probs, strict=True)}


def _listed_sha(entry: dict[str, Any], path: Path, root: Path) -> str | None:
    rel = path.relative_to(root).as_posix()
    return next((f["sha256"] for f in entry["files"] if f["path"] == rel), None)


def _warm_feeds(model: Model) -> Iterator[dict[str, np.ndarray]]:
    """Inputs of the shapes a model meets: text models at each warm-up length; the ranker on
    one small graph (its feature width from the session)."""
    names = {i["name"] for i in model.inputs}
    if {"input_ids", "attention_mask"} <= names:
        for n in WARMUP_LENGTHS:
            feed = {"input_ids": np.full((2, n), 1000, dtype=np.int64)}
            feed["attention_mask"] = np.ones((2, n), dtype=np.int64)
            if "token_type_ids" in names:
                feed["token_type_ids"] = np.zeros((2, n), dtype=np.int64)
            yield feed
    elif "node_features" in names:
        width = next(i["shape"][1] for i in model.inputs if i["name"] == "node_features")
        yield {
            "node_features": np.zeros((4, width), dtype=np.float32),
            "edge_index": np.array([[0, 1, 2], [1, 2, 3]], dtype=np.int64),
            "edge_directions": np.zeros(3, dtype=np.int64),
            "readout_index": np.array([0], dtype=np.int64),
        }
