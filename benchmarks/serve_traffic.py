"""The serving lifecycle under load: reloads, splits and shadow traffic, in one run.

1. steady state: a closed-loop load (``--concurrency`` keep-alive clients, single-sentence
   ``POST /v1/embeddings``) for ``--seconds``: requests/s, p50/p99;
2. the same load while the server reloads the release ``--reloads`` times in a row
   (``POST /admin/reload``: verify, create and warm the sessions, replay the parity samples, swap):
   failed requests, p99 against steady state, and the time of one reload with its steps;
3. routing: the cost of drawing a version for a request (``Live.route`` with a 90/10 split), in
   process, and the served p50 with the split on against off;
4. shadow: the served p50/p95 with every embedding request copied to a candidate release
   against no copy (the candidate is the same release relabelled, loaded with ``--variant``).

    python benchmarks/serve_traffic.py [RELEASE] [--reloads 10] [--concurrency 8] [--seconds 8]

RELEASE defaults to ``target/manifests/latest.tar.gz`` and the candidate is made from
``target/bundles/`` (after ``make run``). It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import closed_loop, start_server  # noqa: E402

TOKEN = "benchmark"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
SUFFIX = "-candidate"


def candidate(bundles: Path, out: Path) -> str:
    """The release's bundles with every version relabelled: same weights, another version."""
    paths = []
    for component in ("embedding", "relation", "gnn", "llm"):
        if not (bundles / component).is_dir():
            continue
        shutil.copytree(bundles / component, out / component)
        manifest = json.loads((out / component / "manifest.json").read_text())
        manifest["version"] += SUFFIX
        for entry in manifest["components"].values():
            entry["version"] += SUFFIX
        (out / component / "manifest.json").write_text(json.dumps(manifest))
        paths.append(str(out / component))
    return ",".join(paths)


def admin(port: int, path: str, body: dict) -> dict:
    r = httpx.post(f"http://127.0.0.1:{port}{path}", json=body, headers=ADMIN, timeout=600)
    r.raise_for_status()
    return r.json()


async def during_reloads(port: int, concurrency: int, reloads: int) -> tuple[dict, list[dict]]:
    """The closed-loop load while ``reloads`` reloads run one after the other."""
    done = asyncio.Event()
    results: list[dict] = []

    async def reload_all() -> None:
        await asyncio.sleep(2.0)  # after the load's warm-up
        for _ in range(reloads):
            results.append(await asyncio.to_thread(admin, port, "/admin/reload", {}))
        done.set()

    task = asyncio.create_task(reload_all())
    load = await closed_loop(port, concurrency, until=done)
    await task
    return load, results


def routing_cost(calls: int = 200_000) -> float:
    """Microseconds per ``Live.route`` with a 90/10 split (hash, draw, find, hold, release)."""
    from sphana.serving.live import Live, Served

    def release(version: str) -> Served:
        model = SimpleNamespace(version=version)
        return Served(SimpleNamespace(models={"embedding": model}, version=version))

    live = Live(release("1"))
    live.add_variant(release("2"))
    live.set_split("embedding", {"1": 90, "2": 10})
    keys = [f"user-{i}" for i in range(calls)]
    start = time.perf_counter()
    for key in keys:
        live.release(live.route("embedding", key, None))
    return (time.perf_counter() - start) / calls * 1e6


def row(label: str, r: dict) -> str:
    return (
        f"  {label:<34} {r['requests_per_s']:8.1f} req/s   p50 {r['p50_ms']:7.2f} ms   "
        f"p95 {r['p95_ms']:7.2f} ms   p99 {r['p99_ms']:7.2f} ms   failed {r['errors']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "release", nargs="?", type=Path, default=Path("target/manifests/latest.tar.gz")
    )
    parser.add_argument("--bundles", type=Path, default=Path("target/bundles"))
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        variant = candidate(args.bundles, Path(tmp))
        proc, port, ready = start_server(
            args.release, args.threads, "--admin-token", TOKEN, "--variant", variant
        )
        try:
            version = httpx.get(f"http://127.0.0.1:{port}/info").json()["components"]["embedding"]
            version = version["version"]
            print(f"server ready in {ready:.1f} s; {args.concurrency} clients, 1 sentence each")
            steady = asyncio.run(closed_loop(port, args.concurrency, args.seconds))
            print(row("steady state", steady))
            load, reloads = asyncio.run(during_reloads(port, args.concurrency, args.reloads))
            print(row(f"during {len(reloads)} reloads", load))
            print(f"  p99 during reloads / steady: {load['p99_ms'] / steady['p99_ms']:.2f}x")
            seconds = [r["seconds"] for r in reloads]
            steps = {k: np.mean([r["timings"][k] for r in reloads]) for k in reloads[0]["timings"]}
            print(
                f"  one reload: {np.mean(seconds):.2f} s mean (min {min(seconds):.2f}, max "
                f"{max(seconds):.2f}); steps: "
                + ", ".join(f"{k} {v:.2f} s" for k, v in steps.items())
            )

            print(f"routing: {routing_cost():.2f} us per request in process (Live.route, 90/10)")
            off = asyncio.run(closed_loop(port, args.concurrency, args.seconds))
            admin(
                port,
                "/admin/split",
                {"component": "embedding", "weights": {version: 90, version + SUFFIX: 10}},
            )
            split = asyncio.run(closed_loop(port, args.concurrency, args.seconds))
            admin(port, "/admin/split", {"component": "embedding", "weights": None})
            print(row("no split", off))
            print(row("90/10 split", split))
            print(
                f"  served p50 with the split - without: {split['p50_ms'] - off['p50_ms']:+.3f} ms"
            )

            admin(
                port,
                "/admin/shadow",
                {"component": "embedding", "version": version + SUFFIX, "share": 1.0},
            )
            shadow = asyncio.run(closed_loop(port, args.concurrency, args.seconds))
            admin(port, "/admin/shadow", {"component": "embedding", "version": None})
            ab = httpx.get(
                f"http://127.0.0.1:{port}/admin/ab",
                params={"component": "embedding"},
                headers=ADMIN,
            ).json()
            copied = ab["versions"].get(version + SUFFIX, {}).get("shadow") or {}
            print(row("every request shadowed", shadow))
            p50, p95 = shadow["p50_ms"] / off["p50_ms"], shadow["p95_ms"] / off["p95_ms"]
            print(
                f"  served p50 / p95 with shadow vs without: {p50:.2f}x / {p95:.2f}x; compared "
                f"{copied.get('compared', 0)}, agreement {copied.get('agreement', np.nan):.6f}"
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
