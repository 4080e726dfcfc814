"""Hot reload of ``sphana serve`` under load: a real server on 127.0.0.1 swapping between two
releases of the tiny build while clients keep calling it, and refusing releases that fail their
checksums or their parity samples while the old one keeps serving."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, launch, serving, wait_ready

TOKEN = "test-admin-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
B_VERSION = "0.2.0-reload"


@pytest.fixture(scope="module")
def releases(dvc_built: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A: the tiny release's tarball (every component). B: its embedding, relation and ranker
    bundles relabelled as another version, without the generator (so a response says which one
    served it by its status as well as its header). Plus a B whose model file was altered, and
    a B whose parity samples no longer match its models (their checksum updated: it verifies)."""
    built = dvc_built[0]
    tmp = tmp_path_factory.mktemp("releases")
    tarball = built / "target/manifests/latest.tar.gz"

    def copy_b(name: str) -> list[Path]:
        out = []
        for component in ("embedding", "relation", "gnn"):
            dest = tmp / name / component
            shutil.copytree(built / "target/bundles" / component, dest)
            manifest = json.loads((dest / "manifest.json").read_text())
            manifest["version"] = B_VERSION
            (dest / "manifest.json").write_text(json.dumps(manifest))
            out.append(dest)
        return out

    b = copy_b("b")
    tampered = copy_b("tampered")
    entry = json.loads((tampered[0] / "manifest.json").read_text())["components"]["embedding"]
    model = tampered[0] / entry["path"]
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))

    drifted = copy_b("drifted")
    manifest_file = drifted[0] / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    entry = manifest["components"]["embedding"]
    rel = f"{Path(entry['path']).parent.as_posix()}/parity_samples.json"
    samples_file = drifted[0] / rel
    samples = json.loads(samples_file.read_text())
    for model_samples in samples["models"].values():
        first = next(iter(model_samples["outputs"][0].values()))
        first["data"][0] += 0.5  # far beyond any tolerance
    samples_file.write_text(json.dumps(samples))
    for f in entry["files"]:
        if f["path"] == rel:
            f["sha256"] = f"sha256:{hashlib.sha256(samples_file.read_bytes()).hexdigest()}"
            f["size"] = samples_file.stat().st_size
    manifest_file.write_text(json.dumps(manifest))
    return {
        "a": [str(tarball)],
        "b": [str(p) for p in b],
        "tampered": [str(p) for p in tampered],
        "drifted": [str(p) for p in drifted],
    }


@pytest.fixture(scope="module")
def server(releases: dict, tmp_path_factory: pytest.TempPathFactory):
    log = open(tmp_path_factory.mktemp("reload") / "server.log", "w+")  # noqa: SIM115
    with (
        log,
        serving(*releases["a"], "--threads", "1", "--admin-token", TOKEN, log=log) as url,
    ):
        yield url


def version_of(url: str) -> str:
    return httpx.get(f"{url}/health", timeout=10).json()["version"]


def reload(url: str, sources: list[str] | None, headers: dict | None = None) -> httpx.Response:
    body = {} if sources is None else {"release": sources}
    return httpx.post(f"{url}/admin/reload", json=body, headers=headers or ADMIN, timeout=300)


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and (m.group(1) or "") == want:
            return float(m.group(2))
    return 0.0


def test_reloads_under_load_fail_no_request_and_never_mix_versions(
    server: str, releases: dict
) -> None:
    a_version = version_of(server)
    assert a_version != B_VERSION
    stop = threading.Event()
    results: list[tuple[str, int, str]] = []  # (endpoint, status, version header)
    errors: list[str] = []
    deadline = time.monotonic() + 240  # bounded in time and in count

    def client(kind: str) -> None:
        with httpx.Client(base_url=server, timeout=60) as http:
            while not stop.is_set() and time.monotonic() < deadline and len(results) < 20_000:
                try:
                    if kind == "embed":
                        r = http.post("/v1/embeddings", json={"input": ["Where is Halvard?"]})
                    else:
                        body = {"prompt": "Halvard", "max_new_tokens": 2}
                        r = http.post("/v1/generate", json=body)
                    results.append((kind, r.status_code, r.headers.get("x-model-version", "")))
                except httpx.HTTPError as e:
                    errors.append(f"{kind}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(k,)) for k in ("embed", "embed", "generate")]
    for t in threads:
        t.start()
    try:
        seen = []
        for _ in range(3):
            for target, expected in ((releases["b"], B_VERSION), (releases["a"], a_version)):
                time.sleep(0.5)  # traffic on each version
                r = reload(server, target)
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["version"] == expected and body["status"] == "reloaded"
                assert set(body["timings"]) >= {"verify", "warmup", "parity"}
                seen.append(version_of(server))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert seen == [B_VERSION, a_version] * 3
    assert errors == []
    assert len(results) > 50
    served = {v for _, _, v in results}
    assert served == {a_version, B_VERSION}
    for kind, status, version in results:
        if kind == "embed":
            assert status == 200, (kind, status, version)
        else:  # B has no generator: its answer is a 404, A's a 200, never the other way round
            assert status == (200 if version == a_version else 404), (kind, status, version)
    assert metric(server, "sphana_reloads_total", origin="admin") >= 6


def test_a_tampered_release_and_one_whose_samples_drift_are_refused(
    server: str, releases: dict
) -> None:
    before = version_of(server)
    r = reload(server, releases["tampered"])
    assert r.status_code == 422 and r.json()["reason"] == "checksum", r.text
    assert "sha256" in r.json()["error"]["message"] or "mismatch" in r.json()["error"]["message"]
    assert r.json()["serving"] == before and version_of(server) == before

    r = reload(server, releases["drifted"])
    assert r.status_code == 422 and r.json()["reason"] == "parity", r.text
    assert "embedding" in r.json()["error"]["message"]
    assert version_of(server) == before
    ok = httpx.post(f"{server}/v1/embeddings", json={"input": "still serving"}, timeout=30)
    assert ok.status_code == 200 and ok.headers["x-model-version"] == before

    info = httpx.get(f"{server}/info", timeout=10).json()
    assert info["reload"]["last_failure"]["reason"] == "parity"
    assert info["reload"]["last_failure"]["serving"] == before
    assert metric(server, "sphana_reload_failures_total", reason="checksum") == 1
    assert metric(server, "sphana_reload_failures_total", reason="parity") == 1

    r = reload(server, ["/no/such/release.tar.gz"])
    assert r.status_code == 422 and r.json()["reason"] == "source"


def test_admin_needs_the_token_and_sighup_reloads(server: str, releases: dict) -> None:
    before = version_of(server)
    count = httpx.get(f"{server}/info", timeout=10).json()["reload"]["count"]
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        r = httpx.post(
            f"{server}/admin/reload", json={"release": releases["b"]}, headers=headers, timeout=60
        )
        assert r.status_code == 401, r.text
    assert version_of(server) == before
    assert httpx.get(f"{server}/info", timeout=10).json()["reload"]["count"] == count
    r = reload(server, None, {**ADMIN, "content-type": "application/json"})
    assert r.status_code == 200 and r.json()["version"] == before  # the sources it started from

    # SIGHUP: the same, from the process's owner
    pid = int(httpx.get(f"{server}/info", timeout=10).json()["pid"])
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        last = httpx.get(f"{server}/info", timeout=10).json()["reload"]["last"]
        if last and last["origin"] == "sighup":
            break
        time.sleep(0.2)
    assert last["origin"] == "sighup" and last["version"] == before


def test_a_server_without_a_token_refuses_admin(releases: dict) -> None:
    with serving(*releases["b"], "--threads", "1") as url:
        r = reload(url, releases["a"])
        assert r.status_code == 401 and "--admin-token" in r.json()["error"]["message"]
        assert version_of(url) == B_VERSION


def test_workers_share_one_port_and_each_reloads_on_sighup(releases: dict, tmp_path: Path) -> None:
    """``--workers 2``: two whole servers on one port; SIGHUP to the supervisor reaches both;
    SIGTERM stops both, and their copies of the release are removed."""
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    args = ("serve", *releases["a"], "--workers", "2", "--threads", "1", "--port", str(port))
    proc = launch(*args, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        pids: set[int] = set()
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:  # each new connection: any worker
            with httpx.Client() as fresh:
                r = fresh.get(f"{url}/info", timeout=10)
                if r.status_code == 200:
                    pids.add(r.json()["pid"])
        assert len(pids) == 2 and proc.pid not in pids

        proc.send_signal(signal.SIGHUP)
        reloaded: set[int] = set()
        deadline = time.monotonic() + 120
        while reloaded != pids and time.monotonic() < deadline:
            with httpx.Client() as fresh:
                info = fresh.get(f"{url}/info", timeout=10).json()
            if (info["reload"]["last"] or {}).get("origin") == "sighup":
                reloaded.add(info["pid"])
        assert reloaded == pids
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not list(tmp_path.glob("sphana-serve-*"))
