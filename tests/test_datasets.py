from __future__ import annotations

import json
from pathlib import Path

import pytest

from sphana.config import DatasetConfig
from sphana.datasets import (
    build_embedding,
    build_llm,
    linked_groups,
    load_corpus,
    sample_groups,
    split_documents,
)
from sphana.errors import InputError
from sphana.gold import chunk_index, resolve_questions


def chunk(doc: str, n: int, section: str, start: int, text: str) -> dict:
    return {
        "id": f"{doc}#{n}",
        "doc_id": doc,
        "title": doc.upper(),
        "section": section,
        "section_index": 0,
        "start": start,
        "end": start + len(text),
        "text": text,
        "n_tokens": 10,
        "source": f"{doc}.md",
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    chunks = []
    for d in range(20):
        doc = f"doc{d:02d}"
        chunks.append(
            chunk(
                doc, 0, "Intro", 0, f"Doc {d} opens with a long enough sentence here. It goes on."
            )
        )
        chunks.append(
            chunk(
                doc, 1, "Intro", 40, f"Overlap part of doc {d} with enough characters in it. Yes."
            )
        )
        chunks.append(
            chunk(doc, 2, "Later", 0, f"Later section of doc {d} is about something else entirely.")
        )
    questions = [
        {
            "id": f"q{d}",
            "question": f"What does doc {d} open with?",
            "relevant": [{"doc_id": f"doc{d:02d}", "section": "Intro", "start": 42, "end": 52}],
        }
        for d in range(20)
    ]
    # one question spans two documents: they must land in the same split
    questions.append(
        {
            "id": "qx",
            "question": "Which two docs?",
            "relevant": [
                {"doc_id": "doc03", "section": "Later", "start": 0, "end": 10},
                {"doc_id": "doc17", "section": "Later", "start": 0, "end": 10},
            ],
        }
    )
    return write_jsonl(tmp_path / "chunks.jsonl", chunks), write_jsonl(
        tmp_path / "q.jsonl", questions
    )


def resolve(chunks_file: Path, questions: Path) -> Path:
    """Gold questions resolved to chunks, as ``ingest`` writes them for build_datasets."""
    chunks = read(chunks_file)
    resolved = resolve_questions(questions, chunk_index(chunks))
    return write_jsonl(questions.with_suffix(".resolved.jsonl"), resolved)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_is_by_document_and_never_leaks(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    chunks_file, questions = corpus
    report = build_embedding(
        chunks_file,
        resolve(chunks_file, questions),
        DatasetConfig(validation_fraction=0.25),
        tmp_path / "o",
    )
    train, val = read(tmp_path / "o/train.jsonl"), read(tmp_path / "o/validation.jsonl")
    corpus_rows = read(tmp_path / "o/validation_corpus.jsonl")
    val_docs = {r["doc_id"] for r in corpus_rows}
    assert val_docs and not val_docs & {r["doc_id"] for r in train}
    assert {r["doc_id"] for r in val} <= val_docs
    assert report["documents"]["validation"] == len(val_docs)
    # the two-document question kept its documents together
    assert ("doc03" in val_docs) == ("doc17" in val_docs)
    # validation: the held-out documents' self-supervised pairs, and their gold questions
    assert {r["kind"] for r in val} == {"gold", "heading", "sentence"}
    # train has gold + self-supervised pairs, never for passages a gold question covers
    kinds = {r["kind"] for r in train}
    assert kinds == {"gold", "heading", "sentence"}
    gold_positives = {r["positive_id"] for r in train if r["kind"] == "gold"}
    assert not gold_positives & {r["positive_id"] for r in train if r["kind"] != "gold"}


def test_held_out_questions_are_never_trained_on(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    chunks_file, questions = corpus
    # second questions about the passages of the first ten: each pair is held out together
    rows = read(questions)
    rows += [{**q, "id": f"{q['id']}b", "question": f"Again: {q['question']}"} for q in rows[:10]]
    write_jsonl(questions, rows)
    cfg = DatasetConfig(validation_fraction=0.25, held_out_fraction=0.5)
    report = build_embedding(chunks_file, resolve(chunks_file, questions), cfg, tmp_path / "o")
    train, val = read(tmp_path / "o/train.jsonl"), read(tmp_path / "o/validation.jsonl")
    held_out = read(tmp_path / "o/held_out.jsonl")
    trained = {r["query_id"] for r in train if r["kind"] == "gold"}
    # half of the training questions (whole passage groups), one record each, gold only
    assert len(held_out) == len({r["query_id"] for r in held_out}) == report["pairs"]["held_out"]
    target = 0.5 * (len(held_out) + len(trained))
    assert target <= len(held_out) < target + 2  # groups of at most 2 questions
    assert any(q.endswith("b") for q in trained) and any(
        r["query_id"].endswith("b") for r in held_out
    )
    assert {r["kind"] for r in held_out} == {"gold"}
    assert not {r["query_id"] for r in held_out} & (trained | {r["query_id"] for r in val})
    val_docs = {r["doc_id"] for r in read(tmp_path / "o/validation_corpus.jsonl")}
    assert not {r["doc_id"] for r in held_out} & val_docs
    # nor do their passages come back as self-supervised pairs or as another question's positives
    held_passages = {p for r in held_out for p in r["relevant_ids"]}
    assert not held_passages & {p for r in train for p in [r["positive_id"], *r["relevant_ids"]]}

    build_embedding(
        chunks_file,
        resolve(chunks_file, questions),
        DatasetConfig(held_out_fraction=0.0),
        tmp_path / "z",
    )
    assert read(tmp_path / "z/held_out.jsonl") == []


def test_gold_span_maps_to_every_chunk_that_contains_it(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    chunks_file, questions = corpus
    build_embedding(chunks_file, resolve(chunks_file, questions), DatasetConfig(), tmp_path / "o")
    rows = [
        r
        for name in ("train", "validation", "held_out")
        for r in read(tmp_path / f"o/{name}.jsonl")
    ]
    q5 = next(r for r in rows if r["query_id"] == "q5")
    # span 42..52 lies in the overlap of chunk #0 (0..57) and chunk #1 (40..98): both relevant
    assert q5["relevant_ids"] == ["doc05#0", "doc05#1"]
    assert q5["positive_id"] == "doc05#0"


def test_deterministic(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    chunks_file, questions = corpus
    build_embedding(chunks_file, resolve(chunks_file, questions), DatasetConfig(), tmp_path / "a")
    build_embedding(chunks_file, resolve(chunks_file, questions), DatasetConfig(), tmp_path / "b")
    for name in ("train.jsonl", "validation.jsonl", "validation_corpus.jsonl", "held_out.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize(
    ("question", "reason"),
    [
        (
            {
                "id": "q1",
                "question": "?",
                "relevant": [{"doc_id": "nope", "section": "Intro", "start": 0, "end": 5}],
            },
            "document 'nope' is not in the ingested corpus",
        ),
        (
            {
                "id": "q1",
                "question": "?",
                "relevant": [{"doc_id": "doc01", "section": "Missing", "start": 0, "end": 5}],
            },
            "has no section 'Missing'",
        ),
        (
            {
                "id": "q1",
                "question": "?",
                "relevant": [{"doc_id": "doc01", "section": "Intro", "start": 500, "end": 505}],
            },
            "outside section",
        ),
        ({"id": "q1", "question": "", "relevant": []}, "field 'question'"),
        (
            {
                "id": "q1",
                "question": "Who?",
                "answer": 7,
                "relevant": [{"doc_id": "doc00", "section": "Intro", "start": 0, "end": 5}],
            },
            "field 'answer'",
        ),
    ],
)
def test_bad_gold_names_file_and_line(
    corpus: tuple[Path, Path], tmp_path: Path, question: dict, reason: str
) -> None:
    chunks_file, _ = corpus
    good = {
        "id": "q0",
        "question": "ok?",
        "relevant": [{"doc_id": "doc00", "section": "Intro", "start": 0, "end": 5}],
    }
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, question])
    with pytest.raises(InputError, match=reason) as info:
        resolve(chunks_file, bad)
    assert "bad.jsonl:2" in str(info.value)
    assert not bad.with_suffix(".resolved.jsonl").exists()


def test_without_gold_validation_is_self_supervised(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    chunks_file, _ = corpus
    report = build_embedding(chunks_file, None, DatasetConfig(), tmp_path / "o")
    val = read(tmp_path / "o/validation.jsonl")
    assert val and {r["kind"] for r in val} <= {"heading", "sentence"}
    # the graph ranker's training queries: pseudo-queries of whole passages the embedding never
    # trains on (a seeded draw of dataset.held_out_fraction of the training passages)
    train, held_out = read(tmp_path / "o/train.jsonl"), read(tmp_path / "o/held_out.jsonl")
    assert held_out and {r["kind"] for r in held_out} <= {"heading", "sentence"}
    held_passages = {r["positive_id"] for r in held_out}
    assert not held_passages & {r["positive_id"] for r in train}
    assert len(held_out) == report["pairs"]["held_out"]
    again = build_embedding(chunks_file, None, DatasetConfig(), tmp_path / "again")
    assert again == report and read(tmp_path / "again/held_out.jsonl") == held_out  # seeded


def test_held_out_passages_are_a_seeded_draw_of_the_fraction() -> None:
    from sphana.datasets import _drawn

    keys = [f"doc{i}#{j}" for i in range(500) for j in range(8)]
    drawn = [k for k in keys if _drawn(0, k, 0.25)]
    assert abs(len(drawn) / len(keys) - 0.25) < 0.02
    assert drawn == [k for k in reversed(keys) if _drawn(0, k, 0.25)][::-1]  # order-free
    assert drawn != [k for k in keys if _drawn(1, k, 0.25)]  # the seed decides
    assert not any(_drawn(0, k, 0.0) for k in keys)


def test_datasets_stream_the_corpus(tmp_path: Path) -> None:
    """Memory grows with the number of documents, not with the corpus text: building the
    datasets of ~12 MB of chunks allocates a small fraction of that at its peak."""
    import tracemalloc

    from sphana.datasets import run

    ingest = tmp_path / "ingest"
    ingest.mkdir()
    text = " ".join(
        f"Sentence number {k} of this passage says something long enough." for k in range(40)
    )
    chunks = [
        {
            "id": f"doc{d:04d}#{c}",
            "doc_id": f"doc{d:04d}",
            "title": f"Doc {d}",
            "section": "Body",
            "section_index": 0,
            "start": 0,
            "end": len(text),
            "n_tokens": 400,
            "text": text,
            "source": f"doc{d:04d}.md",
        }
        for d in range(1200)
        for c in range(4)
    ]
    size = write_jsonl(ingest / "chunks.jsonl", chunks).stat().st_size
    write_jsonl(ingest / "relations.jsonl", [])
    write_jsonl(ingest / "questions.jsonl", [])
    del chunks
    tracemalloc.start()
    report = run(DatasetConfig(), ingest, tmp_path / "gold", tmp_path / "out", tmp_path / "r.json")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert size > 10e6 and report["llm"]["examples"]["train"]["passage"] > 3000
    assert peak < size / 5, f"peak {peak / 1e6:.1f} MB for {size / 1e6:.1f} MB of chunks"


def test_without_relation_labels_the_extractor_is_skipped_with_the_reason(
    tmp_path: Path,
) -> None:
    from sphana.datasets import build_relation
    from sphana.io import read_skipped

    relations = write_jsonl(tmp_path / "relations.jsonl", [])
    report = build_relation(relations, {"doc00": "train"}, tmp_path / "relation")
    reason = read_skipped(tmp_path / "relation")
    assert reason == report["skipped"]
    assert "relations.jsonl" in reason and "data/README.md" in reason
    assert [p.name for p in (tmp_path / "relation").iterdir()] == ["skipped.json"]


def test_llm_examples_follow_the_document_split(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    chunks_file, questions = corpus
    rows = read(questions)
    rows[0]["answer"] = "It opens with a sentence."
    write_jsonl(questions, rows)
    corpus_ = load_corpus(
        chunks_file, resolve(chunks_file, questions), DatasetConfig(validation_fraction=0.25)
    )
    report = build_llm(corpus_, tmp_path / "llm")
    examples = {name: read(tmp_path / f"llm/{name}.jsonl") for name in ("train", "validation")}
    for name, records in examples.items():
        assert all(corpus_.split[r["doc_id"]] == name for r in records)
    passages = sum(r["kind"] == "passage" for rs in examples.values() for r in rs)
    assert passages == len(list(corpus_.chunks()))  # every passage, once
    (qa,) = [r for rs in examples.values() for r in rs if r["kind"] == "qa"]
    assert qa["text"] == "It opens with a sentence." and qa["id"] == "q0"
    assert qa["prompt"].startswith("Context: Doc 0 opens") and qa["prompt"].endswith(
        "Question: What does doc 0 open with?"
    )
    assert report["questions_without_answer"] == len(rows) - 1  # counted, not silently dropped


def test_linked_groups_and_sample_groups() -> None:
    groups = linked_groups("abcdef", [["a", "c"], ["c", "e"], ["b"]])
    assert groups == [["a", "c", "e"], ["b"], ["d"], ["f"]]
    taken = sample_groups(groups, 0.5, seed=0)
    assert len(taken) >= 3 and all(set(g) <= taken or not set(g) & taken for g in groups)
    assert sample_groups(groups, 0.0, seed=0) == set()
    assert sample_groups(groups, 0.5, seed=0) == taken  # seeded


def test_split_documents_fraction() -> None:
    split = split_documents(
        [f"d{i}" for i in range(100)], [], DatasetConfig(validation_fraction=0.2)
    )
    assert sum(v == "validation" for v in split.values()) == 20
