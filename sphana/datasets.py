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
  Without gold questions, the same share of the training self-supervised pairs (whole passages'
  worth: pseudo-queries) is held out instead.

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

Documents are split, never pairs, with one split for every component: documents that share a
gold question form one group and every group goes wholly to train or to validation, so no
validation passage is seen in training.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sphana.config import DatasetConfig
from sphana.documents import split_sentences
from sphana.errors import InputError
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
    """Ingested chunks, resolved gold questions and the document split shared by every dataset."""

    chunks_file: Path
    chunks: list[dict[str, Any]]
    questions: list[dict]
    split: dict[str, str]  # doc_id -> "train" | "validation"


def load_corpus(chunks_file: Path, questions_file: Path | None, cfg: DatasetConfig) -> Corpus:
    """The ingested chunks and gold questions (``questions_file``: ``ingest``'s resolved
    ``questions.jsonl``; None or empty when the corpus has none) with the document split."""
    chunks = [c for _, c in read_jsonl(chunks_file)]
    if not chunks:
        raise InputError(chunks_file, "no chunks: did ingest read any document?")
    questions = load_jsonl(questions_file) if questions_file is not None else []
    doc_ids = dict.fromkeys(c["doc_id"] for c in chunks)
    return Corpus(chunks_file, chunks, questions, split_documents(doc_ids, questions, cfg))


def build_embedding(
    chunks_file: Path, questions_file: Path | None, cfg: DatasetConfig, out_dir: Path
) -> dict[str, Any]:
    """Write embedding train/validation pairs and the validation corpus; returns the report."""
    return write_embedding(load_corpus(chunks_file, questions_file, cfg), cfg, out_dir)


def write_embedding(corpus: Corpus, cfg: DatasetConfig, out_dir: Path) -> dict[str, Any]:
    chunks, questions, split = corpus.chunks, corpus.questions, corpus.split
    by_id = {c["id"]: c for c in chunks}
    rng = random.Random(cfg.seed)

    held_out = held_out_questions(
        [q for q in questions if split[q["relevant"][0]["doc_id"]] == "train"],
        cfg.held_out_fraction,
        cfg.seed,
    )
    records: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "held_out": []}
    covered: set[str] = set()
    for q in questions:
        name = "held_out" if q["id"] in held_out else split[q["relevant"][0]["doc_id"]]
        relevant_ids = sorted({cid for r in q["relevant"] for cid in r["chunk_ids"]})
        covered.update(relevant_ids)  # no self-supervised pair stands in for a gold question
        # train: one pair per relevant passage; validation, held out: one query, its relevant set
        positives = [r["chunk_ids"][0] for r in q["relevant"]]
        for pid in positives if name == "train" else positives[:1]:
            records[name].append(_pair(q["question"], by_id[pid], relevant_ids, "gold", q["id"]))

    self_supervised: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    first_of_section: set[tuple[str, int]] = set()
    for c in chunks:
        if c["id"] in covered:
            continue
        name = split[c["doc_id"]]
        key = (c["doc_id"], c["section_index"])
        if cfg.heading_pairs and key not in first_of_section:
            first_of_section.add(key)
            query = f"{c['title']}: {c['section']}" if c["section"] else c["title"]
            self_supervised[name].append(_pair(query, c, [c["id"]], "heading", f"{c['id']}/h"))
        sentences = [
            c["text"][s:e] for s, e in split_sentences(c["text"]) if e - s >= cfg.min_sentence_chars
        ]
        for k, sentence in enumerate(
            rng.sample(sentences, min(len(sentences), cfg.sentence_pairs_per_chunk))
        ):
            self_supervised[name].append(
                _pair(sentence, c, [c["id"]], "sentence", f"{c['id']}/s{k}")
            )

    if not records["held_out"]:
        # no gold question to hold out: the graph ranker trains on pseudo-queries instead, whole
        # passages' worth of self-supervised pairs that the embedding never trains on
        pseudo = sample_groups(
            linked_groups(
                (r["query_id"] for r in self_supervised["train"]),
                _by_passage(self_supervised["train"]),
            ),
            cfg.held_out_fraction,
            cfg.seed,
        )
        records["held_out"] = [r for r in self_supervised["train"] if r["query_id"] in pseudo]
        self_supervised["train"] = [
            r for r in self_supervised["train"] if r["query_id"] not in pseudo
        ]
    records["train"].extend(self_supervised["train"])
    # validation: held-out documents' self-supervised pairs; their gold questions add to them
    records["validation"].extend(self_supervised["validation"])
    if not records["train"] or not records["validation"]:
        raise InputError(
            corpus.chunks_file,
            "too few documents to build both a train and a validation "
            "split; add documents or change dataset.validation_fraction",
        )
    val_docs = {d for d, s in split.items() if s == "validation"}
    passages = [
        {"id": c["id"], "doc_id": c["doc_id"], "text": c["text"]}
        for c in chunks
        if c["doc_id"] in val_docs
    ]

    leaked = {r["doc_id"] for r in records["train"]} & val_docs
    if leaked:  # cannot happen by construction; never write a leaking split if it does
        raise AssertionError(f"validation documents leaked into training: {sorted(leaked)[:5]}")
    counts = {name: len(rs) for name, rs in records.items()}
    _write(out_dir / "train.jsonl", records["train"], "embedding")
    _write(out_dir / "validation.jsonl", records["validation"], "embedding")
    _write(out_dir / "validation_corpus.jsonl", passages, "embedding_corpus")
    _write(out_dir / "held_out.jsonl", records["held_out"], "embedding")
    return {
        "documents": {"train": len(split) - len(val_docs), "validation": len(val_docs)},
        "pairs": counts,
        "pairs_by_kind": {
            name: {k: sum(r["kind"] == k for r in rs) for k in ("gold", "heading", "sentence")}
            for name, rs in records.items()
        },
        "gold_questions": len(questions),
        "validation_corpus": len(passages),
    }


def _by_passage(pairs: list[dict[str, Any]]) -> list[list[str]]:
    """Query ids of ``pairs`` grouped by their positive passage."""
    groups: dict[str, list[str]] = defaultdict(list)
    for r in pairs:
        groups[r["positive_id"]].append(r["query_id"])
    return list(groups.values())


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
    from sphana import contracts

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
    by_id = {c["id"]: c for c in corpus.chunks}
    records: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for c in corpus.chunks:
        records[corpus.split[c["doc_id"]]].append(
            {
                "id": c["id"],
                "doc_id": c["doc_id"],
                "kind": "passage",
                "prompt": "",
                "text": c["text"],
            }
        )
    without_answer = 0
    for q in corpus.questions:
        if q["answer"] is None:
            without_answer += 1
            continue
        context = by_id[q["relevant"][0]["chunk_ids"][0]]
        records[corpus.split[context["doc_id"]]].append(
            {
                "id": q["id"],
                "doc_id": context["doc_id"],
                "kind": "qa",
                "prompt": qa_prompt(context["text"], q["question"]),
                "text": q["answer"],
            }
        )
    for name, rs in records.items():
        _write(out_dir / f"{name}.jsonl", rs, "llm")
    return {
        "examples": {
            name: {k: sum(r["kind"] == k for r in rs) for k in ("passage", "qa")}
            for name, rs in records.items()
        },
        "questions_without_answer": without_answer,
    }


def qa_prompt(context: str, question: str) -> str:
    """The user turn of a question-answer example (the generator answers from the context)."""
    return f"Context: {context}\nQuestion: {question}"


def _write(path: Path, records: list[dict[str, Any]], kind: str) -> None:
    """Check ``records`` against the ``kind`` schema, then write them (atomically)."""
    from sphana import contracts

    contracts.check_records(records, kind, path)
    write_jsonl(path, records)


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
