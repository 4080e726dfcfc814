"""Entity mentions and candidate entity pairs, for relation extraction.

``ingest`` parses every section with a parser backend (``ingest.parser``):

- ``simple`` (default, no extra dependency): sentences from
  :func:`sphana.documents.split_sentences`; mentions are runs of capitalized words, joined by
  single spaces and by lower-case name connectors (``of``, ``for``, ``on``, ``van``, ...), e.g.
  "Halvard Institute for Tidal Acoustics". A sentence-initial function word ("The", "In", ...)
  never starts a mention, and a lone sentence-initial word counts only if the same word also
  appears capitalized mid-sentence in the section ("Researchers agree ..." is not a name;
  "Castellane was raised ..." is). Types are unknown (``null``).
- ``spacy``: a spaCy pipeline (``ingest.spacy_model``: installed package or local path); its
  sentences when the pipeline sets them (else ``split_sentences``) and its entities with labels.

Every pair of mentions in a sentence is a candidate (``e1`` the earlier one), unless it spans
more than ``ingest.max_pair_chars`` characters (:func:`sentence_pairs`); :func:`detect` finds the
mentions and candidates of one text as ``ingest`` does, for a runtime (this module imports no
torch). Gold annotations (``relations.jsonl`` of the corpus) are joined by span: a candidate whose
two spans match a gold pair takes its label and orientation; a gold pair the parser missed is
still written (``detected: false``, with the records of its document), so no gold label is ever
dropped, and the report counts both. Work is per document (:class:`Extractor`,
:class:`GoldReader`): records are sorted within each document, documents keep the order they are
read in.

Parses are cached in ``<ingest>/parse_cache/<parser version>.jsonl``, keyed by the sha256 of the
section text, so a rerun with the same parser parses nothing again, and adding a document parses
only its sections. The cache is not a DVC output: it survives reruns of the stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from sphana.config import OnError, ParserName
from sphana.documents import Document, split_sentences
from sphana.errors import ConfigError, InputError
from sphana.io import atomic_path, read_jsonl


@dataclass
class Parse:
    sentences: list[tuple[int, int]]  # character spans in the section text
    mentions: list[tuple[int, int, str | None]]  # (start, end, type), sorted, non-overlapping


class Parser(Protocol):
    version: str  # names the parser and everything that changes its output; keys the cache

    def parse(self, text: str) -> Parse: ...


# --- simple ------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_](?:[\w'\u2019.-]*[^\W_])?")
_CONNECTORS = frozenset("of for on de du des van von der den la le di da del".split())  # noqa: SIM905
_FUNCTION_WORDS = frozenset(
    """the a an in on at as after before during his her their its this that these those it he she
    they we our since while when former together both among from with by for of to one two three
    each every some many most several until under over between later earlier if then there here
    all no not""".split()  # noqa: SIM905 - a word list reads better as text
)


class SimpleParser:
    version = "simple-1"

    def parse(self, text: str) -> Parse:
        sentences = split_sentences(text)
        mid_capitalized = set()  # words seen capitalized after a sentence's first word
        words_by_sentence = []
        for s, e in sentences:
            words = [(m.start() + s, m.end() + s, m.group()) for m in _WORD.finditer(text[s:e])]
            words_by_sentence.append(words)
            mid_capitalized.update(w for _, _, w in words[1:] if w[0].isupper())
        mentions: list[tuple[int, int, str | None]] = []
        for words in words_by_sentence:
            mentions.extend(
                (start, end, None) for start, end in _capitalized_runs(text, words, mid_capitalized)
            )
        return Parse(sentences, mentions)


def _capitalized_runs(
    text: str, words: list[tuple[int, int, str]], mid_capitalized: set[str]
) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    run: list[tuple[int, int, str]] = []

    def flush() -> None:
        while run and not run[-1][2][0].isupper():  # a run never ends on a connector
            run.pop()
        initial_lone = len(run) == 1 and run[0][0] == words[0][0]
        if run and not (initial_lone and run[0][2] not in mid_capitalized):
            runs.append((run[0][0], run[-1][1]))
        run.clear()

    for i, (start, end, word) in enumerate(words):
        if run and text[run[-1][1] : start] != " ":  # punctuation or a line break ends a name
            flush()
        if word[0].isupper():
            if word.lower() in _FUNCTION_WORDS and (not run or i == 0):
                flush()
                continue
            run.append((start, end, word))
        elif run and word in _CONNECTORS:
            run.append((start, end, word))
        else:
            flush()
    flush()
    return runs


# --- spaCy -------------------------------------------------------------------------------------


class SpacyParser:
    def __init__(self, model: str) -> None:
        try:
            import spacy
        except ImportError:
            raise ConfigError(
                "ingest.parser=spacy needs spaCy: pip install 'sphana[spacy]' (or pip install "
                "spacy), plus a pipeline package or a pipeline directory for ingest.spacy_model; "
                "or use ingest.parser=simple"
            ) from None
        try:
            self.nlp = spacy.load(model)
        except OSError as e:
            raise ConfigError(
                f"ingest.spacy_model={model!r}: no installed spaCy pipeline package or pipeline "
                f"directory by that name ({str(e).splitlines()[0][:160]}). Install one (e.g. "
                "pip install en_core_web_sm-<version>-py3-none-any.whl from a local file) or point "
                "ingest.spacy_model at a directory saved with nlp.to_disk()"
            ) from None
        meta = self.nlp.meta
        self.version = (
            f"spacy-{spacy.__version__}-{meta.get('lang')}_{meta.get('name')}-{meta.get('version')}"
            f"-{_pipeline_fingerprint(self.nlp, model)}"
        )

    def parse(self, text: str) -> Parse:
        doc = self.nlp(text)
        if doc.has_annotation("SENT_START"):
            sentences = [(s.start_char, s.end_char) for s in doc.sents if s.text.strip()]
        else:
            sentences = split_sentences(text)
        mentions = [(e.start_char, e.end_char, e.label_ or None) for e in doc.ents]
        return Parse(sentences, mentions)


def _pipeline_fingerprint(nlp: Any, model: str) -> str:
    """Changes when the pipeline's config or (for a pipeline directory) its files change, so an
    edited local pipeline with unchanged meta does not reuse stale parses."""
    digest = hashlib.sha256(nlp.config.to_str().encode())
    directory = Path(model)
    if directory.is_dir():
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            size = path.stat().st_size
            digest.update(f"{path.relative_to(directory).as_posix()}:{size}".encode())
            if size <= 1 << 20:
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def load_parser(name: ParserName, spacy_model: str) -> Parser:
    return SpacyParser(spacy_model) if name == ParserName.spacy else SimpleParser()


# --- cache -------------------------------------------------------------------------------------


_KEY_PREFIX = b'{"key": "'  # each line starts so (json.dumps of {"key": <sha256 hex>, ...})
_KEY_END = len(_KEY_PREFIX) + 64


class ParseCache:
    """Parses of one parser version, keyed by the sha256 of the text, in one JSON Lines file.

    Memory holds an index (key -> byte offset), not the parses: a hit reads its line from the
    cache file, a miss appends the new parse to an unnamed temporary file beside it, and
    :meth:`save` merges both into the cache file, sorted by key.
    """

    def __init__(self, directory: Path, version: str, enabled: bool = True) -> None:
        self.path = directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', version)}.jsonl"
        self.version = version
        self.enabled = enabled
        self.hits = self.misses = self.parsed_sentences = 0
        self.parse_seconds = 0.0  # time spent in the parser (cache misses only)
        # key -> offset of its line: >= 0 in the cache file, < 0 (-1 - offset) in the new file
        self._index: dict[str, int] = {}
        self._old: IO[bytes] | None = None
        self._new: IO[bytes] | None = None
        self._rewrite = False  # the cache file is damaged: write it anew even without misses
        if enabled and self.path.is_file():
            self._old = open(self.path, "rb")  # noqa: SIM115 - read on each hit until save()
            offset = 0
            for raw in self._old:  # keys only: a line is parsed when it is hit
                if not (raw.startswith(_KEY_PREFIX) and raw[_KEY_END : _KEY_END + 1] == b'"'):
                    self._index = {}  # a damaged cache is only a cache: parse again
                    self._old.close()
                    self._old = None
                    self._rewrite = True
                    break
                self._index[raw[len(_KEY_PREFIX) : _KEY_END].decode("ascii")] = offset
                offset += len(raw)

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.version}\0{text}".encode()).hexdigest()

    def parse(self, parser: Parser, text: str) -> Parse:
        key = self.key(text)
        offset = self._index.get(key) if self.enabled else None
        if offset is not None:
            try:
                cached = _parse_of(json.loads(self._line(offset)))
            except (KeyError, TypeError, ValueError):  # a damaged line: parse again
                self._rewrite = True
            else:
                self.hits += 1
                return cached
        self.misses += 1
        start = time.perf_counter()
        result = parser.parse(text)
        self.parse_seconds += time.perf_counter() - start
        self.parsed_sentences += len(result.sentences)
        if self.enabled:
            if self._new is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._new = tempfile.TemporaryFile(dir=self.path.parent)  # noqa: SIM115
            self._new.seek(0, os.SEEK_END)
            self._index[key] = -1 - self._new.tell()
            record = {"key": key, "sentences": result.sentences, "mentions": result.mentions}
            self._new.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        return result

    def _line(self, offset: int) -> bytes:
        f = self._old if offset >= 0 else self._new
        assert f is not None
        f.seek(offset if offset >= 0 else -1 - offset)
        line = f.readline()
        return line if line.endswith(b"\n") else line + b"\n"  # a cache file cut short

    def save(self) -> None:
        """Write old and new parses to the cache file (atomically), then close it."""
        if self.enabled and (self._new is not None or self._rewrite):
            with atomic_path(self.path) as tmp, open(tmp, "wb") as out:
                for key in sorted(self._index):
                    out.write(self._line(self._index[key]))
        self.close()

    def close(self) -> None:
        for f in (self._old, self._new):
            if f is not None:
                f.close()
        self._old = self._new = None
        self._index = {}
        self._rewrite = False


def _parse_of(r: dict[str, Any]) -> Parse:
    mentions = [(s, e, t) for s, e, t in r["mentions"]]
    return Parse([(s, e) for s, e in r["sentences"]], mentions)


# --- candidates and gold -----------------------------------------------------------------------

Mention = tuple[int, int, str | None]  # (start, end, type) in the parsed text


def sentence_pairs(
    parse: Parse, max_pair_chars: int
) -> Iterator[tuple[tuple[int, int], list[Mention], list[tuple[Mention, Mention]], int]]:
    """For each sentence of ``parse``: its span, the mentions inside it, its candidate pairs
    (every two of those mentions, the earlier first, spanning at most ``max_pair_chars``
    characters) and how many pairs were left out for spanning more."""
    for s_start, s_end in parse.sentences:
        inside = [m for m in parse.mentions if s_start <= m[0] and m[1] <= s_end]
        candidates, too_far = [], 0
        for i, a in enumerate(inside):
            for b in inside[i + 1 :]:
                if b[1] - a[0] > max_pair_chars:
                    too_far += 1
                    continue
                candidates.append((a, b))
        yield (s_start, s_end), inside, candidates, too_far


def detect(text: str, max_pair_chars: int, parser: Parser | None = None) -> list[dict[str, Any]]:
    """The entity mentions and candidate pairs of each sentence of ``text``, as ``ingest`` finds
    them in a section (``parser``: the ``simple`` one by default; ``max_pair_chars``:
    ``ingest.max_pair_chars``), without gold annotations.

    ``ingest`` parses each section's normalized text (:func:`sphana.documents.normalize`), and
    the ``simple`` parser looks at the whole text (a lone sentence-initial word is a name only if
    the text also has it capitalized mid-sentence): give it the same text to get the same result.

    Returns ``[{"start", "end", "text", "mentions", "pairs"}]``, one per sentence (offsets in
    ``text``): ``mentions`` are entities ``{"text", "start", "end", "type"}``; ``pairs`` are
    ``{"sentence": {"start", "end", "text"}, "e1", "e2"}`` (``e1`` the earlier entity), the keys
    of a ``relations.jsonl`` row that :func:`sphana.relation_inputs.pair_examples` and
    :func:`sphana.graph_inputs.passage` read, in ``relations.jsonl`` order.
    """
    parse = (parser or SimpleParser()).parse(text)
    out = []
    for (start, end), inside, candidates, _ in sentence_pairs(parse, max_pair_chars):
        sentence = {"start": start, "end": end, "text": text[start:end]}
        pairs = [
            {"sentence": dict(sentence), "e1": _entity(text, *a), "e2": _entity(text, *b)}
            for a, b in candidates
        ]
        # the order of ingest's records: first entity, then id (whose prefix a section shares)
        pairs.sort(key=lambda p: (p["e1"]["start"], _pair_id("", 0, p["e1"], p["e2"])))
        out.append(
            {
                **sentence,
                "mentions": [_entity(text, *m) for m in inside],
                "pairs": pairs,
            }
        )
    return out


def _entity(text: str, start: int, end: int, type_: str | None) -> dict[str, Any]:
    return {"text": text[start:end], "start": start, "end": end, "type": type_}


def _pair_id(doc_id: str, section_index: int, e1: dict, e2: dict) -> str:
    return f"{doc_id}#{section_index}@{e1['start']}-{e1['end']}:{e2['start']}-{e2['end']}"


PairKey = tuple[str, str, frozenset]  # (doc_id, section heading, the two entity spans)


@dataclass
class Gold:
    """Gold relation annotations, by ``(doc_id, section)`` and unordered entity spans."""

    pairs: dict[PairKey, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # with ingest.on_error=skip

    @classmethod
    def read(
        cls, path: Path, sections: dict[tuple[str, str], str], on_error: OnError = OnError.fail
    ) -> Gold:
        """Read and check ``path``; a bad line raises :class:`InputError` naming it or, with
        ``on_error: skip`` (e.g. its document was skipped), is listed in ``skipped``."""
        reader = GoldReader(path, on_error)
        by_doc: dict[str, dict[str, str]] = {}
        for (doc_id, heading), text in sections.items():
            by_doc.setdefault(doc_id, {})[heading] = text
        gold = cls()
        for doc_id, texts in by_doc.items():
            gold.pairs.update(reader.check(doc_id, texts).pairs)
        gold.skipped = reader.finish()
        return gold


class GoldReader:
    """The gold annotations of a corpus, checked one document at a time as a streaming ingest
    reads them (a line's spans can only be checked against its section's text).

    The lines are read (and grouped by document) at once; :meth:`document` checks those of one
    document; :meth:`finish` reports the lines whose document never came.
    """

    def __init__(self, path: Path, on_error: OnError = OnError.fail) -> None:
        self.path = path
        self.on_error = on_error
        self._skipped: list[dict[str, Any]] = []
        self._lines: dict[Any, list[tuple[int, dict[str, Any]]]] = {}
        self._first_line: dict[Any, int] = {}  # relation id -> first line that has it
        for lineno, r in read_jsonl(path):
            self._lines.setdefault(_hashable(r.get("doc_id")), []).append((lineno, r))
            self._first_line.setdefault(_hashable(r.get("id")), lineno)

    def document(self, doc: Document) -> Gold:
        """The checked gold pairs of ``doc``."""
        return self.check(doc.id, {s.heading: s.text for s in doc.sections})

    def check(self, doc_id: str, sections: dict[str, str]) -> Gold:
        """The checked gold pairs of document ``doc_id``, whose sections are ``sections``
        (heading -> text)."""
        gold = Gold()
        texts = {(doc_id, heading): text for heading, text in sections.items()}
        for lineno, r in self._lines.pop(doc_id, []):
            try:
                pair_key, entry = _gold_pair(self.path, lineno, r, texts)
                first = self._first_line.get(_hashable(entry["id"]), lineno)
                if first != lineno:
                    raise InputError(
                        self.path,
                        f"duplicate relation id {entry['id']!r} (first on line {first})",
                        lineno,
                    )
                if pair_key in gold.pairs:
                    raise InputError(
                        self.path,
                        f"entity pair annotated twice (also {gold.pairs[pair_key]['id']!r})",
                        lineno,
                    )
            except InputError as e:
                self._fail_or_skip(e)
                continue
            gold.pairs[pair_key] = entry
        return gold

    def finish(self) -> list[dict[str, Any]]:
        """Check the lines whose document never came (each names a document not in the corpus)
        and return every skipped line, in line order."""
        rest = sorted(item for lines in self._lines.values() for item in lines)
        self._lines = {}
        for lineno, r in rest:
            try:
                _gold_pair(self.path, lineno, r, {})
            except InputError as e:
                self._fail_or_skip(e)
        return sorted(self._skipped, key=lambda s: s["line"])

    def _fail_or_skip(self, e: InputError) -> None:
        if self.on_error == OnError.fail:
            raise e
        self._skipped.append({"file": e.path, "line": e.line, "reason": e.reason})


def _hashable(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | type(None)) else repr(value)


def _gold_pair(
    path: Path, lineno: int, r: Any, sections: dict[tuple[str, str], str]
) -> tuple[PairKey, dict[str, Any]]:
    try:
        key = (r["doc_id"], r["section"])
        spans = [(r[k]["start"], r[k]["end"]) for k in ("e1", "e2")]
        texts = [r[k]["text"] for k in ("e1", "e2")]
        sentence = (r["sentence"]["start"], r["sentence"]["end"])
        label, gid = r["label"], r["id"]
    except (KeyError, TypeError):
        raise InputError(
            path,
            "needs id, doc_id, section, sentence{start,end}, e1/e2{text,type,start,end} and label",
            lineno,
        ) from None
    text = sections.get(key) if all(isinstance(k, str) for k in key) else None
    if text is None:
        raise InputError(
            path, f"section {key[1]!r} of document {key[0]!r} is not in the corpus", lineno
        )
    for name, (s, e), t in zip(("e1", "e2"), spans, texts, strict=True):
        if not (isinstance(s, int) and isinstance(e, int) and 0 <= s < e <= len(text)):
            raise InputError(path, f"{name} span {s}:{e} is outside the section", lineno)
        if text[s:e] != t:
            raise InputError(
                path,
                f"{name} text {t!r} != section text {text[s:e]!r} at {s}:{e} "
                "(offsets index the normalized section text)",
                lineno,
            )
    if spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]:
        raise InputError(path, "e1 and e2 overlap", lineno)
    if not (isinstance(label, str) and label):
        raise InputError(path, "label must be a non-empty string", lineno)
    entry = {"id": gid, "label": label, "sentence": sentence, "e1": r["e1"], "e2": r["e2"]}
    return (*key, frozenset(spans)), entry


@dataclass
class Extraction:
    records: list[dict[str, Any]]
    report: dict[str, Any]


class Extractor:
    """Candidate entity pairs of one document at a time, joined with its gold annotations; the
    counts of the report accumulate over the documents."""

    def __init__(self, parser: Parser, cache: ParseCache, max_pair_chars: int) -> None:
        self.parser, self.cache, self.max_pair_chars = parser, cache, max_pair_chars
        self.sentences = self.mentions = self.too_far = self.candidates = 0
        self.gold_pairs = self.missed = 0
        self.labels: Counter[str] = Counter()

    def document(self, doc: Document, gold: Gold | None) -> list[dict[str, Any]]:
        """The records of ``doc``: candidates of every sentence, then the gold pairs the parser
        missed (``detected: false``), sorted by section, first entity and id."""
        records: list[dict[str, Any]] = []
        joined: set[PairKey] = set()
        pairs = gold.pairs if gold else {}
        for index, section in enumerate(doc.sections):
            text = section.text
            parse = self.cache.parse(self.parser, text)
            self.sentences += len(parse.sentences)
            self.mentions += len(parse.mentions)
            for sentence, _, candidates, too_far in sentence_pairs(parse, self.max_pair_chars):
                self.too_far += too_far
                for a, b in candidates:
                    e1, e2 = _entity(text, *a), _entity(text, *b)
                    pair_key = (doc.id, section.heading, frozenset({a[:2], b[:2]}))
                    g = pairs.get(pair_key)
                    if g is not None:
                        joined.add(pair_key)
                        if (g["e1"]["start"], g["e1"]["end"]) != a[:2]:
                            e1, e2 = e2, e1  # the gold orientation: e1 is the subject
                        e1["type"] = g["e1"].get("type") or e1["type"]
                        e2["type"] = g["e2"].get("type") or e2["type"]
                    records.append(_record(doc, index, text, sentence, e1, e2, g, detected=True))
        self.candidates += len(records)
        headings = {s.heading: i for i, s in enumerate(doc.sections)}
        for pair_key, g in pairs.items():
            if pair_key in joined:
                continue
            self.missed += 1
            index = headings[pair_key[1]]
            text = doc.sections[index].text
            e1 = _entity(text, g["e1"]["start"], g["e1"]["end"], g["e1"].get("type"))
            e2 = _entity(text, g["e2"]["start"], g["e2"]["end"], g["e2"].get("type"))
            records.append(_record(doc, index, text, g["sentence"], e1, e2, g, detected=False))
        self.gold_pairs += len(pairs)
        records.sort(key=lambda r: (r["section_index"], r["e1"]["start"], r["id"]))
        self.labels.update(r["label"] for r in records if r["label"] is not None)
        return records

    def report(self) -> dict[str, Any]:
        cache, total = self.cache, self.gold_pairs
        return {
            "parser": self.parser.version,
            "sentences": self.sentences,
            "mentions": self.mentions,
            "candidate_pairs": self.candidates,
            "pairs_over_max_chars": self.too_far,
            "gold_pairs": total,
            "gold_detected": total - self.missed,
            "gold_not_detected": self.missed,
            "gold_recall": round((total - self.missed) / total, 4) if total else None,
            "labelled": sum(self.labels.values()),
            "by_label": dict(sorted(self.labels.items())),
            "parse_cache": {"hits": cache.hits, "misses": cache.misses, "file": str(cache.path)},
            "parsing": {  # what the parser itself cost, on the sections it parsed (cache misses)
                "seconds": round(cache.parse_seconds, 4),
                "sentences": cache.parsed_sentences,
                "sentences_per_s": round(cache.parsed_sentences / cache.parse_seconds, 1)
                if cache.parse_seconds
                else None,
            },
        }


def extract(
    docs: Iterable[Document],
    parser: Parser,
    cache: ParseCache,
    gold: Gold | None,
    max_pair_chars: int,
) -> Extraction:
    """Candidate entity pairs of every sentence, joined with the gold annotations: the records
    of each document (sorted within it) in the order of ``docs``."""
    by_doc: dict[str, Gold] = {}
    for pair_key, entry in gold.pairs.items() if gold else ():
        by_doc.setdefault(pair_key[0], Gold()).pairs[pair_key] = entry
    extractor = Extractor(parser, cache, max_pair_chars)
    records = [r for doc in docs for r in extractor.document(doc, by_doc.get(doc.id))]
    return Extraction(records, extractor.report())


def _record(
    doc: Document,
    index: int,
    text: str,
    sentence: tuple[int, int],
    e1: dict[str, Any],
    e2: dict[str, Any],
    gold: dict[str, Any] | None,
    detected: bool,
) -> dict[str, Any]:
    s, e = sentence
    return {
        "id": _pair_id(doc.id, index, e1, e2),
        "doc_id": doc.id,
        "section": doc.sections[index].heading,
        "section_index": index,
        "sentence": {"start": s, "end": e, "text": text[s:e]},
        "e1": e1,
        "e2": e2,
        "label": gold["label"] if gold else None,
        "gold_id": gold["id"] if gold else None,
        "detected": detected,
    }


def read_gold_file(
    path: Path, docs: list[Document], on_error: OnError = OnError.fail
) -> Gold | None:
    """The gold annotations at ``path``, or None when the corpus has none."""
    if not path.is_file():
        return None
    sections = {(d.id, s.heading): s.text for d in docs for s in d.sections}
    return Gold.read(path, sections, on_error)
