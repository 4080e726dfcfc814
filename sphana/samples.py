"""Parity samples: inputs and the outputs ONNX Runtime gives for them, as JSON that a runtime in
another language (the .NET consumer) replays to check its own tokenization and inference.

Built from a verified component bundle (``manifest.json`` + files) with numpy, onnxruntime and
tokenizers only. Every tensor is ``{"dtype", "shape", "data"}`` with ``data`` flattened in
row-major order; an output with ``"select": "last_position"`` holds ``output[:, -1]`` only. One
case per input set; each model file the manifest lists (fp32 and, where kept, INT8) has its
outputs and its absolute tolerance ``atol``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
FILE_NAME = "parity_samples.json"
# Fixed texts, so samples of two versions are comparable (the names are the corpus's).
TEXTS = [
    "Who founded the Halvard Institute for Tidal Acoustics?",
    "Halvard is a port city in Ostravel.",
    "A short one.",
]
MARKED = [
    "[E1]Halvard[/E1] is a port city in [E2]Ostravel[/E2].",
    "The [E2]Northreach Tidal Computing Lab[/E2] was founded by [E1]Ines Varga[/E1] in 2011.",
]
PROMPTS = [
    "<|im_start|>user\nWhere is Halvard?<|im_end|>\n<|im_start|>assistant\n",
    "Halvard is",
]
NEW_TOKENS = 16  # greedy continuation recorded for the generator
# The generator's outputs are its logits at the last position (axis 1), for every prompt: the
# full [batch, sequence, vocab] tensor would be tens of MB for a 152K vocabulary.
SELECT = "last_position"
# INT8 kernels (dynamic quantization of activations) differ between CPU instruction sets: the
# INT8 file's tolerance is this multiple of the export's fp32 gate.
INT8_ATOL_FACTOR = 100
SEED = 0


def tensor(array: np.ndarray) -> dict[str, Any]:
    if array.dtype == np.float32:  # the shortest decimal that reads back as the same float32
        data = [float(str(v)) for v in array.ravel()]
    else:
        data = array.ravel().tolist()
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": data}


def array(entry: dict[str, Any]) -> np.ndarray:
    return np.asarray(entry["data"], dtype=entry["dtype"]).reshape(entry["shape"])


def _tokenize(tokenizer_file: Path, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """What a consumer does with ``tokenizer.json``: encode, truncate, pad to the longest (the
    build's own :func:`sphana.tokenization.encode`)."""
    from sphana import tokenization

    tokenizer, pad = tokenization.load(tokenizer_file.parent)
    return tokenization.encode(tokenizer, texts, max_length, pad)


def _graphs(feature_dim: int) -> list[dict[str, np.ndarray]]:
    """Two queries as disjoint unions of candidate graphs (3 and 1 candidates), seeded."""
    rng = np.random.default_rng(SEED)
    out = []
    for candidates in (3, 1):
        nodes_per = rng.integers(3, 7, size=candidates)
        starts = np.concatenate([[0], np.cumsum(nodes_per)[:-1]])
        edges = []
        for start, n in zip(starts, nodes_per, strict=True):
            for _ in range(2 * n):
                edges.append(start + rng.integers(0, n, size=2))
        edge_index = np.array(edges, dtype=np.int64).T
        out.append(
            {
                "node_features": rng.standard_normal((int(nodes_per.sum()), feature_dim)).astype(
                    np.float32
                ),
                "edge_index": edge_index,
                "edge_directions": rng.integers(0, 2, size=edge_index.shape[1]).astype(np.int64),
                "readout_index": starts.astype(np.int64),
            }
        )
    return out


def _cases(component: str, files: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{"name", "text"?, "inputs": {name: ndarray}}]`` for ``component``."""
    if component == "embedding":
        inputs = _tokenize(files / config["tokenizer"], TEXTS, config["max_seq_length"])
        return [{"name": "texts padded to the longest", "text": TEXTS, "inputs": inputs}]
    if component == "relation":
        inputs = _tokenize(files / config["tokenizer"], MARKED, config["max_seq_length"])
        return [{"name": "marked sentences", "text": MARKED, "inputs": inputs}]
    if component == "gnn":
        graphs = _graphs(config["feature_dim"])
        return [{"name": f"query {i}", "inputs": g} for i, g in enumerate(graphs)]
    if component == "llm":
        from tokenizers import Tokenizer

        from sphana.generation import empty_cache, pad, past_names, positions

        tokenizer = Tokenizer.from_file(str(files / config["tokenizer"]))
        ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS]
        input_ids, mask = pad(ids, config["pad_token_id"], side="left")
        cache = (config["layers"], config["kv_heads"], config["head_dim"])
        inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions(mask)}
        inputs.update(zip(past_names(config["layers"]), empty_cache(len(ids), cache), strict=True))
        return [{"name": "left-padded prefill, empty past", "text": PROMPTS, "inputs": inputs}]
    raise ValueError(f"no parity samples for component {component!r}")


def build(bundle: Path, threads: int = 1) -> dict[str, Any]:
    """Samples of the one component in ``bundle`` (a verified bundle directory)."""
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    (component, entry), *others = manifest["components"].items()
    if others:
        raise ValueError(f"{bundle}: parity samples take a one-component bundle")
    return from_entry(component, entry, bundle, threads)


def from_entry(
    component: str, entry: dict[str, Any], root: Path, threads: int = 1
) -> dict[str, Any]:
    """Samples of ``component`` from its manifest ``entry`` (``path``, ``model_config``,
    ``files``, ``parity``), its files under ``root``: what the export writes beside the model
    (:data:`FILE_NAME`) and ``sphana artifacts parity-samples`` prints."""
    import onnxruntime as ort

    config = entry["model_config"]
    files = (root / entry["path"]).parent
    cases = _cases(component, files, config)
    models = {"fp32": config["fp32_path"]}
    if config["quantized"]:
        models["int8"] = entry["path"]
    if config.get("int4_file"):  # the generator's 4-bit sibling
        models["int4"] = (Path(entry["path"]).parent / config["int4_file"]).as_posix()
    checksums = {f["path"]: f["sha256"] for f in entry["files"]}
    out_models = {}
    select = {"select": SELECT} if component == "llm" else {}
    for kind, path in models.items():
        generator, session = _open(root / path, component == "llm", threads)
        names = [o.name for o in session.get_outputs()]
        outputs = []
        for case in cases:
            got = dict(zip(names, session.run(None, case["inputs"]), strict=True))
            if component == "llm":  # the next-token logits; the cache is the model's business
                got = {"logits": got["logits"][:, -1]}
            outputs.append({name: {**tensor(value), **select} for name, value in got.items()})
        fp32_gate = entry["parity"]["fp32"]["threshold"]
        out_models[kind] = {
            "path": path,
            "sha256": checksums[path],
            "atol": fp32_gate * (INT8_ATOL_FACTOR if kind == "int8" else 1),
            "outputs": outputs,
        }
        if generator is not None:  # the prompts of the prefill case, without their padding
            inputs = cases[0]["inputs"]
            prompt_ids = [
                ids[mask == 1].tolist()
                for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
            ]
            out_models[kind]["greedy"] = {
                "prompt_ids": prompt_ids,
                "new_tokens": NEW_TOKENS,
                "generated_ids": generator.generate_ids(prompt_ids, NEW_TOKENS),
            }
    return {
        "format": FORMAT,
        "component": component,
        "version": entry["version"],
        "onnxruntime": ort.__version__,
        "cases": [
            {
                **{k: v for k, v in case.items() if k != "inputs"},
                "inputs": {k: tensor(v) for k, v in case["inputs"].items()},
            }
            for case in cases
        ],
        "models": out_models,
    }


def _open(path: Path, generator: bool, threads: int) -> tuple[Any, Any]:
    """``(generator, session)`` of a model file: the generator's own session for the LLM
    (``generator`` None otherwise)."""
    if generator:
        from sphana.generation import OnnxGenerator

        llm = OnnxGenerator(path.parent, path.name, threads=threads)
        return llm, llm.session
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return None, ort.InferenceSession(str(path), options, ["CPUExecutionProvider"])


def replay(samples: dict[str, Any], bundle: Path) -> list[str]:
    """Run ``samples`` against the model files in ``bundle`` with ONNX Runtime; every output
    beyond its tolerance (empty when all match). What another runtime does in its language."""
    return replay_on(
        samples,
        {
            kind: _open(bundle / m["path"], "greedy" in m, 0)
            for kind, m in samples["models"].items()
        },
    )


def replay_on(samples: dict[str, Any], models: dict[str, tuple[Any, Any]]) -> list[str]:
    """Run ``samples`` on ``models`` (``{"fp32"|"int8"|"int4": (generator or None, session)}``:
    sessions already made, e.g. the server's); every output beyond its tolerance (empty when all
    match). Kinds ``samples`` has and ``models`` lacks are not run."""
    problems = []
    for kind, (generator, session) in models.items():
        model = samples["models"].get(kind)
        if model is None:
            problems.append(f"{kind}: the samples have no outputs of this model file")
            continue
        for case, expected in zip(samples["cases"], model["outputs"], strict=True):
            feed = {k: array(v) for k, v in case["inputs"].items()}
            names = [o.name for o in session.get_outputs()]
            got = dict(zip(names, session.run(None, feed), strict=True))
            for name, entry in expected.items():
                value = got[name][:, -1] if entry.get("select") == SELECT else got[name]
                if value.shape != tuple(entry["shape"]):
                    problems.append(f"{kind} {case['name']}: {name} has shape {list(value.shape)}")
                    continue
                diff = float(np.max(np.abs(value - array(entry)), initial=0.0))
                if diff > model["atol"]:
                    problems.append(
                        f"{kind} {case['name']}: {name} differs by {diff:.3g} "
                        f"(atol {model['atol']})"
                    )
        if generator is not None:
            greedy = model["greedy"]
            generated = generator.generate_ids(greedy["prompt_ids"], greedy["new_tokens"])
            if generated != greedy["generated_ids"]:
                problems.append(f"{kind}: greedy generation differs: {generated}")
    return problems
