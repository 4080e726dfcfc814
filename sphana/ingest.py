"""Ingest: read the documents (:mod:`sphana.documents`), split their sections into token-aware
overlapping chunks, find the candidate entity pairs (:mod:`sphana.entities`) and resolve the gold
questions (:mod:`sphana.gold`).

:func:`run` streams: one document at a time is read, chunked, parsed and written.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from sphana.config import IngestConfig
from sphana.documents import Document, iter_documents, split_sentences
from sphana.errors import InputError


@dataclass
class Chunk:
    id: str
    doc_id: str
    title: str
    section: str
    section_index: int
    start: int  # character offsets into the normalized section text
    end: int
    n_tokens: int
    text: str
    source: str


# --- chunking ----------------------------------------------------------------------------------


def chunk_section(
    text: str, tokenizer: Any, chunk_tokens: int, overlap_tokens: int
) -> list[tuple[int, int, int]]:
    """Split ``text`` into ``(start, end, n_tokens)`` windows of whole sentences.

    Sentences are packed greedily up to ``chunk_tokens`` tokens; each next chunk starts with the
    trailing sentences of the previous one that fit in ``overlap_tokens``. A sentence longer than
    ``chunk_tokens`` is cut into token windows (with the same overlap) at token boundaries.
    """
    units: list[tuple[int, int, int]] = []  # (start, end, n_tokens) of sentences or pieces
    spans = split_sentences(text)
    encodings = tokenizer.encode_batch([text[s:e] for s, e in spans], add_special_tokens=False)
    for (s, _e), enc in zip(spans, encodings, strict=True):
        offsets = enc.offsets
        if len(offsets) <= chunk_tokens:
            units.append((s, _e, len(offsets)))
            continue
        step = chunk_tokens - overlap_tokens
        for i in range(0, len(offsets), step):
            window = offsets[i : i + chunk_tokens]
            units.append((s + window[0][0], s + window[-1][1], len(window)))
            if i + chunk_tokens >= len(offsets):
                break

    chunks: list[tuple[int, int, int]] = []
    i = 0
    while i < len(units):
        j, total = i, 0
        while j < len(units) and total + units[j][2] <= chunk_tokens:
            total += units[j][2]
            j += 1
        j = max(j, i + 1)
        chunks.append((units[i][0], units[j - 1][1], sum(u[2] for u in units[i:j])))
        if j >= len(units):
            break
        # Start the next chunk with the trailing units that fit in the overlap budget,
        # but always move forward by at least one unit.
        k, carried = j, 0
        while k - 1 > i and carried + units[k - 1][2] <= overlap_tokens:
            carried += units[k - 1][2]
            k -= 1
        i = k
    return chunks


def chunk_document(doc: Document, tokenizer: Any, cfg: IngestConfig) -> Iterator[Chunk]:
    """The chunks of one document, ids ``<doc id>#<n>`` in reading order."""
    n = 0
    for index, section in enumerate(doc.sections):
        if not section.text:
            continue
        for start, end, n_tokens in chunk_section(
            section.text, tokenizer, cfg.chunk_tokens, cfg.overlap_tokens
        ):
            yield Chunk(
                id=f"{doc.id}#{n}",
                doc_id=doc.id,
                title=doc.title,
                section=section.heading,
                section_index=index,
                start=start,
                end=end,
                n_tokens=n_tokens,
                text=section.text[start:end],
                source=doc.source,
            )
            n += 1


def chunk_documents(docs: Iterable[Document], tokenizer: Any, cfg: IngestConfig) -> Iterator[Chunk]:
    for doc in docs:
        yield from chunk_document(doc, tokenizer, cfg)


# --- run ---------------------------------------------------------------------------------------


class _ContractWriter:
    """Writes records of one contract kind as JSON Lines, checking them one batch (document) at
    a time with their line numbers in the file; ids that must be unique are checked across
    batches with the set of ids alone."""

    def __init__(self, f: IO[str], kind: str, path: Path) -> None:
        from sphana import contracts

        self.f, self.kind, self.path = f, kind, path
        self.lines = 0
        self.ids: set[str] | None = set() if kind in contracts.UNIQUE_ID_KINDS else None

    def write(self, records: list[dict[str, Any]]) -> None:
        from sphana import contracts

        first = self.lines + 1
        found = contracts.violations(enumerate(records, start=first), self.kind)
        if self.ids is not None:
            batch_ids = [r.get("id") for r in records]
            found += [
                contracts.Violation(first + i, "$.id", f"duplicate id {key!r} (an earlier line)")
                for i, key in enumerate(batch_ids)
                if key in self.ids
            ]
            self.ids.update(k for k in batch_ids if isinstance(k, str))
        if found:
            listed = "\n".join(f"  {v}" for v in found[: contracts.MAX_LISTED])
            more = len(found) - contracts.MAX_LISTED
            raise InputError(
                self.path,
                f"refusing to write records: {len(found)} violation(s) of the {self.kind} schema "
                "(a bug in the code that produces this file, please report it):\n"
                f"{listed}" + (f"\n  ... and {more} more" if more > 0 else ""),
            )
        for record in records:
            self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.lines += len(records)


def _question_doc_ids(path: Path | None) -> set[str] | None:
    """The documents gold questions name (None without questions): the only ones whose chunk
    positions ``run`` keeps to resolve them. Malformed lines are left to the resolver."""
    from sphana.io import read_jsonl

    if path is None or not path.is_file():
        return None
    ids: set[str] = set()
    with contextlib.suppress(InputError):
        for _, q in read_jsonl(path):
            relevant = q.get("relevant")
            for rel in relevant if isinstance(relevant, list) else []:
                if isinstance(rel, dict) and isinstance(rel.get("doc_id"), str):
                    ids.add(rel["doc_id"])
    return ids


def _percentile_50(counts: Counter[int]) -> int:
    """``sorted(values)[len(values) // 2]`` from the counts of the values."""
    rank, seen = sum(counts.values()) // 2, 0
    for value in sorted(counts):
        seen += counts[value]
        if seen > rank:
            return value
    raise ValueError("no values")


def run(
    cfg: IngestConfig, documents_dir: Path, out_dir: Path, gold_dir: Path | None = None
) -> dict[str, Any]:
    """Ingest ``documents_dir`` into ``out_dir``: ``chunks.jsonl``, ``relations.jsonl`` (candidate
    entity pairs, joined with ``<gold_dir>/relations.jsonl`` when it exists), ``questions.jsonl``
    (``<gold_dir>/questions.jsonl`` resolved to chunks; empty without it) and ``report.json``,
    which is returned. Gold annotations are optional, per kind: ``report["gold"]`` says which
    the corpus has (``sphana.datasets`` derives the training signal of the others).

    Streams: one document at a time is read, chunked, parsed and appended to temporary files
    beside the outputs, which replace the outputs together at the end (on an error, neither).
    Memory holds the largest document, not the corpus (plus ids, the gold annotations and the
    chunk positions of the documents gold questions name).
    """
    from sphana import entities, gold
    from sphana.base_models import load_fast_tokenizer
    from sphana.io import atomic_path, write_json_atomic

    report: dict[str, Any] = {"skipped": [], "ignored_files": [], "ignored_by_extension": {}}
    if not documents_dir.is_dir():
        raise InputError(documents_dir, "documents directory not found; set paths.documents")
    tokenizer = load_fast_tokenizer(cfg.tokenizer, "ingest.tokenizer")
    relations_file = gold_dir / "relations.jsonl" if gold_dir else None
    questions_file = gold_dir / "questions.jsonl" if gold_dir else None
    gold_relations = (
        entities.GoldReader(relations_file, cfg.on_error)
        if relations_file is not None and relations_file.is_file()
        else None
    )
    question_docs = _question_doc_ids(questions_file)
    positions: list[dict[str, Any]] = []  # chunks of the documents questions name, without text
    parser = entities.load_parser(cfg.parser, cfg.spacy_model)
    cache = entities.ParseCache(out_dir / "parse_cache", parser.version, cfg.parse_cache)
    extractor = entities.Extractor(parser, cache, cfg.max_pair_chars)
    sections = 0
    tokens: Counter[int] = Counter()
    try:
        with contextlib.ExitStack() as stack:
            tmp = {
                name: stack.enter_context(atomic_path(out_dir / name))
                for name in ("chunks.jsonl", "relations.jsonl", "questions.jsonl")
            }
            files = {
                name: stack.enter_context(open(path, "w", encoding="utf-8"))
                for name, path in tmp.items()
            }
            chunks_out = _ContractWriter(files["chunks.jsonl"], "chunks", out_dir / "chunks.jsonl")
            relations_out = _ContractWriter(
                files["relations.jsonl"], "relations", out_dir / "relations.jsonl"
            )
            for doc in iter_documents(documents_dir, cfg, report):
                chunks = [asdict(c) for c in chunk_document(doc, tokenizer, cfg)]
                chunks_out.write(chunks)
                tokens.update(c["n_tokens"] for c in chunks)
                sections += len(doc.sections)
                if question_docs is not None and doc.id in question_docs:
                    positions += [{k: c[k] for k in _POSITION_KEYS} for c in chunks]
                doc_gold = gold_relations.document(doc) if gold_relations else None
                relations_out.write(extractor.document(doc, doc_gold))
            if not report["documents"]:
                raise InputError(
                    documents_dir, "no documents found; check paths.documents and ingest.extensions"
                )
            if gold_relations is not None:
                report["skipped"].extend(gold_relations.finish())
            questions = (
                gold.resolve_questions(questions_file, gold.chunk_index(positions))
                if question_docs is not None and questions_file is not None
                else []
            )
            for question in questions:
                files["questions.jsonl"].write(json.dumps(question, ensure_ascii=False) + "\n")
            for f in files.values():  # durable before any of them replaces its output
                f.flush()
                os.fsync(f.fileno())
    finally:
        cache.save()  # parses done before an error are kept: a rerun does not redo them
    relations = extractor.report()
    report.update(
        sections=sections,
        chunks=chunks_out.lines,
        tokens_per_chunk={
            "mean": round(sum(n * k for n, k in tokens.items()) / chunks_out.lines, 2),
            "p50": _percentile_50(tokens),
            "max": max(tokens),
        },
        relations=relations,
        gold=gold.summary(questions_file, questions, relations_file, relations),
        skipped_count=len(report["skipped"]),
        ignored_count=len(report["ignored_files"]),
    )
    write_json_atomic(out_dir / "report.json", report)
    return report


_POSITION_KEYS = ("id", "doc_id", "section", "start", "end")  # what gold.chunk_index needs
