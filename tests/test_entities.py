"""Entity mentions, candidate pairs, the gold join and the parse cache (sphana.entities)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO

from sphana.config import IngestConfig, OnError, ParserName
from sphana.documents import Document, Section
from sphana.entities import Gold, ParseCache, SimpleParser, extract, load_parser
from sphana.errors import ConfigError, InputError
from sphana.ingest import run


def mentions(text: str) -> list[str]:
    parse = SimpleParser().parse(text)
    return [text[s:e] for s, e, _ in parse.mentions]


def test_simple_parser_finds_multiword_names_with_connectors() -> None:
    text = (
        "Edda Marrowby joined the Halvard Institute for Tidal Acoustics in 1979. "
        "The Workshop on Estuarine Signal Processing met in Oszell."
    )
    assert mentions(text) == [
        "Edda Marrowby",
        "Halvard Institute for Tidal Acoustics",
        "Workshop on Estuarine Signal Processing",
        "Oszell",
    ]


def test_simple_parser_unicode_names_and_apostrophes() -> None:
    text = "Zoë Ólafsdóttir met Ōtsuka Ren and Seán O'Brien-Kowalski in Kraków."
    assert mentions(text) == ["Zoë Ólafsdóttir", "Ōtsuka Ren", "Seán O'Brien-Kowalski", "Kraków"]


def test_simple_parser_sentence_initial_words() -> None:
    # a lone sentence-initial word is a name only if it also appears capitalized mid-sentence
    text = "Researchers like the Tessmoor Array. Castellane built it. Ewan Castellane left."
    assert mentions(text) == ["Tessmoor Array", "Castellane", "Ewan Castellane"]
    assert mentions("In 2010 nothing happened. The end.") == []


def test_simple_parser_text_without_entities() -> None:
    parse = SimpleParser().parse("all lower case, no names at all. and numbers 12 34.")
    assert parse.mentions == [] and len(parse.sentences) == 1


def test_simple_parser_mentions_never_overlap_and_punctuation_splits() -> None:
    text = "Yesterday, Halvard, Tessmoor and Oszell (Ostravel) hosted Meridane Maritime Fund. " * 3
    parse = SimpleParser().parse(text)
    spans = [(s, e) for s, e, _ in parse.mentions]
    assert spans == sorted(spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), "overlap"
    assert [text[s:e] for s, e in spans[:5]] == [
        "Halvard",
        "Tessmoor",
        "Oszell",
        "Ostravel",
        "Meridane Maritime Fund",
    ]


def _doc(text: str, doc_id: str = "d") -> Document:
    return Document(doc_id, "T", [Section("S", text)], "mem")


def test_very_long_sentence_pairs_are_capped_and_counted(tmp_path: Path) -> None:
    names = [f"Name{chr(65 + i % 26)}x Person{i}" for i in range(60)]
    text = "Met " + ", ".join(names) + " in one very long sentence."
    parser = SimpleParser()
    result = extract([_doc(text)], parser, ParseCache(tmp_path, parser.version), None, 200)
    assert result.report["mentions"] == 60
    total = 60 * 59 // 2
    assert result.report["candidate_pairs"] + result.report["pairs_over_max_chars"] == total
    assert result.report["pairs_over_max_chars"] > 0
    for r in result.records:
        assert r["e2"]["end"] - r["e1"]["start"] <= 200


def _gold_file(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "relations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _gold(e1: tuple[int, int, str], e2: tuple[int, int, str], label: str, **extra) -> dict:
    return {
        "id": extra.get("id", "r1"),
        "doc_id": "d",
        "section": "S",
        "sentence": {"start": 0, "end": 40},
        "e1": {"text": e1[2], "type": "PERSON", "start": e1[0], "end": e1[1]},
        "e2": {"text": e2[2], "type": "ORG", "start": e2[0], "end": e2[1]},
        "label": label,
    }


def test_gold_join_keeps_orientation_and_never_drops_a_label(tmp_path: Path) -> None:
    text = "The Oszell Lab hired Edda Marrowby. Edda Marrowby met someone from nowhere."
    docs = [_doc(text)]
    sections = {("d", "S"): text}
    gold = Gold.read(
        _gold_file(
            tmp_path,
            [
                _gold((21, 34, "Edda Marrowby"), (4, 14, "Oszell Lab"), "works_at"),
                # "someone" is not a capitalized mention: the parser cannot find this pair
                _gold((36, 49, "Edda Marrowby"), (54, 61, "someone"), "no_relation", id="r2"),
            ],
        ),
        sections,
    )
    parser = SimpleParser()
    result = extract(docs, parser, ParseCache(tmp_path, parser.version), gold, 400)
    labelled = {r["gold_id"]: r for r in result.records if r["label"]}
    works = labelled["r1"]
    assert works["e1"]["text"] == "Edda Marrowby" and works["e2"]["text"] == "Oszell Lab"
    assert works["detected"] and works["e1"]["type"] == "PERSON"
    assert not labelled["r2"]["detected"]
    assert result.report["gold_not_detected"] == 1 and result.report["gold_detected"] == 1


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (_gold((0, 4, "Nope"), (4, 14, "Oszell Lab"), "x"), "e1 text 'Nope'"),
        (_gold((4, 14, "Oszell Lab"), (8, 14, "ll Lab"), "x"), "overlap"),
        (_gold((21, 34, "Edda Marrowby"), (4, 14, "Oszell Lab"), ""), "label"),
        ({"id": "r1", "doc_id": "d"}, "needs id, doc_id"),
        ({**_gold((21, 34, "Edda Marrowby"), (4, 14, "Oszell Lab"), "x"), "doc_id": "zz"}, "zz"),
    ],
)
def test_bad_gold_annotations_name_file_and_line(
    tmp_path: Path, record: dict, message: str
) -> None:
    text = "The Oszell Lab hired Edda Marrowby."
    good = _gold((21, 34, "Edda Marrowby"), (4, 14, "Oszell Lab"), "works_at", id="r0")
    path = _gold_file(tmp_path, [good, record])
    with pytest.raises(InputError) as e:
        Gold.read(path, {("d", "S"): text})
    assert e.value.line == 2 and message in str(e.value)


def test_parse_cache_reuses_parses_and_survives_damage(tmp_path: Path) -> None:
    calls = []

    class Counting(SimpleParser):
        def parse(self, text):  # type: ignore[override]
            calls.append(text)
            return super().parse(text)

    parser, docs = Counting(), [_doc("Edda Marrowby met Maren Tolvik.")]
    first = ParseCache(tmp_path, parser.version)
    extract(docs, parser, first, None, 400)
    first.save()
    second = ParseCache(tmp_path, parser.version)
    result = extract(docs, parser, second, None, 400)
    assert len(calls) == 1 and result.report["parse_cache"]["hits"] == 1
    other = ParseCache(tmp_path, "simple-999")  # a new parser version never reuses old parses
    extract(docs, parser, other, None, 400)
    assert len(calls) == 2
    first.path.write_text("{not json\n", encoding="utf-8")
    damaged = ParseCache(tmp_path, parser.version)
    extract(docs, parser, damaged, None, 400)
    assert len(calls) == 3 and damaged.misses == 1


def test_ingest_writes_relations_and_reuses_the_cache(tmp_path: Path) -> None:
    cfg = IngestConfig(chunk_tokens=96, overlap_tokens=16)
    gold = REPO / "data/gold"  # run() takes the gold directory
    first = run(cfg, REPO / "data/documents", tmp_path, gold)["relations"]
    assert first["parse_cache"]["misses"] + first["parse_cache"]["hits"] == 702  # sections
    assert first["labelled"] == first["gold_pairs"] == 1575
    assert first["gold_recall"] > 0.95
    assert first["parsing"]["sentences_per_s"] > 0
    before = (tmp_path / "relations.jsonl").read_bytes()
    second = run(cfg, REPO / "data/documents", tmp_path, gold)["relations"]
    assert second["parse_cache"] == {**first["parse_cache"], "hits": 702, "misses": 0}
    assert second["parsing"]["sentences"] == 0  # nothing was parsed again
    assert (tmp_path / "relations.jsonl").read_bytes() == before


def test_spacy_parser_from_a_local_pipeline_directory(tmp_path: Path) -> None:
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns(
        [
            {"label": "PERSON", "pattern": "Edda Marrowby"},
            {"label": "ORG", "pattern": "Oszell Lab"},
        ]
    )
    nlp.to_disk(tmp_path / "pipeline")
    parser = load_parser(ParserName.spacy, str(tmp_path / "pipeline"))
    text = "The Oszell Lab hired Edda Marrowby. Nothing else."
    parse = parser.parse(text)
    assert [(text[s:e], t) for s, e, t in parse.mentions] == [
        ("Oszell Lab", "ORG"),
        ("Edda Marrowby", "PERSON"),
    ]
    assert len(parse.sentences) == 2
    assert parser.version.startswith(f"spacy-{spacy.__version__}-en_pipeline-")


def test_spacy_parser_without_a_pipeline_says_what_to_install(tmp_path: Path) -> None:
    pytest.importorskip("spacy")
    with pytest.raises(ConfigError, match="ingest.spacy_model=.*pip install"):
        load_parser(ParserName.spacy, str(tmp_path / "no-such-pipeline"))


def test_bad_gold_lines_are_skipped_and_counted_with_on_error_skip(tmp_path: Path) -> None:
    text = "The Oszell Lab hired Edda Marrowby."
    good = _gold((21, 34, "Edda Marrowby"), (4, 14, "Oszell Lab"), "works_at", id="r0")
    orphan = {**good, "id": "r1", "doc_id": "skipped-document"}
    gold = Gold.read(_gold_file(tmp_path, [good, orphan]), {("d", "S"): text}, OnError.skip)
    assert len(gold.pairs) == 1
    assert gold.skipped == [
        {
            "file": str(tmp_path / "relations.jsonl"),
            "line": 2,
            "reason": "section 'S' of document 'skipped-document' is not in the corpus",
        }
    ]
