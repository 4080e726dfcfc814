"""Export of the graph ranker: ``gnn_ranker.onnx`` with dynamic node, edge and candidate counts,
an INT8 sibling only where it keeps the rankings, and the parity gates.

Parity: over ``export.parity.random_graphs`` random graphs of varied sizes — duplicate edges,
self-loops, isolated nodes, single-node graphs without edges — the fp32 scores match PyTorch's
within ``export.parity.fp32_max_abs_diff``, and on validation every query's candidate ranking is
identical (candidates whose PyTorch scores differ by less than that tolerance count as tied). The
INT8 file ships only if its validation rankings are identical to PyTorch's too;
otherwise the bundle carries fp32 alone and the report (and so the manifest) says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sphana.config import ExportConfig, GnnConfig
from sphana.errors import ParityError
from sphana.export import (
    OnnxSpec,
    export_onnx,
    model_bytes,
    quantize_gated,
    register,
    sample_feeds,
    session,
    signature,
)
from sphana.gnn import (
    META_FILE,
    batched_scores,
    candidate_labels,
    collate,
    load_split,
    load_trained,
    score_queries,
)
from sphana.graph_inputs import ranking_metrics
from sphana.io import atomic_dir, write_json_atomic

SPEC = register(
    OnnxSpec(
        component="gnn",
        file_name="gnn_ranker.onnx",
        input_names=("node_features", "edge_index", "edge_directions", "readout_index"),
        output_names=("scores",),
        dynamic_axes={
            "node_features": {0: "nodes"},
            "edge_index": {1: "edges"},
            "edge_directions": {0: "edges"},
            "readout_index": {0: "candidates"},
            "scores": {0: "candidates"},
        },
    )
)


def random_graphs(rows: np.ndarray, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Graphs of 1…60 nodes whose features are real node rows, with duplicate edges, self-loops
    and isolated nodes; the first is a single node without edges."""
    rng = np.random.default_rng(seed)
    graphs = []
    for i in range(count):
        nodes = 1 if i == 0 else int(rng.integers(2, 61))
        edges = 0 if i == 0 else int(rng.integers(0, 4 * nodes))
        connected = max(1, nodes - int(rng.integers(0, 3)))  # the last nodes may stay isolated
        src = rng.integers(0, connected, edges)
        dst = rng.integers(0, connected, edges)
        if edges >= 4:
            src[:2], dst[:2] = src[2], dst[2]  # a duplicated edge
            dst[3] = src[3]  # a self-loop
        readout = rng.choice(nodes, size=int(rng.integers(1, nodes + 1)), replace=False)
        graphs.append(
            {
                "node_features": rows[rng.integers(0, len(rows), nodes)].astype(np.float32),
                "edge_index": np.stack([src, dst]).astype(np.int64).reshape(2, edges),
                "edge_directions": rng.integers(0, 2, edges).astype(np.int64),
                "readout_index": np.sort(readout).astype(np.int64),
            }
        )
    return graphs


def _ort_scores(sess: Any, queries: list[dict[str, Any]]) -> list[np.ndarray]:
    return batched_scores(
        lambda x: sess.run(None, {k: v.numpy() for k, v in x.items()})[0], queries
    )


def same_rankings(reference: list[np.ndarray], other: list[np.ndarray], tie: float) -> float:
    """Share of queries whose candidates ``other`` orders as ``reference`` does. Candidates whose
    reference scores lie within ``tie`` of each other (e.g. identical subgraphs) count as tied:
    their order is float noise, not a ranking change."""

    def same(x: np.ndarray, y: np.ndarray) -> bool:
        ahead = x[:, None] - x[None, :] > tie  # [i, j]: reference ranks i clearly above j
        return not (ahead & (y[:, None] <= y[None, :])).any()

    return float(np.mean([same(x, y) for x, y in zip(reference, other, strict=True)]))


def run(
    gnn_cfg: GnnConfig,
    cfg: ExportConfig,
    pytorch_dir: Path,
    datasets_dir: Path,
    onnx_dir: Path,
    threads: int = 0,
) -> dict[str, Any]:
    """Export and gate. ``onnx_dir`` is written whole, and only if the fp32 gates pass.

    Raises:
        ParityError: naming the gate, the measured value and the threshold.
    """
    model, meta = load_trained(pytorch_dir)
    _, validation = load_split(datasets_dir)
    labels = [candidate_labels(q) for q in validation]
    example, _, _ = collate(validation[:2])  # nodes, edges and candidates all differ and are > 1
    rows = example["node_features"].numpy()

    with atomic_dir(onnx_dir) as tmp:
        fp32_path, int8_path = tmp / SPEC.file_name, tmp / SPEC.int8_file_name
        export_onnx(model, example, SPEC, fp32_path, cfg.opset, cfg.external_data_mb)
        fp32_sess = session(fp32_path, threads)
        checks = []
        for graph in random_graphs(rows, cfg.parity.random_graphs, seed=0):
            with torch.inference_mode():
                ref = model(**{k: torch.from_numpy(v) for k, v in graph.items()}).numpy()
            got = fp32_sess.run(None, graph)[0]
            checks.append(
                {
                    "nodes": int(graph["node_features"].shape[0]),
                    "edges": int(graph["edge_index"].shape[1]),
                    "candidates": int(graph["readout_index"].shape[0]),
                    "max_abs_diff": float(np.max(np.abs(got - ref))),
                }
            )
        worst = float(np.max([c["max_abs_diff"] for c in checks]))
        reference = score_queries(model, validation)
        tie = cfg.parity.fp32_max_abs_diff  # reference scores closer than fp32 noise are tied
        fp32_scores = _ort_scores(fp32_sess, validation)
        fp32_same = same_rankings(reference, fp32_scores, tie)
        fp32 = {
            "max_abs_diff": worst,
            "threshold": cfg.parity.fp32_max_abs_diff,
            "random_graphs": len(checks),
            "largest_graph": max(checks, key=lambda c: c["nodes"]),
            "identical_rankings": fp32_same,
            "metrics": ranking_metrics(fp32_scores, labels),
            "passed": bool(np.isfinite(worst) and worst <= cfg.parity.fp32_max_abs_diff)
            and fp32_same == 1.0,
        }
        if not fp32["passed"]:
            raise ParityError(
                f"gnn export failed its parity gate (nothing was written): fp32 max abs diff "
                f"{worst:.3g} over {len(checks)} random graphs (export.parity.fp32_max_abs_diff="
                f"{cfg.parity.fp32_max_abs_diff}), identical validation rankings "
                f"{fp32_same:.2%} (must be 100%)"
            )

        def gate(path: Path) -> tuple[dict[str, Any], list[str]]:
            scores = _ort_scores(session(path, threads), validation)
            same = same_rankings(reference, scores, tie)
            int8 = {
                "identical_rankings": same,
                "max_abs_diff": float(
                    max(np.max(np.abs(a - b)) for a, b in zip(scores, reference, strict=True))
                ),
                "metrics": ranking_metrics(scores, labels),
                "kept": same == 1.0,
            }
            changed = f"changes the candidate ranking of {1 - same:.1%} of validation queries"
            return int8, [] if int8["kept"] else [changed]

        # per_channel_sensitive ranks the nodes by their error on validation queries' scores
        feeds = sample_feeds(
            validation, lambda chunk: {k: v.numpy() for k, v in collate(chunk)[0].items()}
        )
        quantization, int8, failures = quantize_gated(
            fp32_path, int8_path, cfg.quantization, gate, feeds
        )
        if failures:
            int8_path.unlink()
            last = quantization["preset"]
            int8["reason"] = f"INT8 ({last}, the last recipe tried) {failures[0]}; fp32 ships"
            quantization = {**quantization, "skipped": int8["reason"]}
        int8["passed"] = True  # INT8 is optional for this component: its absence is not a failure
        write_json_atomic(tmp / META_FILE, meta)
        report = {
            "fp32": fp32,
            "int8": int8,
            "pytorch": {"metrics": ranking_metrics(reference, labels)},
            "quantization": quantization,
            "signature": signature(fp32_path),
            "files": {
                "fp32": SPEC.file_name,
                "int8": SPEC.int8_file_name if int8["kept"] else None,
            },
            "sizes": {
                "fp32": model_bytes(fp32_path),
                "int8": model_bytes(int8_path) if int8["kept"] else None,
            },
            "model_config": {
                **meta,
                "inputs": "disjoint union of candidate graphs; readout_index = passage nodes",
                "output": SPEC.output_names[0],
                "opset": cfg.opset,
            },
        }
    return report
