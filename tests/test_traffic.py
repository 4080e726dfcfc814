"""Traffic between versions on a real server: sticky weighted splits, pins, shadow copies that
never change an answer, outcomes and the A/B report; its statistics against scipy's."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import serving

from sphana.serving import traffic

TOKEN = "traffic-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
SUFFIX = "-candidate"


# --- the statistics, against scipy --------------------------------------------------------------


@pytest.mark.parametrize(
    ("s1", "n1", "s2", "n2"), [(45, 100, 30, 100), (520, 1000, 480, 1000), (3, 40, 9, 50)]
)
def test_two_proportion_z_equals_scipys_chi_square(s1: int, n1: int, s2: int, n2: int) -> None:
    from scipy.stats import chi2_contingency

    z, p = traffic.two_proportion_z(s1, n1, s2, n2)
    chi2, expected_p, _, _ = chi2_contingency([[s1, n1 - s1], [s2, n2 - s2]], correction=False)
    assert z * z == pytest.approx(chi2, rel=1e-9)
    assert p == pytest.approx(expected_p, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_welch_t_and_the_interval_equal_scipys(seed: int) -> None:
    from scipy import stats

    rng = np.random.default_rng(seed)
    a = rng.normal(0.5, 1.0, size=40 + 10 * seed)
    b = rng.normal(0.2, 2.0, size=25 + 5 * seed)
    t, p = traffic.welch_t(a.mean(), a.var(ddof=1), len(a), b.mean(), b.var(ddof=1), len(b))
    expected = stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(expected.statistic, rel=1e-9)
    assert p == pytest.approx(expected.pvalue, rel=1e-7)

    arm = traffic.Arm()
    for x in a:
        arm.reward(float(x))
    low, high = arm.interval()
    half = stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a))
    assert (low, high) == pytest.approx((a.mean() - half, a.mean() + half), rel=1e-7)
    for df in (1, 3, 30):
        for x in (-2.5, 0.3, 4.0):
            assert traffic.t_sf(x, df) == pytest.approx(stats.t.sf(x, df), rel=1e-9)


def test_split_specs_and_the_draw() -> None:
    assert traffic.parse_split("embedding=0.1.0:90,0.2.0:10") == (
        "embedding",
        {"0.1.0": 90.0, "0.2.0": 10.0},
    )
    for bad in ("embedding", "embedding=0.1.0", "embedding=0.1.0:x", "e=0.1.0:0", "=a:1"):
        with pytest.raises(ValueError, match="split"):
            traffic.parse_split(bad)
    weights = {"a": 90.0, "b": 10.0}
    draws = [traffic.choose(weights, f"user-{i}", "embedding") for i in range(20_000)]
    assert abs(draws.count("b") / len(draws) - 0.10) < 0.01
    # moving weight from a to b moves only keys from a to b
    moved = [
        traffic.choose({"a": 80.0, "b": 20.0}, f"user-{i}", "embedding") for i in range(20_000)
    ]
    assert all(m == "b" for d, m in zip(draws, moved, strict=True) if d == "b")


# --- a server with a control and a candidate release -----------------------------------------


@pytest.fixture(scope="module")
def releases(dvc_built: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The control: the tiny release's tarball. The candidate: its bundles with every version
    relabelled (``<version>-candidate``)."""
    built = dvc_built[0]
    tmp = tmp_path_factory.mktemp("candidate")
    bundles = []
    for component in ("embedding", "relation", "gnn", "llm"):
        dest = tmp / component
        shutil.copytree(built / "target/bundles" / component, dest)
        manifest = json.loads((dest / "manifest.json").read_text())
        manifest["version"] += SUFFIX
        for entry in manifest["components"].values():
            entry["version"] += SUFFIX
        (dest / "manifest.json").write_text(json.dumps(manifest))
        bundles.append(str(dest))
    tarball = built / "target/manifests/latest.tar.gz"
    return {"control": str(tarball), "candidate": ",".join(bundles)}


@pytest.fixture(scope="module")
def server(releases: dict) -> str:
    with serving(
        releases["control"],
        "--variant",
        releases["candidate"],
        "--admin-token",
        TOKEN,
        "--threads",
        "1",
    ) as url:
        yield url


def versions_of(url: str) -> dict[str, str]:
    info = httpx.get(f"{url}/info", timeout=10).json()
    return {name: c["version"] for name, c in info["components"].items()}


def test_a_90_10_split_is_sticky_by_key_and_lands_within_3_points(server: str) -> None:
    control = versions_of(server)["embedding"]
    candidate = control + SUFFIX
    split = {"component": "embedding", "weights": {control: 90, candidate: 10}}
    assert httpx.post(f"{server}/admin/split", json=split, timeout=10).status_code == 401
    r = httpx.post(f"{server}/admin/split", json=split, headers=ADMIN, timeout=10)
    assert r.status_code == 200 and r.json()["splits"]["embedding"] == split["weights"]

    got: dict[str, str] = {}
    with httpx.Client(base_url=server, timeout=30) as http:
        for i in range(5000):
            r = http.get("/v2/models/embedding", headers={"x-sphana-key": f"user-{i}"})
            assert r.status_code == 200
            version = r.headers["x-component-version"]
            assert r.json()["versions"] == [version]  # the answer is the version's own
            got[f"user-{i}"] = version
        share = Counter(got.values())[candidate] / len(got)
        assert abs(share - 0.10) <= 0.03, share
        for i in range(0, 5000, 25):  # the same key, the same version
            r = http.get("/v2/models/embedding", headers={"x-sphana-key": f"user-{i}"})
            assert r.headers["x-component-version"] == got[f"user-{i}"]
        # a pin wins over the split; an unknown version is a 404 naming what is loaded
        r = http.get("/v2/models/embedding", headers={"x-sphana-version": candidate})
        assert r.headers["x-component-version"] == candidate
        r = http.get("/v2/models/embedding", headers={"x-sphana-version": "9.9.9"})
        assert r.status_code == 404 and candidate in r.json()["error"]["message"]
        # other components are not split: the control serves them
        assert (
            http.get("/v2/models/gnn").headers["x-component-version"] == versions_of(server)["gnn"]
        )

    bad = {"component": "embedding", "weights": {"9.9.9": 1}}
    r = httpx.post(f"{server}/admin/split", json=bad, headers=ADMIN, timeout=10)
    assert r.status_code == 422 and "9.9.9" in r.json()["error"]["message"]
    metrics = httpx.get(f"{server}/metrics", timeout=10).text
    assert f'sphana_request_seconds_count{{model="embedding",version="{candidate}"}}' in metrics


def test_outcomes_and_the_ab_report(server: str) -> None:
    from scipy.stats import chi2_contingency

    control = versions_of(server)["embedding"]
    candidate = control + SUFFIX
    split = {"component": "embedding", "weights": {control: 50, candidate: 50}}
    assert httpx.post(f"{server}/admin/split", json=split, headers=ADMIN, timeout=10).is_success
    counts = {control: [0, 0], candidate: [0, 0]}  # [successes, rewards]
    with httpx.Client(base_url=server, timeout=30) as http:
        for i in range(240):
            r = http.post(
                "/v1/embeddings", json={"input": f"query {i}"}, headers={"x-sphana-key": f"k{i}"}
            )
            version = r.headers["x-component-version"]
            reward = 1.0 if (i % 3 == 0) == (version == candidate) else 0.0  # candidate wins
            f = http.post(
                "/v1/feedback", json={"request_id": r.headers["x-request-id"], "reward": reward}
            )
            assert f.status_code == 200 and f.json()["version"] == version
            counts[version][0] += reward
            counts[version][1] += 1
        r = http.post("/v1/feedback", json={"request_id": "nope", "reward": 1})
        assert r.status_code == 404 and "x-request-id" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/admin/ab", params={"component": "embedding"}).status_code == 401
    report = httpx.get(
        f"{server}/admin/ab", params={"component": "embedding"}, headers=ADMIN, timeout=10
    ).json()
    assert report["control"] == control
    rows = report["versions"]
    assert rows[candidate]["rewards"] == counts[candidate][1]
    assert rows[candidate]["requests"] >= counts[candidate][1]
    assert rows[candidate]["latency_ms"]["p95"] >= rows[candidate]["latency_ms"]["p50"] > 0
    s1, n1 = counts[candidate]
    s2, n2 = counts[control]
    assert rows[candidate]["mean_reward"] == pytest.approx(s1 / n1)
    low, high = rows[candidate]["ci95"]
    assert low < s1 / n1 < high
    test = rows[candidate]["vs_control"]
    assert test["test"] == "two-proportion z-test" and test["enough_data"]
    _, p, _, _ = chi2_contingency([[s1, n1 - s1], [s2, n2 - s2]], correction=False)
    assert test["p_value"] == pytest.approx(p, rel=1e-9)
    assert test["significant"] == (p < 0.05)
    assert rows[control]["vs_control"] is None


TEXT = "Halvard is a port city in Ostravel. Ines Varga founded the Northreach Lab in 2011."
SHADOWED = {  # component: (endpoint, body, the part of the answer that must not change)
    "embedding": ("/v1/embeddings", {"input": TEXT}, lambda r: r["data"]),
    "relation": ("/v1/relations", {"text": TEXT}, lambda r: r),
    "gnn": ("/v1/rerank", {"query": "Where is Halvard?", "texts": TEXT.split(". ")}, lambda r: r),
    "llm": (
        "/v1/generate",
        {"prompt": "Where is Halvard?", "max_new_tokens": 6},
        lambda r: (r["generated_text"], r["generated_tokens"]),
    ),
}


@pytest.mark.parametrize("component", sorted(SHADOWED))
def test_shadow_traffic_never_changes_a_response(server: str, component: str) -> None:
    endpoint, body, answer = SHADOWED[component]
    control = versions_of(server)[component]
    candidate = control + SUFFIX
    with httpx.Client(base_url=server, timeout=60) as http:
        unsplit = {"component": component, "weights": None}  # the control serves it all
        assert http.post("/admin/split", json=unsplit, headers=ADMIN).is_success
        alone = [http.post(endpoint, json=body) for _ in range(3)]
        before = http.get("/admin/ab", params={"component": component}, headers=ADMIN).json()
        served_before = (before["versions"].get(candidate) or {}).get("requests", 0)
        shadow = {"component": component, "version": candidate, "share": 1.0}
        assert http.post("/admin/shadow", json=shadow, headers=ADMIN).is_success
        shadowed = [http.post(endpoint, json=body) for _ in range(8)]
        for r in (*alone, *shadowed):
            assert r.status_code == 200 and r.headers["x-component-version"] == control
            assert answer(r.json()) == answer(alone[0].json())
        report = {}
        for _ in range(200):  # the copies run after the answers
            report = http.get("/admin/ab", params={"component": component}, headers=ADMIN).json()
            row = report["versions"].get(candidate) or {}
            compared = (row.get("shadow") or {}).get("compared", 0)
            if compared + _dropped(http, component, candidate) >= 8:
                break
            time.sleep(0.1)
        row = report["versions"][candidate]
        assert row["shadow"]["compared"] + _dropped(http, component, candidate) == 8
        assert row["shadow"]["agreement"] == pytest.approx(1.0)  # the same weights, relabelled
        assert row["requests"] == served_before  # a shadow never serves
        assert report["shadow"] == {"version": candidate, "share": 1.0}
        off = {"component": component, "version": None}
        assert http.post("/admin/shadow", json=off, headers=ADMIN).json()["shadows"] == {}


def _dropped(http: httpx.Client, component: str, version: str) -> int:
    """Copies of ``component``'s requests to ``version`` dropped (the version's name alone is
    shared by every component's candidate)."""
    for line in http.get("/metrics").text.splitlines():
        labels = (f'model="{component}"', f'version="{version}"', 'outcome="dropped"')
        if line.startswith("sphana_shadow_requests_total") and all(x in line for x in labels):
            return int(float(line.split()[-1]))
    return 0


# --- configuration of the traffic flags, and a registry stage that fails to load -------------


def test_split_flags_and_file(tmp_path: Path) -> None:
    from sphana.errors import InputError, SphanaError
    from sphana.serving.server import parse_shadows, parse_splits

    file = tmp_path / "splits.yaml"
    file.write_text("embedding: {0.1.0: 90, 0.2.0: 10}\ngnn: {'1.0': 1}\n")
    splits = parse_splits(["gnn=2.0.0:1"], file)  # a flag wins over the file
    assert splits == {"embedding": {"0.1.0": 90.0, "0.2.0": 10.0}, "gnn": {"2.0.0": 1.0}}
    file.write_text("embedding: {0.1.0: -1}\n")
    with pytest.raises(InputError, match=r"splits.yaml: split of embedding: .*>= 0"):
        parse_splits([], file)
    file.write_text("- just a list\n")
    with pytest.raises(InputError, match=r"splits.yaml: expected \{component"):
        parse_splits([], file)
    with pytest.raises(SphanaError, match="--split: split 'embedding=0.1.0'"):
        parse_splits(["embedding=0.1.0"], None)
    assert parse_shadows(["relation=0.2.0:0.25"]) == {"relation": ("0.2.0", 0.25)}
    with pytest.raises(SphanaError, match=r"--shadow: .*\(0, 1\]"):
        parse_shadows(["relation=0.2.0:3"])


def test_a_stage_that_fails_to_load_is_not_retried_until_it_moves(tmp_path: Path) -> None:
    """The follower on a real git repository with GTO's tags: a failed assignment is tried once;
    a new one is tried again."""
    import subprocess

    from sphana.serving.follow import Follower
    from sphana.serving.live import ReloadError

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("config", "user.email", "t@sphana.invalid")
    git("config", "user.name", "t")
    for version in ("0.1.0", "0.2.0"):
        (tmp_path / "f").write_text(version)
        git("add", "f")
        git("commit", "-q", "-m", version)
        git("tag", "-a", f"gnn@v{version}", "-m", "register")
    git("tag", "-a", "gnn#prod#1", "gnn@v0.1.0^{}", "-m", "assign")

    follower = Follower(tmp_path, "prod", tmp_path / "cache", 0.1)
    follower.serving = follower.resolve()
    assert follower.serving == {"gnn": "v0.1.0"}
    calls: list[str] = []

    async def failing(fetch, origin: str) -> dict:
        calls.append(origin)
        raise ReloadError("parity", "1 parity sample(s) differ")

    time.sleep(1.1)  # the next tag is newer by its tagger time, as DVC orders them
    git("tag", "-a", "gnn#prod#2", "gnn@v0.2.0^{}", "-m", "assign")
    asyncio.run(follower.poll(failing))
    assert calls == ["registry"] and follower.failed["assignment"] == {"gnn": "v0.2.0"}
    assert follower.failed["reason"] == "parity" and follower.serving == {"gnn": "v0.1.0"}
    asyncio.run(follower.poll(failing))
    assert calls == ["registry"]  # not retried
    time.sleep(1.1)
    git("tag", "-a", "gnn#prod#3", "gnn@v0.1.0^{}", "-m", "roll back")
    asyncio.run(follower.poll(failing))
    assert follower.failed is None and calls == ["registry"]  # back to what serves: nothing to do
    time.sleep(1.1)
    git("tag", "-a", "gnn#prod#4", "gnn@v0.2.0^{}", "-m", "promote again")
    asyncio.run(follower.poll(failing))
    assert calls == ["registry", "registry"]  # the stage moved: tried again
