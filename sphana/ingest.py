"""Ingest: read documents, normalize text, split sections into token-aware overlapping chunks.

Document formats (under ``paths.documents``; ids are the relative path without extension unless
a JSON document carries an ``id``):

- ``.md``: ``# Title`` line, then ``## Heading`` sections (``##``-``######``).
- ``.txt``: first non-blank line is the title, then ``== Heading ==`` sections.
- ``.json``: ``{"id", "title", "sections": [{"heading", "text"}]}`` (or ``"text"`` for one section).
- ``.jsonl``: one such object per line.

Text before the first heading becomes a section with an empty heading. Character offsets of
chunks (and of gold annotations) index the *normalized* section text.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sphana.config import IngestConfig, OnError
from sphana.errors import InputError

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_TXT_HEADING = re.compile(r"^==+\s*(.*?)\s*==+\s*$")
# A sentence ends at . ! or ? (optionally followed by a closing quote/bracket) before whitespace
# and an upper-case letter, digit or opening quote/bracket, or at a paragraph break.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])|\n\n+")


@dataclass
class Section:
    heading: str
    text: str


@dataclass
class Document:
    id: str
    title: str
    sections: list[Section]
    source: str  # file path, relative to the documents root
    line: int | None = None  # line in a .jsonl file


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


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode-normalize and tidy whitespace, keeping paragraph breaks.

    Lines inside a paragraph are joined with a space; paragraphs are separated by one blank line.
    """
    text = unicodedata.normalize(form, text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [_SPACES.sub(" ", line).strip() for line in block.split("\n")]
        paragraph = " ".join(line for line in lines if line)
        if paragraph:
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text`` (no surrounding whitespace)."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.start() + len(m.group(0).rstrip()) if m.group(0).strip() else m.start()
        if end > start:
            spans.append((start, end))
        start = m.end()
    if start < len(text.rstrip()):
        spans.append((start, len(text.rstrip())))
    return spans


# --- readers -----------------------------------------------------------------------------------


def _split_sections(lines: list[str], heading_re: re.Pattern[str]) -> list[Section]:
    sections = [Section("", "")]
    bodies: list[list[str]] = [[]]
    for line in lines:
        m = heading_re.match(line)
        if m:
            sections.append(Section(m.group(m.lastindex or 1), ""))
            bodies.append([])
        else:
            bodies[-1].append(line)
    for section, body in zip(sections, bodies, strict=True):
        section.text = "\n".join(body)
    return sections


def _title_line(lines: list[str], path: Path) -> int:
    title_at = next((i for i, line in enumerate(lines) if line.strip()), None)
    if title_at is None:
        raise InputError(path, "empty document")
    return title_at


def _read_markdown(path: Path, rel: str) -> Iterator[Document]:
    lines = path.read_text(encoding="utf-8").splitlines()
    at = _title_line(lines, path)
    m = _MD_HEADING.match(lines[at])
    if not m or len(m.group(1)) != 1:
        raise InputError(path, "a Markdown document must start with a '# Title' line", at + 1)
    yield Document(rel, m.group(2), _split_sections(lines[at + 1 :], _MD_HEADING), str(path))


def _read_text(path: Path, rel: str) -> Iterator[Document]:
    lines = path.read_text(encoding="utf-8").splitlines()
    at = _title_line(lines, path)
    if _TXT_HEADING.match(lines[at]):
        raise InputError(path, "the first line of a .txt document must be its title", at + 1)
    yield Document(rel, lines[at], _split_sections(lines[at + 1 :], _TXT_HEADING), str(path))


def _from_json_object(obj: Any, path: Path, default_id: str, line: int | None) -> Document:
    if not isinstance(obj, dict):
        raise InputError(path, "expected a JSON object with 'title' and 'sections'", line)
    title = obj.get("title")
    if not isinstance(title, str) or not title.strip():
        raise InputError(path, "missing or empty string field 'title'", line)
    if "sections" in obj:
        if not isinstance(obj["sections"], list):
            raise InputError(path, "'sections' must be a list of {heading, text}", line)
        sections = []
        for i, section in enumerate(obj["sections"]):
            if not isinstance(section, dict) or not isinstance(section.get("text"), str):
                raise InputError(path, f"sections[{i}] needs a string field 'text'", line)
            if not isinstance(section.get("heading", ""), str):
                raise InputError(path, f"sections[{i}].heading must be a string", line)
            sections.append(Section(section.get("heading", ""), section["text"]))
    elif isinstance(obj.get("text"), str):
        sections = [Section("", obj["text"])]
    else:
        raise InputError(path, "needs 'sections' (list of {heading, text}) or 'text'", line)
    doc_id = obj.get("id", default_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise InputError(path, "'id' must be a non-empty string", line)
    return Document(doc_id, title, sections, str(path), line)


def _read_json(path: Path, rel: str) -> Iterator[Document]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON ({e.msg})", e.lineno) from None
    yield _from_json_object(obj, path, rel, None)


def _read_jsonl(path: Path, rel: str) -> Iterator[Document | InputError]:
    """Documents, and the errors of single lines, so that ``skip`` skips only those lines."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield _from_json_object(json.loads(line), path, f"{rel}:{lineno}", lineno)
            except json.JSONDecodeError as e:
                yield InputError(path, f"invalid JSON ({e.msg} at column {e.colno})", lineno)
            except InputError as e:
                yield e


_READERS = {".md": _read_markdown, ".txt": _read_text, ".json": _read_json, ".jsonl": _read_jsonl}


def _normalized(doc: Document, form: str, seen: dict[str, str]) -> Document:
    """Normalize a document's text and check it; raises InputError for an unusable one."""
    doc.title = normalize(doc.title, form)
    sections = [Section(normalize(s.heading, form), normalize(s.text, form)) for s in doc.sections]
    doc.sections = [s for s in sections if s.text]
    if not doc.sections:
        raise InputError(doc.source, f"document {doc.id!r} has no text", doc.line)
    headings = [s.heading for s in doc.sections]
    dup = next((h for h in headings if headings.count(h) > 1), None)
    if dup is not None:
        raise InputError(
            doc.source, f"document {doc.id!r} repeats section heading {dup!r}", doc.line
        )
    if doc.id in seen:
        raise InputError(
            doc.source, f"duplicate document id {doc.id!r} (first in {seen[doc.id]})", doc.line
        )
    seen[doc.id] = doc.source if doc.line is None else f"{doc.source}:{doc.line}"
    return doc


def read_documents(root: Path, cfg: IngestConfig, report: dict[str, Any]) -> list[Document]:
    """Read every supported file under ``root`` in sorted order (deterministic runs).

    Files with other extensions are listed in ``report["ignored_files"]``. A bad document raises
    :class:`InputError` naming file and line or, with ``on_error: skip``, is listed in
    ``report["skipped"]`` with the reason.
    """
    if not root.is_dir():
        raise InputError(root, "documents directory not found; set paths.documents")
    docs: list[Document] = []
    seen: dict[str, str] = {}
    formats: Counter[str] = Counter()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel_path = path.relative_to(root)
        if any(part.startswith(".") for part in rel_path.parts):
            continue
        suffix = path.suffix.lower()
        if suffix not in cfg.extensions:
            report["ignored_files"].append(rel_path.as_posix())
            continue
        items: list[Document | InputError] = []
        try:
            items.extend(_READERS[suffix](path, rel_path.with_suffix("").as_posix()))
        except UnicodeDecodeError as e:
            items.append(InputError(path, f"not UTF-8 text ({e.reason} at byte {e.start})"))
        except InputError as e:
            items.append(e)
        for item in items:
            try:
                if isinstance(item, InputError):
                    raise item
                docs.append(_normalized(item, cfg.unicode_form, seen))
                formats[suffix] += 1
            except InputError as e:
                if cfg.on_error == OnError.fail:
                    raise InputError(
                        e.path,
                        f"{e.reason}; fix it, or set ingest.on_error=skip to skip bad documents",
                        e.line,
                    ) from None
                report["skipped"].append({"file": e.path, "line": e.line, "reason": e.reason})
    report["documents"] = len(docs)
    report["by_format"] = dict(sorted(formats.items()))
    return docs


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


def chunk_documents(docs: list[Document], tokenizer: Any, cfg: IngestConfig) -> Iterator[Chunk]:
    for doc in docs:
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


def run(
    cfg: IngestConfig, documents_dir: Path, out_dir: Path, gold_relations: Path | None = None
) -> dict[str, Any]:
    """Ingest ``documents_dir`` into ``out_dir``: ``chunks.jsonl``, ``relations.jsonl`` (candidate
    entity pairs, joined with the gold annotations in ``gold_relations`` when that file exists)
    and ``report.json``, which is returned."""
    from sphana import contracts, entities
    from sphana.base_models import load_fast_tokenizer
    from sphana.io import write_json_atomic, write_jsonl

    report: dict[str, Any] = {"skipped": [], "ignored_files": []}
    docs = read_documents(documents_dir, cfg, report)
    if not docs:
        raise InputError(documents_dir, "no documents found; check paths.documents and extensions")
    tokenizer = load_fast_tokenizer(cfg.tokenizer, "ingest.tokenizer")
    chunks = [asdict(c) for c in chunk_documents(docs, tokenizer, cfg)]

    gold = entities.read_gold_file(gold_relations, docs, cfg.on_error) if gold_relations else None
    if gold is not None:
        report["skipped"].extend(gold.skipped)
    parser = entities.load_parser(cfg.parser, cfg.spacy_model)
    cache = entities.ParseCache(out_dir / "parse_cache", parser.version, cfg.parse_cache)
    extraction = entities.extract(docs, parser, cache, gold, cfg.max_pair_chars)

    contracts.check_records(chunks, "chunks", out_dir / "chunks.jsonl")
    contracts.check_records(extraction.records, "relations", out_dir / "relations.jsonl")
    write_jsonl(out_dir / "chunks.jsonl", chunks)
    write_jsonl(out_dir / "relations.jsonl", extraction.records)
    cache.save()
    tokens = sorted(c["n_tokens"] for c in chunks)
    report.update(
        sections=sum(len(d.sections) for d in docs),
        chunks=len(chunks),
        tokens_per_chunk={
            "mean": round(sum(tokens) / len(tokens), 2),
            "p50": tokens[len(tokens) // 2],
            "max": tokens[-1],
        },
        relations=extraction.report,
        skipped_count=len(report["skipped"]),
        ignored_count=len(report["ignored_files"]),
    )
    write_json_atomic(out_dir / "report.json", report)
    return report
