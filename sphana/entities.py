"""Entity mentions and candidate entity pairs, for relation extraction.

``ingest`` parses every section with a parser backend (``ingest.parser``):

- ``simple`` (default, no extra dependency): sentences from :func:`sphana.ingest.split_sentences`;
  mentions are runs of capitalized words, joined by single spaces and by lower-case name
  connectors (``of``, ``for``, ``on``, ``van``, ...), e.g. "Halvard Institute for Tidal
  Acoustics". A sentence-initial function word ("The", "In", ...) never starts a mention, and a
  lone sentence-initial word counts only if the same word also appears capitalized mid-sentence
  in the section ("Researchers agree ..." is not a name; "Castellane was raised ..." is). Types
  are unknown (``null``).
- ``spacy``: a spaCy pipeline (``ingest.spacy_model``: installed package or local path); its
  sentences when the pipeline sets them (else ``split_sentences``) and its entities with labels.

Every pair of mentions in a sentence is a candidate (``e1`` the earlier one). Gold annotations
(``relations.jsonl`` of the corpus) are joined by span: a candidate whose two spans match a gold
pair takes its label and orientation; a gold pair the parser missed is still written
(``detected: false``), so no gold label is ever dropped, and the report counts both.

Parses are cached in ``<ingest>/parse_cache/<parser version>.jsonl``, keyed by the sha256 of the
section text, so a rerun with the same parser parses nothing again. The cache is not a DVC output:
it survives reruns of the stage.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sphana.config import OnError, ParserName
from sphana.errors import ConfigError, InputError
from sphana.ingest import Document, split_sentences
from sphana.io import read_jsonl, write_jsonl


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


class ParseCache:
    """Parses of one parser version, keyed by the sha256 of the text, in one JSON Lines file."""

    def __init__(self, directory: Path, version: str, enabled: bool = True) -> None:
        self.path = directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', version)}.jsonl"
        self.version = version
        self.enabled = enabled
        self.entries: dict[str, Parse] = {}
        self.hits = self.misses = self.parsed_sentences = 0
        self.parse_seconds = 0.0  # time spent in the parser (cache misses only)
        self._new = False
        if enabled and self.path.is_file():
            try:
                for _, r in read_jsonl(self.path):
                    mentions = [(s, e, t) for s, e, t in r["mentions"]]
                    self.entries[r["key"]] = Parse([tuple(x) for x in r["sentences"]], mentions)
            except (InputError, KeyError, TypeError, ValueError):
                self.entries = {}  # a damaged cache is only a cache: parse again
                self._new = True

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.version}\0{text}".encode()).hexdigest()

    def parse(self, parser: Parser, text: str) -> Parse:
        key = self.key(text)
        cached = self.entries.get(key) if self.enabled else None
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        start = time.perf_counter()
        result = parser.parse(text)
        self.parse_seconds += time.perf_counter() - start
        self.parsed_sentences += len(result.sentences)
        self.entries[key] = result
        self._new = True
        return result

    def save(self) -> None:
        if self.enabled and self._new:
            write_jsonl(
                self.path,
                (
                    {"key": k, "sentences": p.sentences, "mentions": p.mentions}
                    for k, p in sorted(self.entries.items())
                ),
            )


# --- candidates and gold -----------------------------------------------------------------------


def _entity(text: str, start: int, end: int, type_: str | None) -> dict[str, Any]:
    return {"text": text[start:end], "start": start, "end": end, "type": type_}


def _pair_id(doc_id: str, section_index: int, e1: dict, e2: dict) -> str:
    return f"{doc_id}#{section_index}@{e1['start']}-{e1['end']}:{e2['start']}-{e2['end']}"


@dataclass
class Gold:
    """Gold relation annotations, by ``(doc_id, section)`` and unordered entity spans."""

    pairs: dict[tuple[str, str, frozenset], dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # with ingest.on_error=skip

    @classmethod
    def read(
        cls, path: Path, sections: dict[tuple[str, str], str], on_error: OnError = OnError.fail
    ) -> Gold:
        """Read and check ``path``; a bad line raises :class:`InputError` naming it or, with
        ``on_error: skip`` (e.g. its document was skipped), is listed in ``skipped``."""
        gold = cls()
        ids: set[str] = set()
        for lineno, r in read_jsonl(path):
            try:
                pair_key, entry = _gold_pair(path, lineno, r, sections)
                if entry["id"] in ids:
                    raise InputError(path, f"duplicate relation id {entry['id']!r}", lineno)
                if pair_key in gold.pairs:
                    raise InputError(
                        path,
                        f"entity pair annotated twice (also {gold.pairs[pair_key]['id']!r})",
                        lineno,
                    )
            except InputError as e:
                if on_error == OnError.fail:
                    raise
                gold.skipped.append({"file": e.path, "line": e.line, "reason": e.reason})
                continue
            ids.add(entry["id"])
            gold.pairs[pair_key] = entry
        return gold


def _gold_pair(
    path: Path, lineno: int, r: Any, sections: dict[tuple[str, str], str]
) -> tuple[tuple[str, str, frozenset], dict[str, Any]]:
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
    text = sections.get(key)
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


def extract(
    docs: list[Document],
    parser: Parser,
    cache: ParseCache,
    gold: Gold | None,
    max_pair_chars: int,
) -> Extraction:
    """Candidate entity pairs of every sentence, joined with the gold annotations."""
    records: list[dict[str, Any]] = []
    sentences = mentions = too_far = 0
    joined: set[tuple] = set()
    for doc in docs:
        for index, section in enumerate(doc.sections):
            text = section.text
            parse = cache.parse(parser, text)
            sentences += len(parse.sentences)
            mentions += len(parse.mentions)
            for s_start, s_end in parse.sentences:
                inside = [m for m in parse.mentions if s_start <= m[0] and m[1] <= s_end]
                for i, a in enumerate(inside):
                    for b in inside[i + 1 :]:
                        if b[1] - a[0] > max_pair_chars:
                            too_far += 1
                            continue
                        e1, e2 = _entity(text, *a), _entity(text, *b)
                        pair_key = (doc.id, section.heading, frozenset({a[:2], b[:2]}))
                        g = gold.pairs.get(pair_key) if gold else None
                        if g is not None:
                            joined.add(pair_key)
                            if (g["e1"]["start"], g["e1"]["end"]) != a[:2]:
                                e1, e2 = e2, e1  # the gold orientation: e1 is the subject
                            e1["type"] = g["e1"].get("type") or e1["type"]
                            e2["type"] = g["e2"].get("type") or e2["type"]
                        records.append(
                            _record(doc, index, text, (s_start, s_end), e1, e2, g, detected=True)
                        )
    missed = 0
    by_id = {d.id: d for d in docs}
    if gold:
        for pair_key, g in gold.pairs.items():
            if pair_key in joined:
                continue
            missed += 1
            doc_id, heading, _ = pair_key
            doc = by_id[doc_id]
            index = next(i for i, s in enumerate(doc.sections) if s.heading == heading)
            text = doc.sections[index].text
            e1 = _entity(text, g["e1"]["start"], g["e1"]["end"], g["e1"].get("type"))
            e2 = _entity(text, g["e2"]["start"], g["e2"]["end"], g["e2"].get("type"))
            records.append(_record(doc, index, text, g["sentence"], e1, e2, g, detected=False))
    records.sort(key=lambda r: (r["doc_id"], r["section_index"], r["e1"]["start"], r["id"]))
    labels = Counter(r["label"] for r in records if r["label"] is not None)
    gold_total = len(gold.pairs) if gold else 0
    report = {
        "parser": parser.version,
        "sentences": sentences,
        "mentions": mentions,
        "candidate_pairs": len(records) - missed,
        "pairs_over_max_chars": too_far,
        "gold_pairs": gold_total,
        "gold_detected": gold_total - missed,
        "gold_not_detected": missed,
        "gold_recall": round((gold_total - missed) / gold_total, 4) if gold_total else None,
        "labelled": sum(labels.values()),
        "by_label": dict(sorted(labels.items())),
        "parse_cache": {"hits": cache.hits, "misses": cache.misses, "file": str(cache.path)},
        "parsing": {  # what the parser itself cost, on the sections it parsed (cache misses)
            "seconds": round(cache.parse_seconds, 4),
            "sentences": cache.parsed_sentences,
            "sentences_per_s": round(cache.parsed_sentences / cache.parse_seconds, 1)
            if cache.parse_seconds
            else None,
        },
    }
    return Extraction(records, report)


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
