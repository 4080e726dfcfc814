"""Experiments, the model registry and remotes, with real git, DVC, GTO tags and an S3 server
(moto's, on 127.0.0.1) as the DVC remote. The tests share one repository and run in order: the
registry's history is the story of one team."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REGISTRY_BLOCKED, commit_all, copy_built, dvc, run, serving, sphana

BUCKET = "sphana-remote"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_url():
    """moto's S3 server on 127.0.0.1 with an empty bucket, and credentials for it; stopped
    afterwards."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
            yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def repo(dvc_built, s3_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built tiny repository with the S3 server as its default DVC remote (committed)."""
    repo = copy_built(dvc_built[0], tmp_path_factory.mktemp("registry") / "repo")
    dvc("remote", "add", "-d", "storage", f"s3://{BUCKET}/cache", cwd=repo)
    dvc("remote", "modify", "storage", "endpointurl", s3_url, cwd=repo)
    commit_all(repo, "DVC remote on S3")
    return repo


def artifacts(*args: str, cwd: Path, check: bool = True):
    return sphana("artifacts", *args, cwd=cwd, check=check)


def tags(repo: Path) -> list[str]:
    return run(["git", "tag"], cwd=repo).stdout.split()


def gnn_hidden(bundle: Path) -> int:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return manifest["provenance"]["stages"]["train_gnn"]["params"]["gnn"]["hidden"]


def test_register_refuses_what_it_cannot_vouch_for(repo: Path) -> None:
    proc = artifacts("register", "embedding", "1.0", cwd=repo, check=False)
    assert proc.returncode == 1 and "not a semantic version" in proc.stderr
    proc = artifacts("register", "encoder", "0.1.0", cwd=repo, check=False)
    assert "'encoder' is not an artifact" in proc.stderr and "embedding" in proc.stderr

    readme = repo / "README.md"
    readme.write_text(readme.read_text() + "\nedited\n")
    proc = artifacts("register", "embedding", "0.1.0", cwd=repo, check=False)
    assert proc.returncode == 1 and "uncommitted changes" in proc.stderr
    run(["git", "checkout", "README.md"], cwd=repo)

    # an ONNX file altered after the build: its manifest no longer verifies
    onnx = next((repo / "target/artifacts/embedding").glob("*/onnx/embedding.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    proc = artifacts("register", "embedding", "0.1.0", cwd=repo, check=False)
    assert proc.returncode == 1
    assert "refusing to register embedding v0.1.0" in proc.stderr and "sha256" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tags(repo) == []
    dvc("checkout", "--force", cwd=repo)

    for name in ("embedding", "gnn", "llm", "release"):
        artifacts("register", name, "0.1.0", cwd=repo)
    proc = artifacts("register", "gnn", "v0.1.0", cwd=repo, check=False)
    assert "already exists" in proc.stderr
    proc = artifacts("register", "gnn", "0.1.1", cwd=repo, check=False)
    assert "already registered in this commit" in proc.stderr
    assert sorted(tags(repo)) == [
        "embedding@v0.1.0",
        "gnn@v0.1.0",
        "llm@v0.1.0",
        "release@v0.1.0",
    ]
    # annotated tags: what GTO and `dvc artifacts get` read
    assert run(["git", "cat-file", "-t", "gnn@v0.1.0"], cwd=repo).stdout.strip() == "tag"


def test_push_wipe_the_cache_pull_and_verify(repo: Path) -> None:
    dvc("push", cwd=repo)
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo / "target/bundles")
    dvc("pull", cwd=repo)
    sphana("verify", "target/manifests/latest.json", "--lock", "dvc.lock", cwd=repo)
    for component in ("embedding", "relation", "gnn", "llm"):
        sphana("verify", f"target/bundles/{component}", cwd=repo)


def test_queued_sweep_leaves_the_workspace_alone_until_apply(repo: Path) -> None:
    manifest = (repo / "target/manifests/latest.json").read_bytes()
    # a whole config group switched: DVC composes conf/ with it when the experiment is queued
    dvc("exp", "run", "--queue", "-S", "gnn=default", "--name", "gnn-default", cwd=repo)
    assert exp_params(repo) == {"gnn-default": 128}  # conf/gnn/default.yaml (tiny: 16)
    dvc("queue", "remove", "gnn-default", cwd=repo)
    dvc("exp", "run", "--queue", "-S", "gnn.hidden=8,12", cwd=repo)
    status = run_the_queue(repo)
    assert status.count("Success") == 2, status + worker_logs(repo)
    assert run(["git", "status", "--porcelain"], cwd=repo).stdout == ""
    assert (repo / "target/manifests/latest.json").read_bytes() == manifest

    exps = {hidden: name for name, hidden in exp_params(repo).items()}
    assert sorted(exps) == [8, 12]
    for data in experiments(repo).values():  # every component's metrics, per experiment
        for stage in ("train_embedding", "train_relation", "train_gnn", "train_llm"):
            assert f"target/metrics/{stage}.json" in data["metrics"], sorted(data["metrics"])
    plots = dvc("plots", "diff", exps[8], exps[12], "--json", cwd=repo).stdout
    assert exps[8] in plots and exps[12] in plots and "train_gnn" in plots

    dvc("exp", "apply", exps[12], cwd=repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["gnn"]["hidden"] == 12
    sphana("verify", "target/manifests/latest.json", "--lock", "dvc.lock", cwd=repo)
    commit_all(repo, "gnn.hidden=12 (experiment applied)")
    assert ran_nothing(dvc("repro", cwd=repo))
    artifacts("register", "gnn", "0.2.0", cwd=repo)
    dvc("push", cwd=repo)


def run_the_queue(repo: Path, seconds: float = 900) -> str:
    """`dvc queue start` and wait until nothing is queued or running: `dvc queue status` at the
    end. One worker: concurrent celery workers sometimes hang on each other's result files
    (treeverse/dvc#10398, #10428), and a worker may stop with tasks still queued (#10562), so a
    queue with no worker left is started again rather than waited on forever."""
    dvc("queue", "start", "-j", "1", cwd=repo)
    deadline = time.monotonic() + seconds
    idle_since = None  # when the queue was last seen with tasks but no worker
    while True:
        status = dvc("queue", "status", cwd=repo, timeout=120).stdout
        if "Queued" not in status and "Running" not in status:
            return status
        now = time.monotonic()
        assert now < deadline, status + worker_logs(repo)
        if "Running" in status or "0 active, 0 idle" not in status:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since > 30:  # a worker takes seconds to start; this one is gone
            dvc("queue", "start", "-j", "1", cwd=repo)
            idle_since = None
        time.sleep(3)


def worker_logs(repo: Path) -> str:
    """What the queue's celery workers printed (where a stalled queue says why)."""
    logs = sorted((repo / ".dvc/tmp/exps/celery").glob("*.out"))
    return "".join(f"\n--- {log.name}\n{log.read_text(errors='replace')[-4000:]}" for log in logs)


def experiments(repo: Path) -> dict[str, dict]:
    """``dvc exp show``: experiment name -> its data (params, metrics), queued ones included."""
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)
    return {
        exp["name"]: exp["revs"][0]["data"]
        for baseline in shown
        for exp in baseline.get("experiments") or []
    }


def exp_params(repo: Path) -> dict[str, int]:
    return {
        name: data["params"]["params.yaml"]["data"]["gnn"]["hidden"]
        for name, data in experiments(repo).items()
    }


def ran_nothing(proc) -> bool:
    return "Running stage" not in proc.stdout + proc.stderr


def test_deployer_gets_the_promoted_version_then_the_previous_after_rollback(
    repo: Path, tmp_path: Path
) -> None:
    artifacts("promote", "gnn", "0.1.0", "--stage", "prod", cwd=repo)
    proc = artifacts("promote", "gnn", "0.2.0", "--stage", "prod", cwd=repo)
    assert "v0.1.0 -> v0.2.0" in proc.stderr
    # the deployer's side: a clone without the DVC cache, files from the S3 remote, no sphana
    origin = tmp_path / "origin"
    run(["git", "clone", "-q", str(repo), str(origin)], cwd=tmp_path)

    def deploy(*selector: str) -> Path:
        out = tmp_path / f"deploy-{len(list(tmp_path.iterdir()))}"
        dvc("artifacts", "get", str(origin), "gnn", *selector, "-o", str(out), cwd=tmp_path)
        sphana("verify", str(out), cwd=tmp_path)
        return out

    assert gnn_hidden(deploy("--stage", "prod")) == 12
    proc = artifacts("rollback", "gnn", "--stage", "prod", cwd=repo)
    assert "v0.2.0 -> v0.1.0" in proc.stderr
    run(["git", "fetch", "-q", "--tags", "--force"], cwd=origin)
    assert gnn_hidden(deploy("--stage", "prod")) == 16  # conf/gnn/tiny.yaml
    assert gnn_hidden(deploy("--rev", "v0.2.0")) == 12

    # GTO sees what DVC sees
    listed = json.loads(artifacts("list", "gnn", "--json", cwd=repo).stdout)
    assert [(r["version"], r["stages"], r["latest"]) for r in listed] == [
        ("v0.2.0", [], True),
        ("v0.1.0", ["prod"], False),
    ]
    gto = run([str(Path(sys.executable).parent / "gto"), "show", "gnn", "--json"], cwd=repo)
    assert "prod" in json.dumps([v for v in json.loads(gto.stdout) if v["version"] == "v0.1.0"])


def test_a_server_follows_the_stage_through_promote_and_rollback(
    repo: Path, tmp_path: Path
) -> None:
    """`sphana serve --registry CLONE --stage prod`: serves what prod holds (bundles from the S3
    remote), and a promote or rollback in the registry reaches it without a restart."""
    import httpx

    artifacts("promote", "embedding", "0.1.0", "--stage", "prod", cwd=repo)
    clone = tmp_path / "replica"  # a replica's clone of the registry: it fetches the tags
    run(["git", "clone", "-q", str(repo), str(clone)], cwd=tmp_path)

    def following(url: str) -> tuple[dict, str]:
        info = httpx.get(f"{url}/info", timeout=10).json()
        return info["registry"]["serving"], info["components"]["gnn"]["sha256"]

    def wait_for(url: str, version: str) -> tuple[float, str]:
        start, deadline = time.monotonic(), time.monotonic() + 180
        while time.monotonic() < deadline:
            serving, sha = following(url)
            if serving.get("gnn") == version:
                return time.monotonic() - start, sha
            time.sleep(0.1)
        raise AssertionError(f"the server never served gnn {version}: {following(url)}")

    args = ("--registry", str(clone), "--stage", "prod", "--poll-seconds", "0.5")
    with serving(*args, "--threads", "1", blocked=REGISTRY_BLOCKED) as url:
        serving_now, first_sha = following(url)
        assert serving_now == {"embedding": "v0.1.0", "gnn": "v0.1.0"}
        r = httpx.post(f"{url}/v1/rerank", json={"query": "Halvard", "texts": ["a", "b"]})
        assert r.status_code == 200 and r.headers["x-scored-by"] == "gnn"

        artifacts("promote", "gnn", "0.2.0", "--stage", "prod", cwd=repo)
        seconds, promoted_sha = wait_for(url, "v0.2.0")
        print(f"promote reached the polling server in {seconds:.1f} s")
        assert promoted_sha != first_sha
        r = httpx.post(f"{url}/v1/rerank", json={"query": "Halvard", "texts": ["a", "b"]})
        assert r.status_code == 200

        artifacts("rollback", "gnn", "--stage", "prod", cwd=repo)
        _, rolled_back_sha = wait_for(url, "v0.1.0")
        assert rolled_back_sha == first_sha
        info = httpx.get(f"{url}/info", timeout=10).json()
        assert info["reload"]["count"] == 2 and info["registry"]["failed"] is None


def test_list_diff_bundle_and_parity_samples(repo: Path, tmp_path: Path) -> None:
    from sphana import samples

    listed = json.loads(artifacts("list", "--json", cwd=repo).stdout)
    names = {(r["name"], r["version"]) for r in listed}
    assert names == {
        ("embedding", "v0.1.0"),
        ("gnn", "v0.1.0"),
        ("gnn", "v0.2.0"),
        ("llm", "v0.1.0"),
        ("release", "v0.1.0"),
    }
    for row in listed:
        assert row["metrics"], row
    release = next(r for r in listed if r["name"] == "release")
    assert set(release["metrics"]) == {
        "embedding recall@5",
        "relation macro_f1",
        "gnn ndcg@10",
        "llm perplexity",
    }
    assert "v0.2.0 (latest)" in artifacts("list", "gnn", cwd=repo).stdout

    diff = json.loads(artifacts("diff", "gnn", "0.1.0", "0.2.0", "--json", cwd=repo).stdout)
    assert diff["params"]["changed"]["gnn.hidden"] == [16, 12]
    assert diff["data"]["same"] > 0 and diff["files"]["changed"] and diff["metrics"]["changed"]
    assert "embedding.lr" not in diff["params"]["changed"]

    out = tmp_path / "gnn-0.2.0"
    artifacts("bundle", "gnn", "0.2.0", str(out), cwd=repo)
    assert gnn_hidden(out) == 12
    assert (
        "already exists"
        in artifacts("bundle", "gnn", "0.2.0", str(out), cwd=repo, check=False).stderr
    )
    artifacts("bundle", "release", "0.1.0", str(tmp_path / "release"), cwd=repo)
    sphana("verify", str(tmp_path / "release/latest.tar.gz"), cwd=repo)

    for name, version in (("gnn", "0.2.0"), ("embedding", "0.1.0"), ("llm", "0.1.0")):
        file = tmp_path / f"{name}.json"
        artifacts("parity-samples", name, version, "-o", str(file), cwd=repo)
        result = json.loads(file.read_text())
        assert result["registry_version"] == f"v{version}" and result["cases"]
        bundle = tmp_path / f"{name}-bundle"
        artifacts("bundle", name, version, str(bundle), cwd=repo)
        assert samples.replay(result, bundle) == []
        # a runtime that computes something else is caught
        model = next(iter(result["models"].values()))
        first = next(iter(model["outputs"][0].values()))
        first["data"][0] += 1.0
        assert samples.replay(result, bundle)


def test_repro_pull_reuses_a_teammates_build(repo: Path, tmp_path: Path) -> None:
    clone = tmp_path / "teammate"
    run(["git", "clone", "-q", str(repo), str(clone)], cwd=tmp_path)
    proc = dvc("repro", "--pull", cwd=clone)
    assert ran_nothing(proc), proc.stdout
    sphana("verify", "target/manifests/latest.json", "--lock", "dvc.lock", cwd=clone)
    assert os.path.getsize(clone / "target/manifests/latest.tar.gz") > 0
