"""``sphana serve`` end to end: a real server process on 127.0.0.1 serving the tiny release that
``dvc repro`` built, called by real clients (the ``openai`` client, ``tritonclient``, httpx).

The server runs with torch, transformers, torch_geometric, DVC, Hydra and OmegaConf made
unimportable, so every test here also proves that serving needs none of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import LAUNCH, free_port, serving

MAX_CONCURRENT = 4


@pytest.fixture(scope="module")
def built(dvc_built: tuple[Path, str]) -> Path:
    return dvc_built[0]


@pytest.fixture(scope="module")
def tarball(built: Path) -> Path:
    return built / "target/manifests/latest.tar.gz"


@pytest.fixture(scope="module")
def server(tarball: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with (
        open(tmp_path_factory.mktemp("serve") / "server.log", "w+") as log,
        serving(
            str(tarball),
            "--threads",
            "1",
            "--max-concurrent-requests",
            str(MAX_CONCURRENT),
            "--max-inputs",
            "8",
            log=log,
        ) as url,
    ):
        yield url


def manifest_of(tarball: Path) -> dict:
    import tarfile

    with tarfile.open(tarball) as tar:
        return json.load(tar.extractfile("manifest.json"))


def test_the_serve_install_has_no_torch(tmp_path: Path) -> None:
    """What `pip install 'sphana[serve]'` would install: the plan, resolved from the index."""
    repo = Path(__file__).resolve().parents[1]
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--report",
            str(report),
            f"{repo}[serve]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 and "No matching distribution" in proc.stderr:
        pytest.skip(f"no package index reachable: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"onnxruntime", "tokenizers", "numpy", "fastapi", "uvicorn"} <= names
    heavy = {"torch", "transformers", "torch-geometric", "torch_geometric", "dvc", "hydra-core"}
    assert not names & heavy, sorted(names & heavy)


def test_health_info_metrics_and_docs(server: str, tarball: Path) -> None:
    manifest = manifest_of(tarball)
    health = httpx.get(f"{server}/health")
    assert health.status_code == 200 and health.headers["x-model-version"] == manifest["version"]
    info = httpx.get(f"{server}/info").json()
    assert set(info["components"]) == set(manifest["components"])
    for name, c in info["components"].items():
        listed = {f["path"]: f["sha256"] for f in manifest["components"][name]["files"]}
        assert c["sha256"] == listed[c["file"]] and c["version"]
    assert info["limits"]["max_concurrent_requests"] == MAX_CONCURRENT
    assert "max_batch_tokens" in info["batching"] and info["timings"]["warmup"] > 0
    assert info["index"]["passages"] == manifest["index"]["config"]["passages"]
    assert info["index"]["embedding"] == manifest["index"]["config"]["embedding"]
    assert "/v1/embeddings" in httpx.get(f"{server}/openapi.json").json()["paths"]
    assert httpx.get(f"{server}/docs").status_code == 200
    metrics = httpx.get(f"{server}/metrics").text
    assert "sphana_requests_total" in metrics and "sphana_queue_depth" in metrics


def reference_embeddings(built: Path, tarball: Path, texts: list[str]) -> np.ndarray:
    """What the build's own code computes with the served file: the export's ONNX embed over
    the transformers tokenizer."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from sphana.export.embedding import ort_embed

    entry = manifest_of(tarball)["components"]["embedding"]
    model = built / "target/artifacts" / entry["path"]
    if not model.is_file():
        model = next(built.glob(f"target/**/{entry['path']}"))
    tokenizer = AutoTokenizer.from_pretrained(str(model.parent))
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return ort_embed(session, tokenizer, entry["model_config"]["max_seq_length"])(texts)


TEXTS = [
    "Who founded the Halvard Institute for Tidal Acoustics?",
    "Halvard is a port city in Ostravel.",
    "A short one.",
]


def test_openai_client_embeddings_match_the_build(server: str, built: Path, tarball: Path) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    response = client.embeddings.create(model="embedding", input=TEXTS)
    served = np.array([d.embedding for d in response.data], dtype=np.float32)
    reference = reference_embeddings(built, tarball, TEXTS)
    assert served.shape == reference.shape
    gate = manifest_of(tarball)["components"]["embedding"]["parity"]["fp32"]["threshold"]
    assert np.abs(served - reference).max() <= gate
    assert response.usage.prompt_tokens > len(TEXTS)
    one = client.embeddings.create(model="embedding", input=TEXTS[1], encoding_format="float")
    # alone or batched: the same up to INT8's dynamic activation scales, set per batch
    assert np.allclose(one.data[0].embedding, served[1], atol=1e-3)


def test_tei_embed_and_timing_headers(server: str) -> None:
    response = httpx.post(f"{server}/embed", json={"inputs": TEXTS})
    assert response.status_code == 200
    vectors = np.array(response.json())
    assert vectors.shape[0] == 3 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    for header in ("x-queue-time", "x-inference-time", "x-tokenization-time", "x-total-time"):
        assert float(response.headers[header]) >= 0


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v1/embeddings", b'{"input": ', 400, "not valid JSON"),
        ("/v1/embeddings", {"input": []}, 422, "input"),
        ("/v1/embeddings", {"input": [""]}, 422, "input[0]"),
        ("/v1/embeddings", {"input": [1, 2]}, 422, "input"),
        ("/v1/embeddings", {"input": ["x"] * 9}, 413, "max_inputs"),
        ("/v1/embeddings", {"input": "x", "model": "gpt-4"}, 404, "model"),
        ("/embed", {"inputs": "word " * 5000}, 413, "inputs[0]"),
        ("/embed", {"inputs": "x", "normalize": False}, 422, "normalize"),
        ("/v1/generate", {"prompt": "hi", "max_new_tokens": 100000}, 422, "max_new_tokens"),
        ("/v1/rerank", {"query": "q", "texts": ["a"], "ranks": [0, 1]}, 422, "ranks"),
        (
            "/v1/relations",
            {"text": "Ines Varga.", "entities": [{"start": 5, "end": 2}]},
            422,
            "entities[0]",
        ),
        ("/v1/query", {"query": " "}, 422, "query"),
        ("/v1/query", {"query": "Who?", "top_k": 0}, 422, "top_k"),
        ("/v2/models/nonexistent/infer", {"inputs": []}, 404, "unknown model"),
        ("/v2/models/embedding/infer", {"inputs": [{"name": "x"}]}, 400, "not an input"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_what_to_fix(
    server: str, path: str, body, status: int, says: str
) -> None:
    if isinstance(body, bytes):
        response = httpx.post(
            f"{server}{path}", content=body, headers={"content-type": "application/json"}
        )
    else:
        response = httpx.post(f"{server}{path}", json=body)
    assert response.status_code == status, response.text
    assert says in response.text
    assert httpx.get(f"{server}/health").status_code == 200  # still serving


def test_tritonclient_over_the_v2_protocol(server: str, built: Path, tarball: Path) -> None:
    import tritonclient.http as triton
    from tokenizers import Tokenizer

    client = triton.InferenceServerClient(server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("embedding")
    meta = client.get_model_metadata("embedding")
    assert {i["name"] for i in meta["inputs"]} == {"input_ids", "attention_mask", "token_type_ids"}
    entry = manifest_of(tarball)["components"]["embedding"]
    files = next(built.glob(f"target/**/{entry['path']}")).parent
    tokenizer = Tokenizer.from_file(str(files / "tokenizer.json"))
    tokenizer.no_padding()
    ids = np.array([tokenizer.encode(TEXTS[1]).ids], dtype=np.int64)
    inputs = []
    for name, value in (
        ("input_ids", ids),
        ("attention_mask", np.ones_like(ids)),
        ("token_type_ids", np.zeros_like(ids)),
    ):
        tensor = triton.InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value)  # binary tensor extension, the client's default
        inputs.append(tensor)
    result = client.infer("embedding", inputs)
    output = result.as_numpy(meta["outputs"][0]["name"])
    served = httpx.post(f"{server}/embed", json={"inputs": TEXTS[1]}).json()[0]
    assert np.allclose(output[0], served, atol=1e-5)
    as_json = httpx.post(
        f"{server}/v2/models/embedding/infer",
        json={
            "inputs": [
                {
                    "name": n,
                    "shape": list(ids.shape),
                    "datatype": "INT64",
                    "data": v.ravel().tolist(),
                }
                for n, v in (
                    ("input_ids", ids),
                    ("attention_mask", np.ones_like(ids)),
                    ("token_type_ids", np.zeros_like(ids)),
                )
            ]
        },
    ).json()
    assert np.allclose(as_json["outputs"][0]["data"], output.ravel(), atol=1e-6)


def test_generation_greedy_and_streamed(server: str, built: Path, tarball: Path) -> None:
    from sphana.generation import OnnxGenerator, chat_prompt

    entry = manifest_of(tarball)["components"]["llm"]
    path = next(built.glob(f"target/**/{entry['path']}"))
    expected = OnnxGenerator(path.parent, path.name).generate(
        [chat_prompt("Where is Halvard?")], 12
    )
    body = {"prompt": "Where is Halvard?", "max_new_tokens": 12}
    raw = httpx.post(f"{server}/v1/generate", json=body, timeout=60)
    assert float(raw.headers["x-inference-time"]) > 0
    response = raw.json()
    assert response["generated_text"] == expected[0]
    assert response["finish_reason"] in ("eos", "length")
    pieces, final = [], None
    with httpx.stream(
        "POST", f"{server}/v1/generate", json={**body, "stream": True}, timeout=60
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event.get("generated_text") is None:
                    pieces.append(event["token"]["text"])
                else:
                    final = event
    assert final is not None and "".join(pieces) == final["generated_text"] == expected[0]


def test_a_short_overload_gets_429s_not_timeouts(server: str) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"prompt": "Tell me about Halvard.", "max_new_tokens": 24}
            return await asyncio.gather(
                *(
                    client.post(f"{server}/v1/generate", json=body)
                    for _ in range(4 * MAX_CONCURRENT)
                )
            )

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1 and "max_concurrent_requests" in refused.text
    assert httpx.get(f"{server}/health").status_code == 200


def metric(url: str, name: str, **labels: str) -> float:
    """A sample of the server's Prometheus ``/metrics`` (0 when it has none yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_a_request_whose_client_has_gone_is_dropped_before_inference(tarball: Path) -> None:
    # a lone request waits up to 2 s for its batch to fill: time for its client to leave
    with serving(str(tarball), "--max-wait-ms", "2000") as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"input": "Who founded Halvard?"}).encode()
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                b"content-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            time.sleep(0.5)  # queued, not yet run
        deadline = time.monotonic() + 10
        gone = {"endpoint": "/v1/embeddings", "reason": "client_gone"}
        while metric(url, "sphana_request_failures_total", **gone) < 1:
            assert time.monotonic() < deadline, "the server never noticed the client leave"
            time.sleep(0.1)
        time.sleep(2.5)  # past the batch deadline: the dropped request must not have run
        assert metric(url, "sphana_batch_size_count", model="embedding") == 0
        # and the server keeps serving: the next request runs (after its own wait)
        response = httpx.post(f"{url}/v1/embeddings", json={"input": "Halvard"}, timeout=30)
        assert response.status_code == 200
        assert metric(url, "sphana_batch_size_count", model="embedding") == 1


def test_bundles_load_and_a_tampered_release_never_starts(built: Path, tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    shutil.copytree(built / "target/bundles", bundles)
    with serving(*(str(p) for p in sorted(bundles.iterdir()))) as url:
        info = httpx.get(f"{url}/info").json()
        assert set(info["components"]) == {p.name for p in bundles.iterdir()}
    model = next(p for p in (bundles / "embedding").rglob("*.onnx"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LAUNCH,
            "serve",
            *(str(p) for p in sorted(bundles.iterdir())),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert model.name in proc.stderr and "sha256" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("sphana-serve-*")), "a refused release leaves nothing behind"


def test_stdio_answers_a_scripted_session(tarball: Path) -> None:
    lines = [
        {"id": 1, "op": "ping"},
        "this is not json",
        {"id": 3, "op": "embed", "inputs": TEXTS[:2]},
        {"id": 4, "op": "frobnicate"},
        {"id": 5, "op": "embed", "inputs": []},
        {"id": 6, "op": "generate", "prompt": "Where is Halvard?", "max_new_tokens": 4},
        {"id": 7, "op": "relations", "text": "Ines Varga founded the Lab in Halvard."},
        {"id": 8, "op": "rerank", "query": "Who founded it?", "texts": TEXTS},
        {"id": 9, "op": "relations", "text": "Ines Varga.", "entities": [{"start": 0, "end": 99}]},
        {"id": 10, "op": "query", "query": "Who founded the Lab?", "top_k": 2},
    ]
    script = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCH, "serve", "--stdio", str(tarball), "--threads", "1"],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == len(lines)
    assert out[0] == {"id": 1, "ok": True, "version": out[0]["version"]}
    assert "not a JSON line" in out[1]["error"]
    assert out[2]["id"] == 3 and len(out[2]["embeddings"]) == 2
    assert "frobnicate" in out[3]["error"] and "inputs" in out[4]["error"]
    assert out[5]["id"] == 6 and isinstance(out[5]["generated_text"], str)
    from sphana.entities import detect

    expected = [m for s in detect(lines[6]["text"], 400) for m in s["mentions"]]
    assert out[6]["entities"] == expected and len(out[6]["pairs"]) >= 1
    assert sorted(r["index"] for r in out[7]["results"]) == [0, 1, 2]
    assert out[7]["scored_by"] == "gnn" and "entities[0]" in out[8]["error"]
    assert len(out[9]["passages"]) == 2 and isinstance(out[9]["answer"], str)


def test_relations_detected_as_ingest_does_and_scored_both_ways(server: str) -> None:
    from sphana.entities import detect

    text = "Ines Varga founded the Northreach Tidal Computing Lab in Halvard."
    response = httpx.post(f"{server}/v1/relations", json={"text": text})
    assert response.status_code == 200, response.text
    out = response.json()
    expected = [m for s in detect(text, 400) for m in s["mentions"]]
    assert out["entities"] == expected
    assert len(out["pairs"]) == 3  # every two of the three mentions
    for pair in out["pairs"]:
        for reading in ("e1->e2", "e2->e1"):
            assert abs(sum(pair["scores"][reading].values()) - 1) < 1e-4
        if pair["relation"] is not None:
            assert pair["relation"]["label"] != "no_relation"
    spans = [{"start": 0, "end": 10}, {"start": 57, "end": 64, "type": "LOC"}]
    given = httpx.post(f"{server}/v1/relations", json={"text": text, "entities": spans}).json()
    assert [e["text"] for e in given["entities"]] == ["Ines Varga", "Halvard"]
    assert len(given["pairs"]) == 1
    same = next(p for p in out["pairs"] if p["e2"]["text"] == "Halvard" and p["e1"]["start"] == 0)
    for reading in ("e1->e2", "e2->e1"):  # the same pair, scored in another batch (INT8)
        got, want = given["pairs"][0]["scores"][reading], same["scores"][reading]
        assert got.keys() == want.keys()
        assert max(abs(got[k] - want[k]) for k in got) < 2e-3


def test_served_rankings_and_relations_equal_what_the_build_measured(
    built: Path, tarball: Path
) -> None:
    # serving parity on the build's validation data, fp32 as the export's fp32 gates measure
    from sphana.serving import parity

    target = built / "target"
    manifest = json.loads((target / "manifests/latest.json").read_text())
    flags = ("--precision", "fp32", "--max-inputs", "4096", "--auto-truncate")
    with serving(str(tarball), *flags) as url, httpx.Client(base_url=url, timeout=120) as client:

        def post(path: str, body: dict) -> object:
            response = client.post(path, json=body)
            assert response.status_code == 200, response.text
            return response.json()

        ranked = parity.ranker(post, target, manifest, "fp32")
        relations = parity.relation(post, target, manifest, "fp32")
    assert ranked["queries"] > 0
    # every validation query ranked as the build's graphs rank it (a near-tie may swap)
    assert ranked["identical_up_to_ties"] == ranked["queries"], ranked
    assert ranked["served"]["ndcg@10"] == pytest.approx(ranked["export"]["ndcg@10"], abs=1e-6)
    assert ranked["served"]["mrr"] == pytest.approx(ranked["export"]["mrr"], abs=1e-6)
    assert relations["examples"] > 0 and relations["unpaired"] == 0
    assert relations["served"] == relations["export"]


def test_rerank_orders_by_the_graph_ranker(server: str) -> None:
    texts = [
        "The weather was mild that spring.",
        "Ines Varga founded the Northreach Tidal Computing Lab in Halvard.",
        "Halvard is a port city in Ostravel.",
    ]
    body = {"query": "Who founded the Northreach Tidal Computing Lab?", "texts": texts}
    response = httpx.post(f"{server}/v1/rerank", json=body)
    assert response.status_code == 200 and response.headers["x-scored-by"] == "gnn"
    ranked = response.json()
    assert sorted(r["index"] for r in ranked) == [0, 1, 2]
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    again = httpx.post(f"{server}/v1/rerank", json={**body, "top_n": 1, "return_text": True})
    assert again.json() == [{**ranked[0], "text": texts[ranked[0]["index"]]}]


def test_query_answers_with_cited_passages_and_step_timings(server: str, built: Path) -> None:
    chunks = {
        c["id"]: c
        for c in map(json.loads, (built / "target/ingest/chunks.jsonl").read_text().splitlines())
    }
    body = {"query": "Who founded the Northreach Tidal Computing Lab?", "top_k": 3}
    response = httpx.post(f"{server}/v1/query", json=body, timeout=60)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["query"] == body["query"] and isinstance(out["answer"], str)
    assert out["ranked_by"] == "gnn" and len(out["passages"]) == 3
    for p in out["passages"]:
        chunk = chunks[p["id"]]
        assert (p["document"], p["section"], p["start"], p["end"]) == (
            chunk["doc_id"],
            chunk["section"],
            chunk["start"],
            chunk["end"],
        )
    assert out["timings_ms"]["total"] >= out["timings_ms"]["generate"] > 0
    assert "x-total-time" in response.headers
    # the same question, the same answer (greedy; the release is deterministic)
    assert httpx.post(f"{server}/v1/query", json=body, timeout=60).json()["answer"] == out["answer"]
    assert 'endpoint="/v1/query"' in httpx.get(f"{server}/metrics").text
