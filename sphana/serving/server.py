"""``sphana serve``: load and verify a release, warm every session, then serve it (HTTP with
uvicorn, or JSON lines on stdin/stdout with ``--stdio``)."""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sphana.serving.batching import BatchLimits
from sphana.serving.engine import (
    OPTIMIZATION_LEVELS,
    PROVIDERS,
    Engine,
    SessionSettings,
    parse_precision,
)

log = logging.getLogger("sphana.serve")


@dataclass(frozen=True)
class ServeLimits:
    """Admission and input limits (flags of ``sphana serve``, shown in ``/info``)."""

    max_concurrent_requests: int = 256
    max_payload_bytes: int = 4 * 1024 * 1024
    max_inputs: int = 256  # texts in one request
    max_new_tokens: int = 512
    max_text_chars: int = 100_000  # one text of /v1/relations
    auto_truncate: bool = False  # truncate over-long texts when a request does not say


def add_arguments(p: argparse.ArgumentParser) -> None:
    limits, batch = ServeLimits(), BatchLimits()
    p.add_argument(
        "release",
        nargs="+",
        type=Path,
        help="a release .tar.gz, one or more bundle directories (what `dvc artifacts get` "
        "writes), or a manifest .json (files relative to its directory)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--stdio",
        action="store_true",
        help="JSON lines on stdin/stdout instead of HTTP (for a parent process)",
    )
    p.add_argument(
        "--precision",
        action="append",
        default=[],
        metavar="[COMPONENT=]int8|fp32",
        help="int8 (default, where the release kept an INT8 file) or fp32, for all components "
        "or one (repeatable): --precision int8 --precision llm=fp32",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="where the verified files are copied (default: a temporary directory)",
    )
    g = p.add_argument_group("ONNX Runtime")
    g.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT's default)")
    g.add_argument("--inter-op-threads", type=int, default=0)
    g.add_argument("--graph-optimization", choices=OPTIMIZATION_LEVELS, default="all")
    g.add_argument(
        "--spin",
        action="store_true",
        help="let idle thread-pool threads spin (lower latency alone, less throughput under "
        "load on few cores)",
    )
    g.add_argument(
        "--provider",
        choices=PROVIDERS,
        default="cpu",
        help="cuda needs onnxruntime-gpu (pip install 'sphana[gpu]'); CPU otherwise",
    )
    b = p.add_argument_group("batching")
    b.add_argument("--max-batch-tokens", type=int, default=batch.max_batch_tokens)
    b.add_argument(
        "--max-batch-requests",
        type=int,
        default=batch.max_batch_requests,
        help="inputs per batch; 1 turns batching off",
    )
    b.add_argument(
        "--max-wait-ms",
        type=float,
        default=batch.max_wait_ms,
        help="how long a batch that is not full waits for more (0: never)",
    )
    a = p.add_argument_group("admission and limits")
    a.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=limits.max_concurrent_requests,
        help="beyond it: 429 with Retry-After",
    )
    a.add_argument("--max-payload-bytes", type=int, default=limits.max_payload_bytes)
    a.add_argument("--max-inputs", type=int, default=limits.max_inputs, help="texts in one request")
    a.add_argument("--max-new-tokens", type=int, default=limits.max_new_tokens)
    a.add_argument(
        "--max-text-chars",
        type=int,
        default=limits.max_text_chars,
        help="characters of one /v1/relations text",
    )
    a.add_argument(
        "--auto-truncate",
        action="store_true",
        help="truncate over-long texts instead of refusing them (413)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def load(args: argparse.Namespace, workdir: Path) -> Engine:
    """The verified, warmed engine, its files copied into ``workdir``."""
    from sphana.release import open_release

    precision = parse_precision(args.precision)
    settings = SessionSettings(
        args.threads, args.inter_op_threads, args.graph_optimization, args.provider, args.spin
    )
    start = time.perf_counter()
    release = open_release(args.release, workdir)
    log.info(
        "verified %s %s: %d files of %s (sha256) in %.2f s",
        release.manifest.get("name"),
        release.manifest["version"],
        sum(len(c.files) for c in release.components.values()),
        ", ".join(sorted(release.components)),
        time.perf_counter() - start,
    )
    engine = Engine(release.manifest, release.root, precision, settings)
    engine.timings["verify"] = time.perf_counter() - start
    engine.warm()
    return engine


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # uvicorn re-raises SIGTERM once it has shut down; exit through Python so `finally` runs
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    # without --workdir the verified copy lives in a temporary directory, removed however the
    # server ends (a release that fails to load included)
    scratch = None if args.workdir else Path(tempfile.mkdtemp(prefix="sphana-serve-"))
    try:
        engine = load(args, args.workdir or scratch / "release")
        if args.stdio:
            from sphana.serving.stdio import serve_stdio

            engine.timings["ready"] = time.perf_counter() - started
            return serve_stdio(engine, args, sys.stdin, sys.stdout)
        return _serve_http(engine, args, started)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _serve_http(engine: Engine, args: argparse.Namespace, started: float) -> int:
    import uvicorn

    from sphana.serving.app import create_app

    limits = ServeLimits(
        max_concurrent_requests=args.max_concurrent_requests,
        max_payload_bytes=args.max_payload_bytes,
        max_inputs=args.max_inputs,
        max_new_tokens=args.max_new_tokens,
        max_text_chars=args.max_text_chars,
        auto_truncate=args.auto_truncate,
    )
    batch = BatchLimits(args.max_batch_tokens, args.max_batch_requests, args.max_wait_ms)
    app = create_app(engine, limits, batch)

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            engine.timings["ready"] = time.perf_counter() - started
            log.info(
                "ready on http://%s:%d in %.2f s: %s %s (%s)",
                args.host,
                self.config.port,
                engine.timings["ready"],
                engine.manifest.get("name"),
                engine.version,
                ", ".join(sorted(engine.models)),
            )

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    Server(config).run()
    return 0
