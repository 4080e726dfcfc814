"""A user's own corpus: documents only, no gold annotations, built end to end by `dvc repro`.

The documents are real text nobody here wrote (standard-library docstrings, see
``conftest.stdlib_documents``). Every signal is derived from them; the relation extractor, which
only learns from labelled pairs, is skipped, and the release says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import commit_all, copy_repo, dvc, sphana, stdlib_documents, use_tiny_configs
from test_pipeline_e2e import ALL_STAGES, assert_ran


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of this repository whose data/ holds only the user's documents, built with the
    tiny configs: (path, DVC's output)."""
    repo = copy_repo(tmp_path_factory.mktemp("own_corpus"))
    shutil.rmtree(repo / "data")
    assert stdlib_documents(repo / "data/documents")
    commit_all(repo, "my own documents, no annotations")
    use_tiny_configs(repo)
    proc = dvc("repro", cwd=repo)
    return repo, proc.stdout + proc.stderr


def test_the_whole_build_runs_without_gold(repo: tuple[Path, str]) -> None:
    path, output = repo
    assert_ran(output, ALL_STAGES)
    report = json.loads((path / "target/ingest/report.json").read_text())
    assert report["gold"]["questions"]["present"] is False
    assert report["gold"]["relations"]["present"] is False
    assert report["gold"]["signals"]["gnn"] == "pseudo-queries from the documents"
    assert (path / "target/ingest/questions.jsonl").read_text() == ""
    # the second run finds everything up to date
    assert_ran(dvc("repro", cwd=path), [])


def test_release_lists_built_and_skipped_components(repo: tuple[Path, str]) -> None:
    path, _ = repo
    manifest = json.loads((path / "target/manifests/latest.json").read_text())
    assert sorted(manifest["components"]) == ["embedding", "gnn", "llm"]
    reason = manifest["skipped_components"]["relation"]["reason"]
    assert "relations.jsonl" in reason and "data/README.md" in reason
    signals = manifest["training_signals"]["signals"]
    assert signals["relation"].startswith("none") and signals["llm"] == "passages only"
    # the graph ranker degrades to entity nodes only, and says so to runtimes
    gnn = manifest["components"]["gnn"]["model_config"]
    assert gnn["relation_nodes"] is False
    assert gnn["queries"] == {"train": "pseudo-queries", "validation": "pseudo-queries"}
    sphana("verify", "target/manifests/latest.json", "--lock", "dvc.lock", cwd=path)
    sphana("verify", "target/manifests/latest.tar.gz", cwd=path)
    bundles = sorted(p.name for p in (path / "target/bundles").iterdir())
    assert bundles == ["embedding", "gnn", "llm"]
    for name in bundles:
        sphana("verify", f"target/bundles/{name}", cwd=path)
    assert "skipped" in json.loads((path / "target/metrics/train_relation.json").read_text())


def test_graphs_hold_no_relation_nodes_and_train_on_pseudo_queries(
    repo: tuple[Path, str],
) -> None:
    path, _ = repo
    relation_node = 3  # node-type one-hot: passage, query, entity, relation (sphana.gnn)
    for split in ("train", "validation"):
        lines = (path / f"target/datasets/gnn/{split}.jsonl").read_text().splitlines()
        queries = [json.loads(line) for line in lines]
        assert queries
        for q in queries:
            assert any(c["label"] == 1.0 for c in q["candidates"]) or split == "validation"
            for c in q["candidates"]:
                dim = len(c["node_features"][0])
                onehot = dim - 7 + relation_node  # features end: 4 one-hot, cosine, named, rank
                assert all(node[onehot] == 0.0 for node in c["node_features"])
    metrics = json.loads((path / "target/metrics/train_embedding.json").read_text())
    assert metrics["validation"]["queries"] > 0


def test_adding_gold_later_reruns_from_ingest(repo: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = repo
    params = yaml.safe_load((path / "params.yaml").read_text())
    gold = path / params["paths"]["gold"]
    gold.mkdir(parents=True)
    (gold / "questions.jsonl").write_text("", encoding="utf-8")
    status = dvc("status", "--json", cwd=path).stdout
    assert "ingest" in json.loads(status)


@pytest.mark.parametrize("kind", ["questions", "relations"])
def test_gold_of_one_kind_only(kind: str, tmp_path: Path) -> None:
    """Questions only: the relation extractor is skipped, the rest learns from the questions.
    Relation labels only: the extractor trains, the graph ranker uses pseudo-queries and the
    generator passages."""
    from conftest import REPO, tiny_config

    from sphana import pipeline
    from sphana.io import load_jsonl, read_skipped

    data = tmp_path / "data"
    shutil.copytree(REPO / "data/documents", data / "documents")
    (data / "gold").mkdir()
    shutil.copy(REPO / f"data/gold/{kind}.jsonl", data / "gold")
    cfg = tiny_config(tmp_path)
    cfg.paths.data, cfg.paths.documents, cfg.paths.gold = (
        str(data),
        str(data / "documents"),
        str(data / "gold"),
    )
    signals = pipeline.ingest(cfg)["gold"]["signals"]
    report = pipeline.build_datasets(cfg)
    datasets = Path(cfg.paths.datasets)
    held_out = load_jsonl(datasets / "embedding/held_out.jsonl")
    if kind == "questions":
        assert signals["gnn"] == "gold questions" and signals["relation"].startswith("none")
        assert read_skipped(datasets / "relation") == report["relation"]["skipped"]
        assert str(data / "gold/relations.jsonl") in report["relation"]["skipped"]
        assert {r["kind"] for r in held_out} == {"gold"}
        assert report["llm"]["examples"]["train"]["qa"] > 0
    else:
        assert signals == {
            "embedding": signals["embedding"],
            "gnn": "pseudo-queries from the documents",
            "relation": "gold relation labels",
            "llm": "passages only",
        }
        assert read_skipped(datasets / "relation") is None
        assert report["relation"]["examples"]["train"] > 0
        assert held_out and {r["kind"] for r in held_out} <= {"heading", "sentence"}
        assert report["llm"]["examples"]["train"]["qa"] == 0
