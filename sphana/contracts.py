"""Data contracts: one JSON Schema per kind of record the pipeline writes, plus the checks that a
schema cannot express (span order, offsets that must select the entity text, unique ids, edges
that name existing nodes).

- :func:`validate_file` checks a JSON Lines file (or the manifest) and returns every violation;
  ``sphana validate FILE --type KIND`` prints them.
- :func:`check_records` and :func:`checked_jsonl` (streaming) are for writers: they raise before
  a malformed file is written.
- :func:`stats` summarises a JSON Lines file (label/kind counts, text lengths);
  ``sphana stats FILE``.

The schemas live in ``sphana/schemas/<kind>.schema.json`` (draft 2020-12).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sphana.errors import ConfigError, InputError
from sphana.io import atomic_path, read_jsonl

SCHEMA_DIR = Path(__file__).parent / "schemas"
KINDS: dict[str, str] = {
    "chunks": "chunks.schema.json",  # target/ingest/chunks.jsonl
    "relations": "relations.schema.json",  # target/ingest/relations.jsonl
    "embedding": "embedding.schema.json",  # datasets/embedding/{train,validation}.jsonl
    "embedding_corpus": "embedding_corpus.schema.json",  # datasets/embedding/validation_corpus
    "relation": "relation.schema.json",  # datasets/relation/{train,validation}.jsonl
    "gnn": "gnn.schema.json",  # datasets/gnn/{train,validation}.jsonl
    "llm": "llm.schema.json",  # datasets/llm/{train,validation}.jsonl
    "manifest": "manifest.schema.json",  # one JSON document, not JSON Lines
}
DOCUMENT_KINDS = frozenset({"manifest"})  # validated as a whole file
UNIQUE_ID_KINDS = frozenset({"chunks", "embedding_corpus"})
DISTRIBUTION_FIELDS = ("label", "kind")
LENGTH_FIELDS = ("text", "query", "positive", "prompt")
MAX_LISTED = 10  # violations quoted by check_records


@functools.cache
def schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of ``kind``.

    Raises:
        ConfigError: for an unknown kind, listing the known ones.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown record kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return json.loads((SCHEMA_DIR / KINDS[kind]).read_text(encoding="utf-8"))


@functools.cache
def _validator(kind: str) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(schema(kind))


@functools.cache
def _fast_check(kind: str) -> Any:
    """The ``kind`` schema compiled to Python by fastjsonschema: ~25x faster than jsonschema on
    a valid record (ingest checks every chunk and candidate pair it writes). It only says
    whether a record is valid; jsonschema names the errors of one that is not."""
    import fastjsonschema

    rules = {k: v for k, v in schema(kind).items() if k != "$schema"}  # it knows up to draft 7
    return fastjsonschema.compile(rules)


@dataclass(frozen=True)
class Violation:
    """One way a record breaks its contract."""

    line: int | None  # 1-based line in the file; None for a whole-document kind
    path: str  # JSON path inside the record, e.g. ``$.entity1.start``
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.path}: {self.message}"


def _json_path(parts: Iterable[str | int]) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


# Semantic checks, run on records that already match the schema. Each yields (path, message).
Problems = Iterator[tuple[str, str]]


def _span_order(path: str, span: dict[str, Any]) -> Problems:
    if span["end"] < span["start"]:
        yield f"{path}.end", f"end {span['end']} is before start {span['start']}"


def _check_chunks(record: dict[str, Any]) -> Problems:
    yield from _span_order("$", record)


def _check_relations(record: dict[str, Any]) -> Problems:
    sentence = record["sentence"]
    s0, s1, text = sentence["start"], sentence["end"], sentence["text"]
    if s1 < s0:
        yield from _span_order("$.sentence", sentence)
    elif s1 - s0 != len(text):
        yield "$.sentence.text", f"{len(text)} characters but the span [{s0}, {s1}) has {s1 - s0}"
    for name in ("e1", "e2"):
        entity, path = record[name], f"$.{name}"
        start, end = entity["start"], entity["end"]
        if end < start:
            yield from _span_order(path, entity)
        elif start < s0 or end > s1:
            yield path, f"span [{start}, {end}) is outside the sentence span [{s0}, {s1})"
        elif (found := text[start - s0 : end - s0]) != entity["text"]:
            yield f"{path}.text", f"{entity['text']!r} but the sentence has {found!r} there"


def _check_relation(record: dict[str, Any]) -> Problems:
    text = record["text"]
    e1, e2 = record["entity1"], record["entity2"]
    for name, entity in (("entity1", e1), ("entity2", e2)):
        path, start, end = f"$.{name}", entity["start"], entity["end"]
        if end < start:
            yield from _span_order(path, entity)
        elif end > len(text):
            yield path, f"end {end} is past the end of the text ({len(text)} characters)"
        elif (found := text[start:end]) != entity["text"]:
            yield f"{path}.text", f"{entity['text']!r} but text[{start}:{end}] is {found!r}"
    if e1["start"] < e2["end"] and e2["start"] < e1["end"]:
        yield (
            "$.entity2",
            f"span [{e2['start']}, {e2['end']}) overlaps entity1 [{e1['start']}, {e1['end']})",
        )


def _check_gnn(record: dict[str, Any]) -> Problems:
    for i, candidate in enumerate(record["candidates"]):
        path = f"$.candidates[{i}]"
        rows, edges = candidate["node_features"], candidate["edge_index"]
        widths = sorted({len(row) for row in rows})
        if len(widths) > 1:
            yield f"{path}.node_features", f"rows have different widths {widths}"
        if not all(math.isfinite(x) for row in rows for x in row):
            yield f"{path}.node_features", "holds NaN or infinity"
        if not math.isfinite(candidate["label"]):
            yield f"{path}.label", f"{candidate['label']} is not a finite number"
        for j, (source, target) in enumerate(edges):
            if max(source, target) >= len(rows):
                yield (
                    f"{path}.edge_index[{j}]",
                    f"edge [{source}, {target}] names a node >= {len(rows)}, "
                    "the number of node_features rows",
                )
        if len(candidate["edge_directions"]) != len(edges):
            yield (
                f"{path}.edge_directions",
                f"{len(candidate['edge_directions'])} directions for {len(edges)} edges",
            )


SEMANTIC_CHECKS: dict[str, Callable[[dict[str, Any]], Problems]] = {
    "chunks": _check_chunks,
    "relations": _check_relations,
    "relation": _check_relation,
    "gnn": _check_gnn,
}


def violations(records: Iterable[tuple[int | None, Any]], kind: str) -> list[Violation]:
    """Every violation of the ``kind`` contract in ``(line, record)`` pairs.

    Schema errors come first for each record, sorted by path; the semantic checks run only on
    records that match the schema, so they can rely on its types.
    """
    checker = _Checker(kind)
    return [v for line, record in records for v in checker(line, record)]


class _Checker:
    """Checks records one at a time against the ``kind`` contract, remembering the ids seen
    (for the kinds whose ids must be unique)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.fast = _fast_check(kind)
        self.check = SEMANTIC_CHECKS.get(kind)
        self.first_line: dict[str, int | None] = {}  # id -> line it first appeared on

    def __call__(self, line: int | None, record: Any) -> list[Violation]:
        import fastjsonschema

        try:
            self.fast(record)
            errors = []
        except fastjsonschema.JsonSchemaException:
            errors = sorted(
                _validator(self.kind).iter_errors(record),
                key=lambda e: [(isinstance(p, str), p) for p in e.absolute_path],
            )
        found = [Violation(line, _json_path(e.absolute_path), e.message) for e in errors]
        if not errors and self.check is not None:
            found += [Violation(line, path, message) for path, message in self.check(record)]
        key = record.get("id") if isinstance(record, dict) else None
        if self.kind in UNIQUE_ID_KINDS and isinstance(key, str):
            if key in self.first_line:
                message = f"duplicate id {key!r} (first on line {self.first_line[key]})"
                found.append(Violation(line, "$.id", message))
            else:
                self.first_line[key] = line
        return found


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse(text: str) -> Any:
    """Strict JSON: NaN and Infinity are refused, as other readers would."""
    return json.loads(text, parse_constant=_reject_constant)


def _json_error(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON ({e.msg} at column {e.colno})"
    return f"invalid JSON ({e})"


def _lines(path: Path, bad: list[Violation]) -> Iterator[tuple[int, Any]]:
    """``(line, record)`` for each non-blank line; lines that are not JSON go to ``bad``."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(Violation(lineno, "$", f"not UTF-8 text ({e.reason})"))
                continue
            if not text.strip():
                continue
            try:
                record = _parse(text)
            except ValueError as e:
                bad.append(Violation(lineno, "$", _json_error(e)))
                continue
            yield lineno, record


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(path, "no such file")


def validate_file(path: Path, kind: str) -> tuple[int, list[Violation]]:
    """Check a file against the ``kind`` contract.

    JSON Lines kinds: every non-blank line is a record; a line that is not JSON is reported as a
    violation on that line. ``manifest``: the file is one JSON document (violations have no line).

    Returns:
        The number of records checked and every violation, in line order.

    Raises:
        ConfigError: for an unknown kind.
        InputError: if the file does not exist.
    """
    path = Path(path)
    schema(kind)
    _require_file(path)
    if kind in DOCUMENT_KINDS:
        try:
            document = _parse(path.read_text(encoding="utf-8"))
        except ValueError as e:  # also UnicodeDecodeError
            line = e.lineno if isinstance(e, json.JSONDecodeError) else None
            return 1, [Violation(line, "$", _json_error(e))]
        return 1, violations([(None, document)], kind)
    bad: list[Violation] = []
    checked = 0

    def counted() -> Iterator[tuple[int, Any]]:
        nonlocal checked
        for item in _lines(path, bad):
            checked += 1
            yield item

    found = violations(counted(), kind) + bad
    found.sort(key=lambda v: v.line or 0)  # stable: keeps path order within a line
    return checked + len(bad), found


def check_records(records: list[dict[str, Any]], kind: str, path: Path) -> None:
    """Refuse to write ``records`` to ``path`` if they break the ``kind`` contract.

    Raises:
        InputError: naming up to the first ten violations by the line each record would have
            in the file. Valid inputs never cause it: it is a bug in the code producing them.
    """
    found = violations(enumerate(records, start=1), kind)
    if found:
        raise _refusal(path, kind, len(records), found)


@contextlib.contextmanager
def checked_jsonl(path: Path, kind: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Yield ``write(record)``: each record is checked against the ``kind`` contract and
    streamed to a temporary file, so memory holds one record, not the file. On leaving the
    block the file is moved into place (atomically) if every record passed.

    Raises:
        InputError: as :func:`check_records`, and ``path`` is left as it was.
    """
    checker = _Checker(kind)
    found: list[Violation] = []
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:

        def write(record: dict[str, Any]) -> None:
            nonlocal count
            count += 1
            found.extend(checker(count, record))
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

        yield write
        if found:
            raise _refusal(path, kind, count, found)


def _refusal(path: Path, kind: str, count: int, found: list[Violation]) -> InputError:
    listed = "\n".join(f"  {v}" for v in found[:MAX_LISTED])
    more = f"\n  ... and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
    return InputError(
        path,
        f"refusing to write {count} records: {len(found)} violation(s) of the {kind} "
        f"schema (a bug in the code that produces this file, please report it):\n{listed}{more}",
    )


def _percentiles(values: list[int]) -> dict[str, float]:
    """Nearest-rank percentiles: the smallest value with at least p% of the values <= it."""
    ordered = sorted(values)

    def rank(p: int) -> int:
        return ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1]

    return {
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 2),
    }


def _category(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def stats(path: Path) -> dict[str, Any]:
    """Summary of a JSON Lines file.

    Returns:
        ``records``; ``fields`` (sorted top-level names); ``distributions``: for ``label`` and
        ``kind``, value -> count, most frequent first; ``lengths``: nearest-rank p50/p90/p99,
        max and mean of the character length of ``text``, ``query``, ``positive`` and ``prompt``,
        and of the number of ``candidates`` (gnn files).

    Raises:
        InputError: if the file is missing or a line is not a JSON object.
    """
    path = Path(path)
    _require_file(path)
    records = 0
    fields: set[str] = set()
    counts: dict[str, Counter[str]] = {}
    sizes: dict[str, list[int]] = {}
    for _, record in read_jsonl(path):
        records += 1
        fields.update(record)
        for name in DISTRIBUTION_FIELDS:
            if name in record:
                counts.setdefault(name, Counter())[_category(record[name])] += 1
        for name, value in record.items():
            if (name in LENGTH_FIELDS and isinstance(value, str)) or (
                name == "candidates" and isinstance(value, list)
            ):
                sizes.setdefault(name, []).append(len(value))
    return {
        "records": records,
        "fields": sorted(fields),
        "distributions": {
            name: dict(sorted(counter.items(), key=lambda item: (-item[1], item[0])))
            for name, counter in sorted(counts.items())
        },
        "lengths": {name: _percentiles(values) for name, values in sorted(sizes.items())},
    }
