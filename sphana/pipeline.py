"""One function per DVC stage (the model stages share `train` and `export`, by component):
typed config in, files out. ``stages/<name>.py`` call these; tests call them directly. Paths come
only from ``cfg.paths`` (mirrored by ``dvc.yaml``)."""

from __future__ import annotations

import importlib
import json
from functools import partial
from pathlib import Path
from typing import Any

from sphana.config import SphanaConfig
from sphana.io import read_skipped, write_json_atomic, write_live_without_steps, write_skipped


def component_dir(cfg: SphanaConfig, component: str, kind: str) -> Path:
    """``<paths.artifacts>/<component>/<version>/<kind>`` (kind: pytorch | onnx)."""
    version = getattr(cfg, component).version
    return Path(cfg.paths.artifacts) / component / version / kind


def metrics_file(cfg: SphanaConfig, stage: str) -> Path:
    return Path(cfg.paths.metrics) / f"{stage}.json"


def ingest(cfg: SphanaConfig) -> dict[str, Any]:
    from sphana import ingest as ingest_lib

    return ingest_lib.run(
        cfg.ingest, Path(cfg.paths.documents), Path(cfg.paths.ingest), Path(cfg.paths.gold)
    )


def build_datasets(cfg: SphanaConfig) -> dict[str, Any]:
    from sphana import datasets

    return datasets.run(
        cfg.dataset,
        Path(cfg.paths.ingest),
        Path(cfg.paths.gold),
        Path(cfg.paths.datasets),
        metrics_file(cfg, "build_datasets"),
    )


def train(cfg: SphanaConfig, component: str) -> dict[str, Any]:
    """Stage ``train_<component>``: ``sphana.<component>.train`` on its dataset; writes its
    metrics (on rank 0 of a distributed run, the only rank that returns them). A component whose
    dataset is skipped (:func:`sphana.io.read_skipped`) is skipped too, with the same reason."""
    reason = read_skipped(Path(cfg.paths.datasets) / component)
    if reason is not None:
        return _skip(cfg, component, "pytorch", f"train_{component}", reason)
    module = importlib.import_module(f"sphana.{component}")
    metrics = module.train(
        getattr(cfg, component),
        cfg.runtime,
        cfg.paths,
        Path(cfg.paths.datasets) / component,
        component_dir(cfg, component, "pytorch"),
    )
    if metrics:
        if "predictions" in metrics:
            # one row per validation example: what `dvc plots` draws as the confusion matrix
            predictions = metrics.pop("predictions")
            write_json_atomic(metrics_file(cfg, f"train_{component}_confusion"), predictions)
        write_json_atomic(metrics_file(cfg, f"train_{component}"), metrics)
    return metrics


def export(cfg: SphanaConfig, component: str) -> dict[str, Any]:
    """Stage ``export_<component>``: ``sphana.export.<component>.run`` (ONNX, INT8, parity);
    skipped when its trained model was."""
    reason = read_skipped(component_dir(cfg, component, "pytorch"))
    if reason is not None:
        return _skip(cfg, component, "onnx", f"export_{component}", reason)
    from sphana import samples
    from sphana.manifest import component_entry

    module = importlib.import_module(f"sphana.export.{component}")
    onnx_dir = component_dir(cfg, component, "onnx")
    report = module.run(
        getattr(cfg, component),
        cfg.export,
        component_dir(cfg, component, "pytorch"),
        Path(cfg.paths.datasets) / component,
        onnx_dir,
        threads=cfg.runtime.threads,
    )
    # the parity samples ship beside the model: a server replays them before it serves a release
    version = getattr(cfg, component).version
    info = {"onnx_dir": onnx_dir, "version": version, "evaluation": {}, "parity": report}
    entry = component_entry(
        component,
        {**info, "model_config": report["model_config"]},
        cfg.release.name,
        Path(cfg.paths.artifacts),
    )
    parity = samples.from_entry(component, entry, Path(cfg.paths.artifacts))
    write_json_atomic(onnx_dir / samples.FILE_NAME, parity)
    write_json_atomic(metrics_file(cfg, f"export_{component}"), report)
    return report


def _skip(cfg: SphanaConfig, component: str, kind: str, stage: str, reason: str) -> dict:
    """Write the skip marker in place of the component's ``kind`` directory, and the stage's
    other DVC outputs (its metrics; a training stage's DVCLive metrics and plots, the relation
    confusion rows) saying so."""
    write_skipped(component_dir(cfg, component, kind), component, reason)
    metrics = {"skipped": reason}
    write_json_atomic(metrics_file(cfg, stage), metrics)
    if kind == "pytorch":
        write_live_without_steps(Path(cfg.paths.live) / stage, metrics)
        if component == "relation":
            write_json_atomic(metrics_file(cfg, f"{stage}_confusion"), [])
    return metrics


def build_graphs(cfg: SphanaConfig) -> dict[str, Any]:
    from sphana import gnn

    report = gnn.build(
        cfg.gnn.graph,
        component_dir(cfg, "embedding", "pytorch"),
        component_dir(cfg, "relation", "pytorch"),
        Path(cfg.paths.datasets),
        Path(cfg.paths.ingest),
        Path(cfg.paths.datasets) / "gnn",
        gnn.passage_pairs(cfg.ingest),
    )
    write_json_atomic(metrics_file(cfg, "build_graphs"), report)
    return report


def _onnx_model(cfg: SphanaConfig, component: str, settings: Any) -> Any:
    """The exported fp32 model of ``component`` in an ONNX Runtime session, as a server holds it
    (:class:`sphana.serving.engine.Model`)."""
    from sphana.serving.engine import Model

    report = json.loads(metrics_file(cfg, f"export_{component}").read_text(encoding="utf-8"))
    path = component_dir(cfg, component, "onnx") / report["files"]["fp32"]
    version = getattr(cfg, component).version
    return Model(component, version, "fp32", path, report["model_config"], settings.session(path))


def index(cfg: SphanaConfig) -> dict[str, Any]:
    """Stage ``index``: every chunk with its vector by the exported embedding model and its
    candidate pairs and relations by the exported relation extractor (:mod:`sphana.index`)."""
    from sphana import index as index_lib
    from sphana.entities import detect, load_parser
    from sphana.errors import SphanaError
    from sphana.serving.engine import Embedder, RelationExtractor, SessionSettings

    reason = read_skipped(component_dir(cfg, "embedding", "onnx"))
    if reason is not None:
        raise SphanaError(f"index: no embedding model to index the corpus with ({reason})")
    settings = SessionSettings(intra_op_threads=cfg.runtime.threads)
    embedding = _onnx_model(cfg, "embedding", settings)
    embedder = Embedder(embedding, embedding.path.parent)
    extractor = None
    if read_skipped(component_dir(cfg, "relation", "onnx")) is None:
        relation = _onnx_model(cfg, "relation", settings)
        extractor = RelationExtractor(relation, relation.path.parent)
    parser = load_parser(cfg.ingest.parser, cfg.ingest.spacy_model)
    report = index_lib.build(
        Path(cfg.paths.ingest) / "chunks.jsonl",
        Path(cfg.paths.artifacts) / "index",
        embed=embedder.run,
        embedding_file=embedding.path,
        embedding_rel=embedding.path.relative_to(cfg.paths.artifacts).as_posix(),
        candidates=partial(detect, max_pair_chars=cfg.ingest.max_pair_chars, parser=parser),
        relations=None if extractor is None else (lambda pairs: extractor.score(pairs)[1]),
        batch_size=cfg.index.batch_size,
        approximate_above=cfg.index.approximate_above,
        hnsw_m=cfg.index.hnsw_m,
        ef_search=cfg.index.ef_search,
    )
    write_json_atomic(metrics_file(cfg, "index"), report)
    return report


def gold_questions(cfg: SphanaConfig) -> list[dict[str, Any]]:
    """The corpus's gold questions as ``ingest`` resolved them (none on a corpus without)."""
    from sphana.io import load_jsonl

    questions_file = Path(cfg.paths.ingest) / "questions.jsonl"
    return load_jsonl(questions_file) if questions_file.is_file() else []


def held_out_questions(cfg: SphanaConfig) -> list[dict[str, Any]]:
    """The graph ranker's validation queries (gold questions, or pseudo-queries on a corpus
    without them) with their relevant passages, and the gold answer where there is one."""
    from sphana.graph_inputs import first_stage_rank
    from sphana.io import load_jsonl

    answers = {q["id"]: q.get("answer") for q in gold_questions(cfg)}
    out = []
    for q in load_jsonl(Path(cfg.paths.datasets) / "gnn" / "validation.jsonl"):
        relevant = {c["id"]: float(c["label"]) for c in q["candidates"] if c["label"] > 0}
        out.append(
            {
                "id": q["query_id"],
                "query": q["query"],
                "relevant": relevant,
                "answer": answers.get(q["query_id"]),
                # the ranker's own candidate list: passage, first-stage rank (a node feature)
                "candidates": [
                    (c["id"], first_stage_rank(c), float(c["label"])) for c in q["candidates"]
                ],
            }
        )
    return out


def evaluate(cfg: SphanaConfig) -> dict[str, Any]:
    """Stage ``evaluate``: the built release answers the held-out questions end to end
    (:func:`sphana.query.evaluate`) at each precision of ``evaluate.precisions``."""
    from sphana import manifest as manifest_lib
    from sphana import query
    from sphana.serving.engine import Engine, SessionSettings

    manifest_file = Path(cfg.paths.manifests) / "latest.json"
    artifacts = Path(cfg.paths.artifacts)
    release = manifest_lib.checked(manifest_file, artifacts)
    held_out = held_out_questions(cfg)
    questions = held_out[: cfg.evaluate.max_questions or None]
    options = query.QueryOptions(
        candidates=cfg.evaluate.candidates, context_passages=cfg.evaluate.context_passages
    )
    settings = SessionSettings(intra_op_threads=cfg.runtime.threads)
    report: dict[str, Any] = {"questions": len(questions)}
    for precision in cfg.evaluate.precisions:
        engine = Engine(
            release, artifacts, dict.fromkeys(release["components"], precision), settings
        )
        skipped = unavailable(engine, precision)
        if skipped:
            report[precision] = {"skipped": skipped}
            continue
        report[precision] = query.evaluate(engine, questions, options)
        if "gnn" in engine.models:
            # every held-out question: the ranker's own validation set
            report[precision]["ranker_on_its_candidates"] = query.rerank_candidates(
                engine, held_out
            )
    report["ranker_validation"] = json.loads(
        metrics_file(cfg, "train_gnn").read_text(encoding="utf-8")
    ).get("validation")
    write_json_atomic(metrics_file(cfg, "evaluate"), report)
    return report


def unavailable(engine: Any, precision: str) -> str | None:
    """Why a loaded release cannot be evaluated at ``precision``, or None: ``int4`` needs the
    generator's 4-bit file (the engine would serve INT8 in its place)."""
    generator = engine.models.get("llm")
    if precision == "int4" and (generator is None or generator.precision != "int4"):
        return (
            "the release has no 4-bit generator: export_llm left it out (its report says why) "
            "or export.llm_int4_block_size is 0"
        )
    return None


def int4_evaluation(report: dict[str, Any]) -> dict[str, Any]:
    """The generator's 4-bit sibling in its evaluation, when the export shipped one."""
    int4 = report.get("int4")  # none in an export report written before 4-bit existed
    if not int4 or not int4["passed"]:
        return {}
    return {
        "onnx_int4_validation": int4["metrics"],
        "int4_token_agreement": int4["token_agreement"],
    }


def answer_evaluation(train: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The generator's answers to the validation questions (gold passage as context): the
    pretrained base model before fine-tuning, the shipped PyTorch model and each ONNX file."""
    found = {
        "base_answers": (train.get("base_validation") or {}).get("answers"),
        "answers": train["validation"].get("answers"),
        **{
            f"onnx_{kind}_answers": (report.get(kind) or {}).get("answers")
            for kind in ("fp32", "int8", "int4")
            if kind != "int4" or (report.get("int4") or {}).get("passed")
        },
    }
    return {key: value for key, value in found.items() if value}


def _component_metrics(component: str, train: dict[str, Any], report: dict[str, Any]) -> dict:
    """What the manifest says about a component's quality (from its train and export metrics)."""
    if component == "embedding":
        return {
            "validation": train["fine_tuned"],
            "base_validation": train["base"],
            "onnx_int8_validation": report["int8"]["metrics"],
        }
    if component == "gnn":
        return {
            "validation": train["validation"],
            "baseline_embedding_similarity": train["baseline_embedding_similarity"],
            "onnx_fp32_validation": report["fp32"]["metrics"],
            "onnx_int8_validation": report["int8"]["metrics"] if report["int8"]["kept"] else None,
        }
    if component == "llm":
        return {
            "validation": train["validation"],
            "onnx_fp32_validation": report["fp32"]["metrics"],
            "onnx_int8_validation": report["int8"]["metrics"],
            "int8_token_agreement": report["int8"]["token_agreement"],
            **int4_evaluation(report),
            **answer_evaluation(train, report),
        }
    return {
        "validation": {k: train["validation"][k] for k in ("macro_f1", "accuracy")},
        "per_class": train["validation"]["per_class"],
        "baselines": train["baselines"],
        "onnx_fp32_validation": report["fp32"]["metrics"],
        "onnx_int8_validation": report["int8"]["metrics"],
    }


def manifest(cfg: SphanaConfig, lock_file: Path = Path("dvc.lock")) -> dict[str, Any]:
    from sphana import manifest as manifest_lib

    components, skipped = {}, {}
    for component in cfg.release.components:
        reason = read_skipped(component_dir(cfg, component, "onnx"))
        if reason is not None:
            skipped[component] = {"reason": reason}
            continue
        train = json.loads(metrics_file(cfg, f"train_{component}").read_text(encoding="utf-8"))
        report = json.loads(metrics_file(cfg, f"export_{component}").read_text(encoding="utf-8"))
        components[component] = {
            "onnx_dir": component_dir(cfg, component, "onnx"),
            "version": getattr(cfg, component).version,
            # nested as it is under `evaluation`; manifest.build flattens it into `metrics`
            "evaluation": _component_metrics(component, train, report),
            "parity": report,
            "model_config": report["model_config"],
        }
    ingest_report = Path(cfg.paths.ingest) / "report.json"
    result = manifest_lib.build(
        name=cfg.release.name,
        version=cfg.release.version,
        components=components,
        skipped=skipped,
        gold=json.loads(ingest_report.read_text(encoding="utf-8"))["gold"],
        artifacts_root=Path(cfg.paths.artifacts),
        lock_file=lock_file,
        data_paths=[cfg.paths.data],
        min_onnxruntime=cfg.release.min_onnxruntime,
        index=_index_part(cfg, components),
    )
    manifest_lib.write(result, Path(cfg.paths.manifests) / "latest.json")
    return result


def _index_part(cfg: SphanaConfig, components: dict[str, Any]) -> dict[str, Any] | None:
    """The corpus index, where the release ships the embedding model that made it."""
    index_dir = Path(cfg.paths.artifacts) / "index"
    if "embedding" not in components or not index_dir.is_dir():
        return None
    return {"dir": index_dir, "version": cfg.embedding.version}


def package(cfg: SphanaConfig) -> dict[str, Any]:
    from sphana import manifest as manifest_lib
    from sphana.errors import VerifyError

    manifest_file = Path(cfg.paths.manifests) / "latest.json"
    artifacts = Path(cfg.paths.artifacts)
    manifest = manifest_lib.checked(manifest_file, artifacts)  # every file hashed once
    if manifest["version"] != cfg.release.version:
        raise VerifyError(
            f"{manifest_file}: version {manifest['version']} != release.version "
            f"{cfg.release.version}; rerun the manifest stage"
        )
    tarball = Path(cfg.paths.manifests) / "latest.tar.gz"
    members = manifest_lib.package(manifest, manifest_file, artifacts, tarball)
    bundles = manifest_lib.write_bundles(manifest, artifacts, Path(cfg.paths.bundles))
    return {"members": members, "bundles": bundles}


STAGES = {
    "ingest": ingest,
    "build_datasets": build_datasets,
    "train_embedding": partial(train, component="embedding"),
    "export_embedding": partial(export, component="embedding"),
    "train_relation": partial(train, component="relation"),
    "export_relation": partial(export, component="relation"),
    "build_graphs": build_graphs,
    "train_gnn": partial(train, component="gnn"),
    "export_gnn": partial(export, component="gnn"),
    "train_llm": partial(train, component="llm"),
    "export_llm": partial(export, component="llm"),
    "index": index,
    "manifest": manifest,
    "package": package,
    "evaluate": evaluate,
}
