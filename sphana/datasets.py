"""Build datasets from ingested chunks and the gold annotations.

Embedding pairs (``datasets/embedding/``):

- ``train.jsonl``: ``{"query", "positive", "positive_id", "relevant_ids", "doc_id", "kind",
  "query_id"}``: gold question -> each of its relevant passages (``kind: gold``), and for
  passages no gold question covers, self-supervised pairs: "title: heading" -> the section's first
  passage (``heading``) and a sentence -> its passage (``sentence``).
- ``validation.jsonl``: one record per query, ``relevant_ids`` holding every passage that
  contains the evidence: the self-supervised pairs of the validation documents, plus their gold
  questions when the corpus has them.
- ``validation_corpus.jsonl``: every passage of the validation documents, the retrieval pool.
- ``held_out.jsonl``: a share (``dataset.held_out_fraction``) of the training gold questions,
  one record per query like ``validation.jsonl``, that the embedding never trains on (sampled so
  that none shares a relevant passage with a question it trains on): the graph
  ranker trains on them, so it learns from first-stage scores as good as on unseen questions
  (stacking on out-of-fold predictions) rather than from scores the encoder has memorised.
  Without gold questions, the self-supervised pairs (pseudo-queries) of a seeded draw of the
  training passages (the same share) are held out instead.

Relation examples (``datasets/relation/``): ``{train,validation}.jsonl`` with ``{"id", "doc_id",
"text" (the sentence), "entity1"/"entity2": {"text", "start", "end", "type"}, "label"}`` (offsets
index ``text``; ``entity1`` is the subject) from the labelled pairs of ``relations.jsonl``, and
``labels.json`` (the sorted label set); without labelled pairs in both splits, only
``skipped.json`` (the component is not built, and the reason says what to add).

Generator examples (``datasets/llm/``): ``{train,validation}.jsonl`` with ``{"id", "doc_id",
"kind", "prompt", "text"}``: every passage (``kind: passage``, empty prompt), and for each gold
question with an ``answer`` a chat example (``kind: qa``): "Context: <its first relevant
passage>\nQuestion: <question>" -> the answer. Every file is checked against its JSON Schema
(:mod:`sphana.contracts`) before it is written.

The chunks are streamed (read, turned into records and written one at a time), so memory grows
with the number of documents and gold questions, not with the corpus text.

Documents are split, never pairs, with one split for every component: documents that share a
gold question form one group and every group goes wholly to train or to validation, so no
validation passage is seen in training.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sphana import contracts
from sphana.config import DatasetConfig
from sphana.documents import split_sentences
from sphana.errors import InputError
from sphana.generation import qa_prompt
from sphana.io import (
    atomic_dir,
    load_jsonl,
    read_jsonl,
    write_json_atomic,
    write_jsonl,
    write_skipped,
)


def linked_groups(items: Iterable[str], links: Iterable[list[str]]) -> list[list[str]]:
    """``items`` grouped so that the items of every link end up in one group (union-find);
    each group sorted, groups in sorted order."""
    parent = {i: i for i in items}

    def find(i: str) -> str:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for link in links:
        for other in link[1:]:
            parent[find(other)] = find(link[0])
    groups: dict[str, list[str]] = defaultdict(list)
    for i in sorted(parent):
        groups[find(i)].append(i)
    return sorted(groups.values())


def sample_groups(groups: list[list[str]], fraction: float, seed: int) -> set[str]:
    """Whole groups, in a seeded random order, until they hold ``fraction`` of all items."""
    ordered = list(groups)
    random.Random(seed).shuffle(ordered)
    target = fraction * sum(len(g) for g in groups)
    taken: set[str] = set()
    for group in ordered:
        if len(taken) >= target:
            break
        taken.update(group)
    return taken


def split_documents(
    doc_ids: Iterable[str], questions: list[dict], cfg: DatasetConfig
) -> dict[str, str]:
    """Assign each document to ``train`` or ``validation``; question-linked docs stay together."""
    groups = linked_groups(doc_ids, ([r["doc_id"] for r in q["relevant"]] for q in questions))
    validation = sample_groups(groups, cfg.validation_fraction, cfg.seed)
    return {d: "validation" if d in validation else "train" for g in groups for d in g}


def held_out_questions(questions: list[dict], fraction: float, seed: int) -> set[str]:
    """A ``fraction`` of ``questions`` (their ids) such that no held-out question shares a
    relevant passage with a question that is not held out."""
    by_chunk: dict[str, list[str]] = defaultdict(list)
    for q in questions:
        for cid in sorted({cid for r in q["relevant"] for cid in r["chunk_ids"]}):
            by_chunk[cid].append(q["id"])
    groups = linked_groups((q["id"] for q in questions), by_chunk.values())
    return sample_groups(groups, fraction, seed)


@dataclass
class Corpus:
    """The gold questions and the document split shared by every dataset; the chunks are read
    from ``chunks_file`` one at a time (:meth:`chunks`), so memory does not grow with the corpus
    text, only the passages gold questions point to (``contexts``) are kept."""

    chunks_file: Path
    questions: list[dict]
    split: dict[str, str]  # doc_id -> "train" | "validation"
    contexts: dict[str, dict[str, Any]]  # chunk id -> chunk, for chunks gold questions name

    def chunks(self) -> Iterator[dict[str, Any]]:
        for _, chunk in read_jsonl(self.chunks_file):
            yield chunk


def load_corpus(chunks_file: Path, questions_file: Path | None, cfg: DatasetConfig) -> Corpus:
    """The gold questions (``questions_file``: ``ingest``'s resolved ``questions.jsonl``; None or
    empty when the corpus has none) and the document split, from one pass over the chunks."""
    questions = load_jsonl(questions_file) if questions_file is not None else []
    wanted = {cid for q in questions for r in q["relevant"] for cid in r["chunk_ids"]}
    doc_ids: dict[str, None] = {}
    contexts: dict[str, dict[str, Any]] = {}
    for _, chunk in read_jsonl(chunks_file):
        doc_ids[chunk["doc_id"]] = None
        if chunk["id"] in wanted:
            contexts[chunk["id"]] = chunk
    if not doc_ids:
        raise InputError(chunks_file, "no chunks: did ingest read any document?")
    split = split_documents(doc_ids, questions, cfg)
    return Corpus(chunks_file, questions, split, contexts)


def build_embedding(
    chunks_file: Path, questions_file: Path | None, cfg: DatasetConfig, out_dir: Path
) -> dict[str, Any]:
    """Write embedding train/validation pairs and the validation corpus; returns the report."""
    return write_embedding(load_corpus(chunks_file, questions_file, cfg), cfg, out_dir)


def write_embedding(corpus: Corpus, cfg: DatasetConfig, out_dir: Path) -> dict[str, Any]:
    """Stream the embedding datasets: gold records first, then each chunk's self-supervised
    pairs as the chunk is read."""
    questions, split = corpus.questions, corpus.split
    held_out = held_out_questions(
        [q for q in questions if split[q["relevant"][0]["doc_id"]] == "train"],
        cfg.held_out_fraction,
        cfg.seed,
    )
    gold: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "held_out": []}
    covered: set[str] = set()
    for q in questions:
        name = "held_out" if q["id"] in held_out else split[q["relevant"][0]["doc_id"]]
        relevant_ids = sorted({cid for r in q["relevant"] for cid in r["chunk_ids"]})
        covered.update(relevant_ids)  # no self-supervised pair stands in for a gold question
        # train: one pair per relevant passage; validation, held out: one query, its relevant set
        positives = [r["chunk_ids"][0] for r in q["relevant"]]
        for pid in positives if name == "train" else positives[:1]:
            gold[name].append(
                _pair(q["question"], corpus.contexts[pid], relevant_ids, "gold", q["id"])
            )
    # no gold question to hold out: the graph ranker trains on pseudo-queries instead, whole
    # passages' worth of self-supervised pairs that the embedding never trains on
    pseudo = not gold["held_out"]

    names = ("train", "validation", "held_out")
    counts = {name: Counter[str]() for name in names}
    passages = 0
    with contextlib.ExitStack() as stack:
        sinks = {
            name: stack.enter_context(
                contracts.checked_jsonl(out_dir / f"{name}.jsonl", "embedding")
            )
            for name in names
        }
        pool = stack.enter_context(
            contracts.checked_jsonl(out_dir / "validation_corpus.jsonl", "embedding_corpus")
        )
        for name in names:
            for record in gold[name]:
                sinks[name](record)
                counts[name][record["kind"]] += 1
        rng = random.Random(cfg.seed)
        headed: set[tuple[str, int]] = set()  # sections of this document with a heading pair
        for chunk in corpus.chunks():
            if headed and next(iter(headed))[0] != chunk["doc_id"]:
                headed.clear()  # chunks come document by document
            name = split[chunk["doc_id"]]
            if name == "validation":
                pool({"id": chunk["id"], "doc_id": chunk["doc_id"], "text": chunk["text"]})
                passages += 1
            if chunk["id"] in covered:
                continue
            if name == "train" and pseudo and _drawn(cfg.seed, chunk["id"], cfg.held_out_fraction):
                name = "held_out"
            section = (chunk["doc_id"], chunk["section_index"])
            for record in _self_supervised(chunk, section not in headed, cfg, rng):
                sinks[name](record)
                counts[name][record["kind"]] += 1
            headed.add(section)
        if not counts["train"] or not counts["validation"]:
            raise InputError(
                corpus.chunks_file,
                "too few documents to build both a train and a validation "
                "split; add documents or change dataset.validation_fraction",
            )
    val_docs = sum(s == "validation" for s in split.values())
    return {
        "documents": {"train": len(split) - val_docs, "validation": val_docs},
        "pairs": {name: counts[name].total() for name in names},
        "pairs_by_kind": {
            name: {k: counts[name][k] for k in ("gold", "heading", "sentence")} for name in names
        },
        "gold_questions": len(questions),
        "validation_corpus": passages,
    }


def _self_supervised(
    chunk: dict[str, Any], first_in_section: bool, cfg: DatasetConfig, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """A chunk's self-supervised pairs: "title: heading" -> the section's first passage (the
    first one no gold question covers), and sampled sentences -> their passage."""
    if cfg.heading_pairs and first_in_section:
        query = f"{chunk['title']}: {chunk['section']}" if chunk["section"] else chunk["title"]
        yield _pair(query, chunk, [chunk["id"]], "heading", f"{chunk['id']}/h")
    text = chunk["text"]
    sentences = [text[s:e] for s, e in split_sentences(text) if e - s >= cfg.min_sentence_chars]
    for k, sentence in enumerate(
        rng.sample(sentences, min(len(sentences), cfg.sentence_pairs_per_chunk))
    ):
        yield _pair(sentence, chunk, [chunk["id"]], "sentence", f"{chunk['id']}/s{k}")


def _drawn(seed: int, key: str, fraction: float) -> bool:
    """A seeded draw of ``key`` with probability ``fraction``, the same in every run and
    independent of the order keys come in (so a stream can decide at once)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _pair(query: str, chunk: dict, relevant_ids: list[str], kind: str, query_id: str) -> dict:
    return {
        "query_id": query_id,
        "query": query,
        "positive": chunk["text"],
        "positive_id": chunk["id"],
        "relevant_ids": relevant_ids,
        "doc_id": chunk["doc_id"],
        "kind": kind,
    }


def build_relation(
    relations_file: Path,
    split: dict[str, str],
    out_dir: Path,
    gold_file: Path = Path("data/gold/relations.jsonl"),
) -> dict[str, Any]:
    """Write relation train/validation examples (the labelled entity pairs of ``relations.jsonl``,
    one sentence each, offsets relative to it) and ``labels.json``; returns the report. Without
    labelled pairs in both splits the component is skipped (:func:`sphana.io.write_skipped`)
    with a reason that names ``gold_file``, where the labels go."""
    records: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    unlabelled = 0
    for lineno, r in read_jsonl(relations_file):
        if r.get("label") is None:
            unlabelled += 1
            continue
        name = split.get(r["doc_id"])
        if name is None:
            raise InputError(
                relations_file,
                f"document {r['doc_id']!r} is not in chunks.jsonl; rerun ingest",
                lineno,
            )
        records[name].append(
            {"id": r["id"], "doc_id": r["doc_id"], **pair_example(r), "label": r["label"]}
        )
    if not records["train"] or not records["validation"]:
        reason = (
            f"no labelled entity pairs in the {'train' if not records['train'] else 'validation'}"
            " split: the relation extractor learns from gold annotations; add them to "
            f"{gold_file} (one JSON object per line: id, doc_id, section, sentence {{start, end}}"
            ", e1/e2 {text, start, end, type}, label; format in data/README.md), labelling "
            "pairs in documents of both splits"
        )
        write_skipped(out_dir, "relation", reason)
        return {"skipped": reason, "unlabelled_candidates": unlabelled}
    labels = sorted({r["label"] for rs in records.values() for r in rs})
    for name, rs in records.items():
        contracts.check_records(rs, "relation", out_dir / f"{name}.jsonl")
    with atomic_dir(out_dir) as tmp:  # the whole directory: no skipped.json of an earlier run
        for name, rs in records.items():
            write_jsonl(tmp / f"{name}.jsonl", rs)
        write_json_atomic(tmp / "labels.json", {"labels": labels})
    return {
        "examples": {name: len(rs) for name, rs in records.items()},
        "by_label": {
            name: {label: sum(r["label"] == label for r in rs) for label in labels}
            for name, rs in records.items()
        },
        "unlabelled_candidates": unlabelled,
    }


def pair_example(row: dict[str, Any]) -> dict[str, Any]:
    """A ``relations.jsonl`` candidate pair as the classifier reads it: its sentence as ``text``,
    ``entity1``/``entity2`` with offsets relative to the sentence."""
    offset = row["sentence"]["start"]
    return {
        "text": row["sentence"]["text"],
        **{
            key: {**e, "start": e["start"] - offset, "end": e["end"] - offset}
            for key, e in (("entity1", row["e1"]), ("entity2", row["e2"]))
        },
    }


def build_llm(corpus: Corpus, out_dir: Path) -> dict[str, Any]:
    """Write llm train/validation examples: every passage (language modelling) and, for each gold
    question with an ``answer``, a chat example: the question with its first relevant passage as
    context -> the answer. Split by the shared document split; returns the report."""
    names = ("train", "validation")
    counts = {name: Counter[str]() for name in names}
    without_answer = 0
    with contextlib.ExitStack() as stack:
        sinks = {
            name: stack.enter_context(contracts.checked_jsonl(out_dir / f"{name}.jsonl", "llm"))
            for name in names
        }
        for c in corpus.chunks():
            name = corpus.split[c["doc_id"]]
            sinks[name](
                {
                    "id": c["id"],
                    "doc_id": c["doc_id"],
                    "kind": "passage",
                    "prompt": "",
                    "text": c["text"],
                }
            )
            counts[name]["passage"] += 1
        for q in corpus.questions:
            if q["answer"] is None:
                without_answer += 1
                continue
            context = corpus.contexts[q["relevant"][0]["chunk_ids"][0]]
            name = corpus.split[context["doc_id"]]
            sinks[name](
                {
                    "id": q["id"],
                    "doc_id": context["doc_id"],
                    "kind": "qa",
                    "prompt": qa_prompt(context["text"], q["question"]),
                    "text": q["answer"],
                }
            )
            counts[name]["qa"] += 1
    return {
        "examples": {name: {k: counts[name][k] for k in ("passage", "qa")} for name in names},
        "questions_without_answer": without_answer,
    }


def run(
    cfg: DatasetConfig, ingest_dir: Path, gold_dir: Path, out_dir: Path, report_file: Path
) -> dict[str, Any]:
    """Every dataset from ``ingest``'s outputs (``gold_dir`` only names where labels go)."""
    corpus = load_corpus(ingest_dir / "chunks.jsonl", ingest_dir / "questions.jsonl", cfg)
    report = {
        "embedding": write_embedding(corpus, cfg, out_dir / "embedding"),
        "relation": build_relation(
            ingest_dir / "relations.jsonl",
            corpus.split,
            out_dir / "relation",
            gold_dir / "relations.jsonl",
        ),
        "llm": build_llm(corpus, out_dir / "llm"),
    }
    write_json_atomic(report_file, report)
    return report
