"""Load on ``sphana serve``: served embeddings against what ONNX Runtime does in process.

In one run on this machine (ratios are what to read; absolute times move with the machine):

1. in process (the ceiling): the release's embedding model (INT8 by default) on one short
   sentence at batch 32 and at batch 1, same session options as the server;
2. the server (a subprocess on 127.0.0.1), driven by an asyncio closed-loop load generator
   (keep-alive connections, each sends its next request when the last answer arrives) at
   concurrency 1, 8 and 32 on single-sentence ``POST /v1/embeddings``: requests/s and
   p50/p95/p99 latency;
3. the same server with batching off (``--max-batch-requests 1``) at concurrency 32;
4. ``/v1/rerank`` latency for one query with 20 candidates and ``/v1/generate`` tokens/s when the
   release has those components; time from start to ready and the server's resident memory.

    python benchmarks/serve_load.py [RELEASE] [--seconds 10] [--threads 0] [--spin]

RELEASE defaults to ``target/manifests/latest.tar.gz`` (after ``make run``). It measures; it
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SENTENCE = "Halvard is a port city in Ostravel."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process(release: Path, threads: int, spin: bool, seconds: float) -> dict[str, float]:
    """Sentences/s of the engine's embedding model at batch 32 and at batch 1 (and the batch-1
    latency), with the server's own code minus HTTP."""
    from sphana.release import open_release
    from sphana.serving.engine import Engine, SessionSettings, parse_precision

    with tempfile.TemporaryDirectory() as tmp:
        loaded = open_release([release], Path(tmp) / "release")
        settings = SessionSettings(threads, spin=spin)
        engine = Engine(loaded.manifest, loaded.root, parse_precision([]), settings)
        engine.warm()
        embedder = engine.embedder
        out = {}
        for batch in (32, 1):
            texts = [SENTENCE] * batch
            n, times = 0, []
            end = time.perf_counter() + seconds / 2
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                embedder.run(texts)  # tokenization + inference: what a batch costs the server
                times.append(time.perf_counter() - t0)
                n += batch
            out[f"batch{batch}_per_s"] = n / sum(times)
            if batch == 1:
                out["batch1_p50_ms"] = statistics.median(times) * 1000
        return out


class Connection:
    """One keep-alive HTTP/1.1 connection: the least client work per request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def closed_loop(
    port: int, concurrency: int, seconds: float = float("inf"), until: asyncio.Event | None = None
) -> dict[str, float]:
    """Requests/s, latency percentiles and failures of ``concurrency`` keep-alive clients, each
    sending its next request when the last answer arrives, for ``seconds`` or ``until`` is set."""
    body = json.dumps({"input": SENTENCE, "model": "embedding"}).encode()
    latencies: list[float] = []
    errors = 0

    async def client(conn: Connection, end: float) -> None:
        nonlocal errors
        while time.perf_counter() < end and not (until is not None and until.is_set()):
            t0 = time.perf_counter()
            try:
                status, _ = await conn.post("/v1/embeddings", body)
            except (OSError, asyncio.IncompleteReadError):  # a dropped connection is a failure
                errors += 1
                conn.close()
                conn = await Connection.open(port)
                continue
            latencies.append(time.perf_counter() - t0)
            errors += status != 200

    conns = [await Connection.open(port) for _ in range(concurrency)]
    await asyncio.gather(*(client(c, time.perf_counter() + 1.0) for c in conns))  # warm up
    latencies.clear()
    start = time.perf_counter()
    await asyncio.gather(*(client(c, start + seconds) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    ms = np.array(latencies) * 1000
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": errors,
    }


def start_server(release: Path, threads: int, *extra: str) -> tuple[subprocess.Popen, int, float]:
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "sphana.cli",
        "serve",
        str(release),
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--log-level",
        "warning",
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port, time.perf_counter() - start
        except httpx.HTTPError:
            time.sleep(0.1)


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def row(label: str, r: dict[str, float]) -> str:
    return (
        f"  {label:34s} {r['requests_per_s']:8.1f} req/s   p50 {r['p50_ms']:6.2f} ms   "
        f"p95 {r['p95_ms']:6.2f} ms   p99 {r['p99_ms']:6.2f} ms   errors {r['errors']}"
    )


def other_endpoints(port: int) -> None:
    import httpx

    url = f"http://127.0.0.1:{port}"
    info = httpx.get(f"{url}/info").json()
    if "gnn" in info["components"]:
        texts = [f"Passage {i} says that Halvard is a port city in Ostravel." for i in range(20)]
        body = {"query": "Where is Halvard?", "texts": texts}
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/rerank", json=body, timeout=60)
            times.append(time.perf_counter() - t0)
        if r.status_code == 200:
            print(
                f"/v1/rerank, 1 query x 20 candidates: p50 {statistics.median(times) * 1000:.1f}"
                f" ms over {len(times)} calls"
            )
        else:
            print(f"/v1/rerank: {r.status_code} {r.text[:200]}")
    if "llm" in info["components"]:
        body = {"prompt": "Where is Halvard?", "max_new_tokens": 64}
        r = httpx.post(f"{url}/v1/generate", json=body, timeout=300).json()
        print(
            f"/v1/generate: {r['generated_tokens']} tokens at {r['tokens_per_second']:.1f} "
            f"tokens/s ({r['finish_reason']})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("release", nargs="?", default="target/manifests/latest.tar.gz", type=Path)
    parser.add_argument("--seconds", type=float, default=10.0, help="per load level")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    parser.add_argument("--spin", action="store_true", help="as sphana serve --spin")
    args = parser.parse_args()

    ceiling = in_process(args.release, args.threads, args.spin, args.seconds)
    print(
        f"in process (INT8, one short sentence): batch 32 {ceiling['batch32_per_s']:.1f}/s, "
        f"batch 1 {ceiling['batch1_per_s']:.1f}/s (p50 {ceiling['batch1_p50_ms']:.2f} ms); "
        f"batch 32 / batch 1 = {ceiling['batch32_per_s'] / ceiling['batch1_per_s']:.2f}"
    )

    spin = ("--spin",) if args.spin else ()
    proc, port, ready = start_server(args.release, args.threads, *spin)
    try:
        print(f"server: ready {ready:.2f} s after start; resident memory {rss_mb(proc.pid):.0f} MB")
        results = {}
        for concurrency in (1, 8, 32):
            results[concurrency] = asyncio.run(closed_loop(port, concurrency, args.seconds))
            print(row(f"/v1/embeddings, concurrency {concurrency}", results[concurrency]))
        other_endpoints(port)
        print(f"server resident memory after load: {rss_mb(proc.pid):.0f} MB")
    finally:
        proc.terminate()
        proc.wait()

    proc, port, _ = start_server(args.release, args.threads, *spin, "--max-batch-requests", "1")
    try:
        off = asyncio.run(closed_loop(port, 32, args.seconds))
        print(row("batching off, concurrency 32", off))
    finally:
        proc.terminate()
        proc.wait()

    on = results[32]["requests_per_s"]
    print(f"served at concurrency 32 / in-process batch 32: {on / ceiling['batch32_per_s']:.2f}")
    print(
        f"batching on / off at concurrency 32: {on / off['requests_per_s']:.2f}   "
        f"(the model allows: batch 32 / batch 1 = "
        f"{ceiling['batch32_per_s'] / ceiling['batch1_per_s']:.2f})"
    )
    print(
        f"server overhead at concurrency 1 (p50 served - p50 in process, batch 1): "
        f"{results[1]['p50_ms'] - ceiling['batch1_p50_ms']:.2f} ms"
    )


if __name__ == "__main__":
    main()
