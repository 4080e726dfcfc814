"""Data contracts: the schemas, the semantic checks, ``sphana validate`` and ``sphana stats``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from sphana import contracts
from sphana.cli import main
from sphana.errors import ConfigError, InputError

SENTENCE = "Marie Curie was born in Warsaw."  # Marie Curie: [0, 11), Warsaw: [24, 30)


def entity(text: str, start: int, type_: str | None = "PER") -> dict[str, Any]:
    return {"text": text, "start": start, "end": start + len(text), "type": type_}


def candidate(nodes: int = 2, edges: list[list[int]] | None = None) -> dict[str, Any]:
    edges = [[0, 1]] if edges is None else edges
    return {
        "id": "c",
        "node_features": [[0.5, 1.0]] * nodes,
        "edge_index": edges,
        "edge_directions": [1] * len(edges),
        "label": 1.0,
    }


VALID: dict[str, dict[str, Any]] = {
    "chunks": {
        "id": "doc1#0",
        "doc_id": "doc1",
        "title": "Curie",
        "section": "Life",
        "section_index": 0,
        "start": 0,
        "end": 31,
        "n_tokens": 8,
        "text": SENTENCE,
        "source": "doc1.md",
    },
    "relations": {
        "id": "r1",
        "doc_id": "doc1",
        "section": "Life",
        "section_index": 2,
        "sentence": {"start": 100, "end": 131, "text": SENTENCE},
        "e1": entity("Marie Curie", 100),
        "e2": entity("Warsaw", 124, None),
        "label": None,
        "gold_id": None,
        "detected": True,
    },
    "embedding": {
        "query_id": "q1",
        "query": "Where was Marie Curie born?",
        "positive": SENTENCE,
        "positive_id": "doc1#0",
        "relevant_ids": ["doc1#0"],
        "doc_id": "doc1",
        "kind": "gold",
    },
    "embedding_corpus": {"id": "doc1#0", "doc_id": "doc1", "text": SENTENCE},
    "relation": {
        "id": "x1",
        "doc_id": "doc1",
        "text": SENTENCE,
        "entity1": entity("Marie Curie", 0),
        "entity2": entity("Warsaw", 24, "LOC"),
        "label": "born_in",
    },
    "gnn": {
        "query_id": "q1",
        "query": "Where was Marie Curie born?",
        "candidates": [candidate(), candidate(nodes=1, edges=[])],
    },
    "llm": {"id": "l1", "doc_id": "doc1", "kind": "qa", "prompt": "Q: Where?", "text": "Warsaw"},
}

MANIFEST = {
    "schema_version": 1,
    "name": "sphana",
    "version": "0.1.0",
    "created_at": "2025-01-01T00:00:00+00:00",
    "components": {
        "embedding": {
            "version": "0.1.0",
            "path": "embedding/model.int8.onnx",
            "checksum": "sha256:" + "0" * 64,
            "metrics": {},
            "model_config": {"quantized": True},
            "files": [
                {"path": "embedding/model.int8.onnx", "size": 1, "sha256": "sha256:" + "0" * 64}
            ],
            "parity": {},
            "signature": {
                "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}],
                "outputs": [{"name": "embedding", "dtype": "float32", "shape": ["batch", 384]}],
            },
        }
    },
    "skipped_components": {},
    "training_signals": {"questions": {}, "relations": {}, "signals": {}},
    "system_requirements": {"onnxruntime": ">=1.20"},
    "provenance": {"git_commit": None, "stages": {}},
}


def write_lines(path: Path, lines: list[Any]) -> Path:
    """Records are dumped as JSON; strings are written as they are (blank or broken lines)."""
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
        encoding="utf-8",
    )
    return path


def changed(kind: str, **fields: Any) -> dict[str, Any]:
    record = copy.deepcopy(VALID[kind])
    record.update(fields)
    return record


@pytest.mark.parametrize("kind", sorted(contracts.KINDS))
def test_every_schema_is_a_valid_draft_2020_12_schema(kind: str) -> None:
    schema = contracts.schema(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(contracts.KINDS[kind])


def test_unknown_kind_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known kinds: chunks, relations"):
        contracts.schema("nope")


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_records_pass(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    second = changed(kind, id="two") if kind in contracts.UNIQUE_ID_KINDS else VALID[kind]
    path = write_lines(tmp_path / f"{kind}.jsonl", [VALID[kind], "", second])
    assert contracts.validate_file(path, kind) == (2, [])
    assert main(["validate", str(path), "--type", kind]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"OK {path}: 2 records match the {kind} schema" in captured.err


def test_bad_relation_lines_are_reported_with_their_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = changed("relation")
    del missing["label"]
    lines = [
        VALID["relation"],  # 1
        missing,  # 2
        changed("relation", text=5),  # 3: wrong type
        changed("relation", entity1={**entity("Marie Curie", 0), "start": -1}),  # 4
        "",  # 5: blank, skipped
        changed("relation", entity2=entity("Warsow", 24)),  # 6: text/offset mismatch
        changed("relation", entity2=entity("Curie", 6)),  # 7: overlaps entity1
        '{"id": "x8", ',  # 8: invalid JSON
        changed("relation", entity2={**entity("Warsaw", 24), "end": 20}),  # 9: end < start
    ]
    path = write_lines(tmp_path / "relation.jsonl", lines)
    checked, found = contracts.validate_file(path, "relation")
    assert checked == 8
    assert [(v.line, v.path) for v in found] == [
        (2, "$"),
        (3, "$.text"),
        (4, "$.entity1.start"),
        (6, "$.entity2.text"),
        (7, "$.entity2"),
        (8, "$"),
        (9, "$.entity2.end"),
    ]
    assert str(found[0]) == "line 2: $: 'label' is a required property"
    assert str(found[2]) == "line 4: $.entity1.start: -1 is less than the minimum of 0"
    assert "'Warsow' but text[24:30] is 'Warsaw'" in found[3].message
    assert "overlaps entity1 [0, 11)" in found[4].message
    assert found[5].message.startswith("invalid JSON")

    assert main(["validate", str(path), "--type", "relation"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}:2: $: 'label' is a required property"
    assert out[2] == f"{path}:4: $.entity1.start: -1 is less than the minimum of 0"
    assert len(out) == len(found)


def test_relations_entities_must_lie_in_their_sentence(tmp_path: Path) -> None:
    lines = [
        VALID["relations"],
        changed("relations", e1=entity("Marie", 101)),  # the sentence has "arie " there
        changed("relations", e2=entity("Warsaw.", 124 + 10)),  # past the sentence end
        changed("relations", sentence={"start": 100, "end": 120, "text": SENTENCE}),
        changed("relations", label=""),
    ]
    path = write_lines(tmp_path / "relations.jsonl", lines)
    _, found = contracts.validate_file(path, "relations")
    assert [(v.line, v.path) for v in found] == [
        (2, "$.e1.text"),
        (3, "$.e2"),
        (4, "$.sentence.text"),
        (4, "$.e2"),
        (5, "$.label"),
    ]


def test_duplicate_ids_name_the_first_line(tmp_path: Path) -> None:
    corpus = VALID["embedding_corpus"]
    lines = [corpus, changed("embedding_corpus", id="b"), corpus]
    path = write_lines(tmp_path / "corpus.jsonl", lines)
    _, found = contracts.validate_file(path, "embedding_corpus")
    assert [str(v) for v in found] == ["line 3: $.id: duplicate id 'doc1#0' (first on line 1)"]


def test_gnn_edges_must_name_existing_nodes(tmp_path: Path) -> None:
    ragged = candidate()
    ragged["node_features"] = [[0.5, 1.0], [0.5]]
    bad_directions = candidate()
    bad_directions["edge_directions"] = []
    lines = [
        VALID["gnn"],
        changed("gnn", candidates=[candidate(), candidate(nodes=2, edges=[[0, 1], [1, 2]])]),
        changed("gnn", candidates=[ragged, bad_directions]),
        changed("gnn", candidates=[]),
    ]
    path = write_lines(tmp_path / "gnn.jsonl", lines)
    _, found = contracts.validate_file(path, "gnn")
    assert [(v.line, v.path) for v in found] == [
        (2, "$.candidates[1].edge_index[1]"),
        (3, "$.candidates[0].node_features"),
        (3, "$.candidates[1].edge_directions"),
        (4, "$.candidates"),
    ]
    assert "edge [1, 2] names a node >= 2" in found[0].message


def test_validate_exits_1_as_a_subprocess(tmp_path: Path) -> None:
    lines = [VALID["chunks"], changed("chunks", id="b", start=-3)]
    path = write_lines(tmp_path / "chunks.jsonl", lines)
    result = subprocess.run(
        [sys.executable, "-m", "sphana.cli", "validate", str(path), "--type", "chunks"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stdout == f"{path}:2: $.start: -3 is less than the minimum of 0\n"
    assert "1 violation(s) in 1 of 2 records" in result.stderr


def test_validate_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        contracts.validate_file(tmp_path / "absent.jsonl", "chunks")
    assert main(["validate", str(tmp_path / "absent.jsonl"), "--type", "chunks"]) == 1


def test_check_records_names_the_line_and_blames_the_producer(tmp_path: Path) -> None:
    records = [VALID["llm"], VALID["llm"], {**VALID["llm"], "kind": "poem"}]
    contracts.check_records(records[:2], "llm", tmp_path / "train.jsonl")
    with pytest.raises(InputError) as info:
        contracts.check_records(records, "llm", tmp_path / "train.jsonl")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'train.jsonl'}: refusing to write 3 records")
    assert "line 3: $.kind: 'poem' is not one of ['passage', 'qa']" in message
    assert "bug in the code that produces this file" in message


def test_check_records_lists_ten_and_counts_the_rest(tmp_path: Path) -> None:
    records = [{**VALID["llm"], "text": ""} for _ in range(12)]
    with pytest.raises(InputError, match=r"12 violation\(s\)") as info:
        contracts.check_records(records, "llm", tmp_path / "x.jsonl")
    assert "line 10: $.text" in str(info.value)
    assert "line 11:" not in str(info.value)
    assert "... and 2 more" in str(info.value)


def test_stats_counts_and_nearest_rank_percentiles(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = [("passage", "", "a"), ("qa", "Q?", "bb"), ("passage", "", "ccc")]
    rows += [("qa", "Why?", "dddd"), ("passage", "", "e" * 10)]
    lines: list[Any] = [
        {"id": str(i), "doc_id": "d", "kind": k, "prompt": p, "text": t}
        for i, (k, p, t) in enumerate(rows)
    ]
    path = write_lines(tmp_path / "llm.jsonl", [*lines[:2], "", *lines[2:]])
    assert contracts.stats(path) == {
        "records": 5,
        "fields": ["doc_id", "id", "kind", "prompt", "text"],
        "distributions": {"kind": {"passage": 3, "qa": 2}},
        "lengths": {
            # prompt lengths sorted: 0 0 0 2 4; text lengths: 1 2 3 4 10
            "prompt": {"p50": 0, "p90": 4, "p99": 4, "max": 4, "mean": 1.2},
            "text": {"p50": 3, "p90": 10, "p99": 10, "max": 10, "mean": 4.0},
        },
    }
    assert main(["stats", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == contracts.stats(path)
    assert main(["stats", str(path)]) == 0
    table = capsys.readouterr().out
    assert "5 records" in table and "passage" in table and "60.0%" in table


def test_stats_of_labels_and_gnn_candidates(tmp_path: Path) -> None:
    labels = ["b", "a", "b", "a", "c"]
    path = write_lines(tmp_path / "r.jsonl", [changed("relation", label=x) for x in labels])
    assert contracts.stats(path)["distributions"] == {"label": {"a": 2, "b": 2, "c": 1}}
    sizes = [1, 3, 2, 2]
    path = write_lines(
        tmp_path / "gnn.jsonl", [changed("gnn", candidates=[candidate()] * n) for n in sizes]
    )
    result = contracts.stats(path)
    assert result["distributions"] == {}
    assert result["lengths"]["candidates"] == {
        "p50": 2,
        "p90": 3,
        "p99": 3,
        "max": 3,
        "mean": 2.0,
    }
    assert result["lengths"]["query"]["max"] == len(VALID["gnn"]["query"])


def test_stats_refuses_bad_json_with_its_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl", [VALID["llm"], "not json"])
    with pytest.raises(InputError, match=r"x\.jsonl:2: invalid JSON"):
        contracts.stats(path)


def test_manifest_kind_validates_one_json_document(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(MANIFEST, indent=2), encoding="utf-8")
    assert contracts.validate_file(path, "manifest") == (1, [])
    path.write_text(json.dumps({**MANIFEST, "version": "one"}, indent=2), encoding="utf-8")
    _, found = contracts.validate_file(path, "manifest")
    assert [(v.line, v.path) for v in found] == [(None, "$.version")]
    assert str(found[0]).startswith("$.version: 'one' does not match")
    path.write_text('{\n  "name": \n}', encoding="utf-8")
    _, found = contracts.validate_file(path, "manifest")
    assert [(v.line, v.path) for v in found] == [(3, "$")]
