"""The consumer contract: the release manifest keeps every field the existing .NET consumer reads
(``sphana/schemas/consumer_manifest.schema.json``, from the consumer's example manifest), with
its name and type, next to Sphana's own fields."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import tiny_config

from sphana import manifest as manifest_lib
from sphana import pipeline
from sphana.errors import VerifyError

# The consumer's example manifest (its README: "values are illustrative; names and types are the
# contract"), verbatim; `test_example_copy_is_current` compares it with the shared original.
EXAMPLE_FILE = Path(
    os.environ.get("SPHANA_CONSUMER_EXAMPLE", "/work/shared/consumer/manifest.example.json")
)
EXAMPLE_TEXT = """{
  "version": "1.0.0",
  "created_at": "2026-01-15T10:30:00Z",
  "components": {
    "embedding": {
      "version": "0.1.0",
      "path": "embedding/0.1.0/onnx/embedding.onnx",
      "checksum": "sha256:<64 hex digits>",
      "metrics": {"val_cosine_sim": 0.87},
      "model_config": {"base_model": "sentence-transformers/all-MiniLM-L6-v2", \
"output_dimension": 384, "quantized": true}
    },
    "relation": {
      "version": "0.1.0",
      "path": "relation/0.1.0/onnx/relation_extraction.onnx",
      "checksum": "sha256:<64 hex digits>",
      "metrics": {"val_macro_f1": 0.75},
      "model_config": {"base_model": "<base model id>", "num_labels": 14, "quantized": true}
    },
    "gnn": {
      "version": "0.1.0",
      "path": "gnn/0.1.0/onnx/gnn_ranker.onnx",
      "checksum": "sha256:<64 hex digits>",
      "metrics": {"val_ndcg_at_10": 0.81},
      "model_config": {"hidden_dim": 128, "num_layers": 3, "quantized": false}
    },
    "llm": {
      "version": "0.1.0",
      "path": "llm/0.1.0/onnx/llm_generator.onnx",
      "checksum": "sha256:<64 hex digits>",
      "model_config": {"model_name": "<model id>", "max_seq_length": 2048, "quantized": true}
    }
  },
  "system_requirements": {"onnx_runtime": ">=1.20.0", "cuda": ">=12.0", "cudnn": ">=9.0"}
}
"""
FILE_NAMES = {
    "embedding": "embedding.onnx",
    "relation": "relation_extraction.onnx",
    "gnn": "gnn_ranker.onnx",
    "llm": "llm_generator.onnx",
}


def consumer_errors(manifest: dict[str, Any]) -> list[jsonschema.ValidationError]:
    validator = jsonschema.Draft202012Validator(manifest_lib.consumer_schema())
    return list(validator.iter_errors(manifest))


def sphana_errors(manifest: dict[str, Any]) -> list[jsonschema.ValidationError]:
    return list(jsonschema.Draft202012Validator(manifest_lib.schema()).iter_errors(manifest))


def filled(value: Any) -> Any:
    """The example with its ``<...>`` placeholders replaced by values of their kind."""
    if isinstance(value, dict):
        return {k: filled(v) for k, v in value.items()}
    if isinstance(value, list):
        return [filled(v) for v in value]
    if isinstance(value, str) and "<" in value:
        if value.startswith("sha256:"):
            return "sha256:" + "0123456789abcdef" * 4
        return re.sub(r"<[^>]+>", "org/model-id", value)
    return value


def example() -> dict[str, Any]:
    return filled(json.loads(EXAMPLE_TEXT))


# --- the schema itself ----------------------------------------------------------------------


def test_schemas_are_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(manifest_lib.consumer_schema())
    jsonschema.Draft202012Validator.check_schema(manifest_lib.schema())
    assert manifest_lib.consumer_schema()["$schema"].endswith("/draft/2020-12/schema")


def test_consumer_schema_accepts_the_consumers_example() -> None:
    assert consumer_errors(example()) == []


@pytest.mark.skipif(not EXAMPLE_FILE.is_file(), reason=f"{EXAMPLE_FILE} is not on this machine")
def test_example_copy_is_current() -> None:
    shared = json.loads(EXAMPLE_FILE.read_text(encoding="utf-8"))
    assert shared == json.loads(EXAMPLE_TEXT)
    assert consumer_errors(filled(shared)) == []


def _set(manifest: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split("/")
    node = manifest
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()
EMB = "components/embedding"
# (what changes, where the consumer schema must point): the old Sphana shapes, and wrong types
# under the consumer's names
BROKEN = {
    "nested metrics (Sphana's old layout)": (
        {f"{EMB}/metrics": {"validation": {"mean_cosine": 0.87}, "base_validation": {}}},
        f"{EMB}/metrics",
    ),
    "a nested object beside the consumer's metric": (
        {f"{EMB}/metrics": {"val_cosine_sim": 0.87, "validation": {"recall@5": 0.9}}},
        f"{EMB}/metrics/validation",
    ),
    "a metric as a string": (
        {f"{EMB}/metrics/val_cosine_sim": "0.87"},
        f"{EMB}/metrics/val_cosine_sim",
    ),
    "a metric as a boolean": (
        {"components/gnn/metrics/val_ndcg_at_10": True},
        "components/gnn/metrics/val_ndcg_at_10",
    ),
    "relation without metrics": ({"components/relation/metrics": _DELETE}, "components/relation"),
    "gnn metrics without val_ndcg_at_10": (
        {"components/gnn/metrics": {"val_ndcg@10": 0.81}},
        "components/gnn/metrics",
    ),
    "dimension only": (
        {
            f"{EMB}/model_config": {
                "base_model": "sentence-transformers/all-MiniLM-L6-v2",
                "dimension": 384,
                "quantized": True,
            }
        },
        f"{EMB}/model_config",
    ),
    "output_dimension as a string": (
        {f"{EMB}/model_config/output_dimension": "384"},
        f"{EMB}/model_config/output_dimension",
    ),
    "quantized as a string": (
        {f"{EMB}/model_config/quantized": "true"},
        f"{EMB}/model_config/quantized",
    ),
    "embedding base_model null": (
        {f"{EMB}/model_config/base_model": None},
        f"{EMB}/model_config/base_model",
    ),
    "llm model_name null": (
        {"components/llm/model_config/model_name": None},
        "components/llm/model_config/model_name",
    ),
    "relation without num_labels": (
        {"components/relation/model_config/num_labels": _DELETE},
        "components/relation/model_config",
    ),
    "gnn with hidden and layers only (Sphana's names)": (
        {"components/gnn/model_config": {"hidden": 128, "layers": 3, "quantized": False}},
        "components/gnn/model_config",
    ),
    "llm with base_model only (Sphana's name)": (
        {
            "components/llm/model_config": {
                "base_model": "m",
                "max_seq_length": 2048,
                "quantized": True,
            }
        },
        "components/llm/model_config",
    ),
    "onnxruntime only (Sphana's old system_requirements)": (
        {
            "system_requirements": {
                "onnxruntime": ">=1.17",
                "opset": 17,
                "execution_providers": ["CPUExecutionProvider"],
            }
        },
        "system_requirements",
    ),
    "onnx_runtime as a number": (
        {"system_requirements/onnx_runtime": 1.2},
        "system_requirements/onnx_runtime",
    ),
    "a checksum without its sha256: prefix": ({f"{EMB}/checksum": "ab" * 32}, f"{EMB}/checksum"),
    "a path that is not an ONNX file": ({f"{EMB}/path": "embedding/0.1.0/onnx"}, f"{EMB}/path"),
    "an absolute path": ({f"{EMB}/path": "/srv/embedding.onnx"}, f"{EMB}/path"),
    "created_at without a time zone": ({"created_at": "2026-01-15T10:30:00"}, "created_at"),
    "no components": ({"components": {}}, "components"),
    "no version": ({"version": _DELETE}, ""),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_consumer_schema_rejects_what_the_consumer_cannot_read(case: str) -> None:
    changes, where = BROKEN[case]
    manifest = example()
    for path, value in changes.items():
        _set(manifest, path, value)
    errors = consumer_errors(manifest)
    assert errors, f"{case}: accepted"
    assert where in {"/".join(map(str, e.absolute_path)) for e in errors}, [
        ("/".join(map(str, e.absolute_path)), e.message) for e in errors
    ]


# --- manifests built by sphana.manifest.build -------------------------------------------------


def _onnx(path: Path, output: str) -> None:
    """A real (tiny) ONNX model: ``features`` float32 [batch, 4] -> MatMul -> ``output``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(
        np.arange(32, dtype=np.float32).reshape(4, 8) / 32, name="weight"
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "weight"], [output])],
        "tiny",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", 8])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _parity(metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"max_abs_diff": 1e-6, "threshold": 1e-4, "passed": True, "metrics": metrics, **extra}


def _stage_files(component: str, int8_kept: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train metrics and export report of ``component``, shaped as its stages write them."""
    retrieval = {
        "recall@1": 0.5,
        "recall@5": 0.8,
        "recall@10": 0.9,
        "mrr": 0.62,
        "mean_cosine": 0.87,
    }
    ranking = {"ndcg@10": 0.81, "mrr": 0.74}
    if component == "embedding":
        train = {
            "base": {**retrieval, "recall@5": 0.7, "mean_cosine": 0.8},
            "fine_tuned": retrieval,
            "interpolation": {"chosen": 0.5, "grid": [{"a": 0.5, "in_domain": retrieval}]},
            "train": {"pairs": 10, "epochs": 1},
            "validation": {"queries": 5, "corpus": 5},
        }
        int8 = {"mean_cosine": 0.996, "cosine_passed": True, "recall_passed": True}
        int8.update(passed=True, metrics=retrieval)
        model_config = {
            "base_model": "sentence-transformers/all-MiniLM-L6-v2",
            "dimension": 384,
            "max_seq_length": 128,
            "pooling": "mean",
            "normalized": True,
            "output": "sentence_embedding",
            "tokenizer": "tokenizer.json",
        }
        fp32 = _parity(retrieval)
    elif component == "relation":
        scores = {"macro_f1": 0.75, "accuracy": 0.8}
        train = {
            "validation": {
                **scores,
                "per_class": {
                    "works_at": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2}
                },
                "confusion": [[1, 0], [1, 1]],
            },
            "baselines": {
                "majority": {"label": "none", "macro_f1": 0.1, "accuracy": 0.5},
                "rules": {"patterns": 3, "coverage": 0.5, "macro_f1": 0.3, "accuracy": 0.6},
            },
            "labels": ["none", "works_at"],
            "train": {"examples": 20, "validation_examples": 4},
        }
        int8 = {"argmax_agreement": 1.0, "macro_f1": 0.75, "passed": True, "metrics": scores}
        model_config = {
            "base_model": "sentence-transformers/all-MiniLM-L6-v2",
            "labels": ["none", "works_at"],
            "num_labels": 2,
            "pooling": "entity_start",
            "max_seq_length": 128,
            "output": "logits",
            "tokenizer": "tokenizer.json",
            "label_map": "labels.json",
        }
        fp32 = _parity(scores)
    elif component == "gnn":
        train = {
            "validation": ranking,
            "baseline_embedding_similarity": {"ndcg@10": 0.7, "mrr": 0.6},
            "train": {"queries": 12, "validation_queries": 4},
        }
        int8 = {"identical_rankings": 0.75, "metrics": ranking, "kept": int8_kept, "passed": True}
        if not int8_kept:
            int8["reason"] = "INT8 changes the candidate ranking; the bundle ships fp32 only"
        model_config = {
            "feature_dim": 389,
            "hidden": 128,
            "layers": 3,
            "node_types": ["passage", "query", "entity", "relation"],
            "relation_nodes": True,
            "output": "scores",
        }
        fp32 = _parity(ranking)
    else:
        scores = {"loss": 2.1, "perplexity": 8.17}
        train = {"validation": scores, "samples": [], "train": {"examples": 30, "tokens": 900}}
        int8 = {
            "token_agreement": 0.97,
            "identical_generations": 1.0,
            "metrics": scores,
            "passed": True,
        }
        model_config = {
            "architecture": "Qwen2ForCausalLM",
            "base_model": None,  # built from scratch (llm=scratch: llm.base_model null)
            "layers": 2,
            "kv_heads": 1,
            "head_dim": 16,
            "max_seq_length": 2048,
            "eos_token_ids": [1, 2],
            "pad_token_id": 2,
            "tokenizer": "tokenizer.json",
        }
        fp32 = _parity(scores, identical_generations=1.0)
    report = {
        "fp32": fp32,
        "int8": int8,
        "quantization": {"preset": "per_channel", "weight_type": "QInt8"},
        "model_config": {**model_config, "opset": 17},
    }
    return train, report


def _lock(path: Path) -> Path:
    stages = {s for names in manifest_lib.COMPONENT_STAGES.values() for s in names}
    lock = {
        "schema": "2.0",
        "stages": {
            stage: {
                "cmd": f"python stages/{stage}.py",
                "deps": [{"path": "data", "md5": "0" * 32 + ".dir"}],
                "params": {"params.yaml": {stage: {"seed": 1}}},
                "outs": [{"path": f"target/{stage}", "md5": "1" * 32 + ".dir"}],
            }
            for stage in sorted(stages)
        },
    }
    path.write_text(yaml.safe_dump(lock), encoding="utf-8")
    return path


@pytest.fixture
def built(tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    """``pipeline.manifest`` (so ``manifest.build``) on small real ONNX files and stage outputs
    shaped as the stages write them; the graph ranker without INT8, as when INT8 reorders."""
    from sphana.config import Quantization
    from sphana.export import quantize, signature
    from sphana.io import write_json_atomic

    cfg = tiny_config(tmp_path)
    for component in cfg.release.components:
        onnx_dir = pipeline.component_dir(cfg, component, "onnx")
        fp32 = onnx_dir / FILE_NAMES[component]
        _onnx(fp32, "scores")
        (onnx_dir / "tokenizer.json").write_text("{}", encoding="utf-8")
        kept = component != "gnn"
        train, report = _stage_files(component, kept)
        int8_name = fp32.name.removesuffix(".onnx") + ".int8.onnx"
        if kept:
            report["quantization"] = quantize(fp32, onnx_dir / int8_name, Quantization.per_channel)
        report["files"] = {"fp32": fp32.name, "int8": int8_name if kept else None}
        report["signature"] = signature(fp32)
        write_json_atomic(pipeline.metrics_file(cfg, f"train_{component}"), train)
        write_json_atomic(pipeline.metrics_file(cfg, f"export_{component}"), report)
    gold = {
        "questions": {"count": 5},
        "relations": {"count": 20},
        "signals": {c: "gold" for c in cfg.release.components},
    }
    write_json_atomic(Path(cfg.paths.ingest) / "report.json", {"gold": gold})
    return cfg, pipeline.manifest(cfg, _lock(tmp_path / "dvc.lock"))


def test_built_manifest_meets_the_consumer_contract(built: tuple[Any, dict[str, Any]]) -> None:
    cfg, manifest = built
    written = json.loads((Path(cfg.paths.manifests) / "latest.json").read_text(encoding="utf-8"))
    assert written == manifest
    assert consumer_errors(manifest) == []
    assert sphana_errors(manifest) == []
    assert manifest["schema_version"] == 2
    assert sorted(manifest["components"]) == ["embedding", "gnn", "llm", "relation"]
    for component in manifest["components"]:  # each bundle's manifest (the registry's artifact)
        assert consumer_errors(manifest_lib.excerpt(manifest, component)) == [], component
    # the files verify as before (the manifest still lists and hashes every file)
    manifest_lib.verify(Path(cfg.paths.manifests) / "latest.json", root=Path(cfg.paths.artifacts))


def test_metrics_are_flat_numbers_and_the_figures_stay_under_evaluation(built) -> None:
    _, manifest = built
    emb, rel, gnn, llm = (
        manifest["components"][c] for c in ("embedding", "relation", "gnn", "llm")
    )
    for entry in (emb, rel, gnn, llm):
        assert all(
            isinstance(v, (int, float)) and not isinstance(v, bool)
            for v in entry["metrics"].values()
        ), entry["metrics"]
    # the consumer's names, from the shipped model's validation figures
    assert (
        emb["metrics"]["val_cosine_sim"] == emb["evaluation"]["validation"]["mean_cosine"] == 0.87
    )
    assert rel["metrics"]["val_macro_f1"] == rel["evaluation"]["validation"]["macro_f1"] == 0.75
    assert gnn["metrics"]["val_ndcg_at_10"] == gnn["evaluation"]["validation"]["ndcg@10"] == 0.81
    # Sphana's other scalar figures, flattened one level down
    assert emb["metrics"]["val_recall_at_10"] == 0.9
    assert emb["metrics"]["base_val_recall_at_5"] == 0.7
    assert emb["metrics"]["onnx_int8_val_mean_cosine"] == 0.87
    assert rel["metrics"]["val_accuracy"] == 0.8
    assert gnn["metrics"]["baseline_embedding_similarity_ndcg_at_10"] == 0.7
    assert "onnx_int8_val_ndcg_at_10" not in gnn["metrics"]  # INT8 not kept: no figures
    assert llm["metrics"]["val_perplexity"] == 8.17
    assert llm["metrics"]["int8_token_agreement"] == 0.97
    # deeper figures stay nested, under evaluation only
    assert rel["evaluation"]["per_class"]["works_at"]["support"] == 2
    assert rel["evaluation"]["baselines"]["rules"]["macro_f1"] == 0.3
    assert not any(
        k.startswith(("per_class", "baselines", "val_per_class")) for k in rel["metrics"]
    )


def test_model_config_and_system_requirements_carry_both_names(built) -> None:
    _, manifest = built
    c = manifest["components"]
    emb = c["embedding"]["model_config"]
    assert emb["output_dimension"] == emb["dimension"] == 384
    assert (
        emb["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and emb["quantized"] is True
    )
    assert c["relation"]["model_config"]["num_labels"] == 2
    gnn = c["gnn"]["model_config"]
    assert (gnn["hidden_dim"], gnn["num_layers"]) == (gnn["hidden"], gnn["layers"]) == (128, 3)
    assert gnn["quantized"] is False and c["gnn"]["path"] == "gnn/0.1.0/onnx/gnn_ranker.onnx"
    llm = c["llm"]["model_config"]
    assert llm["model_name"] == "sphana/llm" and llm["base_model"] is None  # built from scratch
    assert llm["max_seq_length"] == 2048 and llm["quantized"] is True
    assert c["llm"]["path"].endswith("llm/0.1.0/onnx/llm_generator.int8.onnx")
    requirements = manifest["system_requirements"]
    assert requirements["onnx_runtime"] == requirements["onnxruntime"] == ">=1.21"
    assert (requirements["cuda"], requirements["cudnn"]) == (">=12.0", ">=9.0")
    assert requirements["execution_providers"] == ["CPUExecutionProvider"]


def test_consumer_config_names_a_fine_tuned_generator_after_its_checkpoint() -> None:
    config = {"base_model": "/models/qwen2-0.5b", "max_seq_length": 512, "layers": 24}
    out = manifest_lib.consumer_config("llm", config, "sphana")
    assert out == {**config, "model_name": "/models/qwen2-0.5b"}
    assert manifest_lib.consumer_config("gnn", {"hidden": 8, "layers": 2}, "sphana") == {
        "hidden": 8,
        "layers": 2,
        "hidden_dim": 8,
        "num_layers": 2,
    }


def test_gpu_requirements_follow_the_minimum_onnxruntime() -> None:
    assert manifest_lib.gpu_requirements("1.17") == {"cuda": ">=11.8", "cudnn": ">=8.2"}
    assert manifest_lib.gpu_requirements("1.20.0") == {"cuda": ">=12.0", "cudnn": ">=9.0"}


def old_layout(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` as schema version 1 wrote it: nested metrics, Sphana's names only."""
    old = copy.deepcopy(manifest)
    old["schema_version"] = 1
    for entry in old["components"].values():
        entry["metrics"] = entry.pop("evaluation")
        for name in ("output_dimension", "hidden_dim", "num_layers", "model_name"):
            entry["model_config"].pop(name, None)
    for name in ("onnx_runtime", "cuda", "cudnn"):
        old["system_requirements"].pop(name)
    return old


def test_the_old_layout_breaks_the_contract_and_still_verifies_as_version_1(built) -> None:
    _, manifest = built
    old = old_layout(manifest)
    broken = {"/".join(map(str, e.absolute_path)) for e in consumer_errors(old)}
    assert {
        "components/embedding/metrics",
        "components/embedding/model_config",
        "components/gnn/model_config",
        "components/llm/model_config",
        "system_requirements",
    } <= broken
    assert sphana_errors(old) == []  # releases made before the consumer names still verify
    assert sphana_errors({**old, "schema_version": 2})  # but not as the current version
    with pytest.raises(VerifyError, match="consumer contract"):
        manifest_lib.validate_consumer(old, "old.json")


def test_registry_reads_the_nested_figures_of_both_layouts(built) -> None:
    from sphana import registry

    _, manifest = built
    old = old_layout(manifest)
    assert (
        registry.key_metrics(manifest)
        == registry.key_metrics(old)
        == {
            "embedding recall@5": 0.8,
            "relation macro_f1": 0.75,
            "gnn ndcg@10": 0.81,
            "llm perplexity": 8.17,
        }
    )
    # `artifacts diff` compares the same keys across a version 1 and a version 2 manifest
    assert registry._facets(manifest)["metrics"] == registry._facets(old)["metrics"]
    assert registry._facets(manifest)["metrics"]["gnn.validation.ndcg@10"] == 0.81


def test_build_refuses_a_manifest_that_breaks_the_contract(tmp_path: Path, built) -> None:
    cfg, _ = built
    report_file = pipeline.metrics_file(cfg, "train_embedding")
    train = json.loads(report_file.read_text(encoding="utf-8"))
    del train["fine_tuned"]["mean_cosine"]  # the figure the consumer reads as val_cosine_sim
    report_file.write_text(json.dumps(train), encoding="utf-8")
    with pytest.raises(VerifyError, match="components/embedding/metrics.*val_cosine_sim"):
        pipeline.manifest(cfg, tmp_path / "dvc.lock")


def test_real_tiny_build_meets_the_consumer_contract(built_tiny, tmp_path: Path) -> None:
    """The manifest of the tiny pipeline's real stage outputs (every component trained and
    exported by `dvc repro`): the manifest built from them in-process."""
    cfg, _ = built_tiny
    cfg = copy.deepcopy(cfg)
    cfg.paths.manifests = str(tmp_path / "manifests")
    manifest = pipeline.manifest(cfg, _lock(tmp_path / "dvc.lock"))
    assert consumer_errors(manifest) == []
    assert sphana_errors(manifest) == []
    for name, entry in manifest["components"].items():
        assert entry["evaluation"], name
        assert all(not isinstance(v, (dict, list, bool)) for v in entry["metrics"].values()), name
