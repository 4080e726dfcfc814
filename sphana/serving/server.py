"""``sphana serve``: load and verify a release, warm every session, replay its parity samples,
then serve it (HTTP with uvicorn, or JSON lines on stdin/stdout with ``--stdio``); reload another
without a restart (``POST /admin/reload``, SIGHUP, or a registry stage that moves)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
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
from sphana.serving.live import ReloadError

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
        nargs="*",
        type=Path,
        help="a release .tar.gz, one or more bundle directories (what `dvc artifacts get` "
        "writes), or a manifest .json (files relative to its directory); none with --registry",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes on the one port (each loads the release and follows the "
        "registry itself; SIGHUP reaches every one)",
    )
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
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
        "or one (repeatable): --precision int8 --precision llm=fp32; llm=int4 serves the "
        "generator's 4-bit weights where the release has them",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="where the verified files are copied, each release loaded in its own subdirectory, "
        "removed once no request uses it (default: a temporary directory)",
    )
    r = p.add_argument_group("reload and registry")
    r.add_argument(
        "--admin-token",
        default=os.environ.get("SPHANA_ADMIN_TOKEN"),
        help="bearer token of the /admin endpoints (default: $SPHANA_ADMIN_TOKEN); "
        "without one they answer 401",
    )
    r.add_argument(
        "--registry",
        type=Path,
        metavar="REPO",
        help="serve what a registry stage holds and follow it: a clone of the registry's git "
        "repository (fetched before each poll when it has an origin); needs sphana[registry]",
    )
    r.add_argument("--stage", default="prod", help="the stage --registry follows (default prod)")
    t = p.add_argument_group("traffic between versions")
    t.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="SOURCES",
        help="another release to load beside the main one (comma-separated sources), served "
        "through --split and pins (x-sphana-version); repeatable",
    )
    t.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="COMPONENT=VERSION:WEIGHT,...",
        help="weights of a component's versions, e.g. embedding=0.1.0:90,0.2.0:10; sticky by "
        "the x-sphana-key header; repeatable",
    )
    t.add_argument(
        "--shadow",
        action="append",
        default=[],
        metavar="COMPONENT=VERSION:SHARE",
        help="copy a share of a component's requests to another version, compare its answers "
        "with the served ones, never return them, e.g. embedding=0.2.0:0.25; repeatable",
    )
    t.add_argument(
        "--split-file",
        type=Path,
        help="the splits as YAML: {component: {version: weight}}",
    )
    r.add_argument(
        "--poll-seconds", type=float, default=30.0, help="how often --registry looks again"
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


class Loader:
    """Loads a release into its own directory under ``base``: every sha256 verified, the
    sessions created and warmed, the parity samples replayed on them. The server's first
    release and every reload go through it; a failure removes what it had copied and raises
    :class:`~sphana.serving.live.ReloadError` naming the step (``source``, ``checksum``,
    ``session``, ``parity``)."""

    def __init__(self, args: argparse.Namespace, base: Path, sources: list[str]) -> None:
        self.base = base
        self.sources = sources
        self.precision = parse_precision(args.precision)
        self.settings = SessionSettings(
            args.threads, args.inter_op_threads, args.graph_optimization, args.provider, args.spin
        )
        self.loaded = 0

    def __call__(self, sources: list[str] | None = None) -> tuple[Engine, Callable[[], None]]:
        from sphana.errors import SphanaError, VerifyError
        from sphana.release import open_release

        self.loaded += 1
        workdir = self.base / f"release-{self.loaded}"

        def cleanup() -> None:
            shutil.rmtree(workdir, ignore_errors=True)

        try:
            start = time.perf_counter()
            try:
                release = open_release([Path(s) for s in sources or self.sources], workdir)
            except VerifyError as e:
                raise ReloadError("checksum", str(e)) from None
            except SphanaError as e:
                raise ReloadError("source", str(e)) from None
            verified = time.perf_counter() - start
            log.info(
                "verified %s %s: %d files of %s (sha256) in %.2f s",
                release.manifest.get("name"),
                release.manifest["version"],
                sum(len(c.files) for c in release.components.values()),
                ", ".join(sorted(release.components)),
                time.perf_counter() - start,
            )
            try:
                engine = Engine(release.manifest, release.root, self.precision, self.settings)
                engine.timings["verify"] = verified
                engine.warm()
            except Exception as e:  # ONNX Runtime's errors for a file it cannot load vary
                raise ReloadError("session", f"{type(e).__name__}: {e}") from None
            problems = engine.replay_samples()
            if problems:
                raise ReloadError(
                    "parity",
                    f"{len(problems)} parity sample(s) differ on this server's sessions: "
                    + "; ".join(problems[:5]),
                )
            return engine, cleanup
        except BaseException:
            cleanup()
            raise


def parse_splits(specs: list[str], file: Path | None) -> dict[str, dict[str, float]]:
    """``--split`` flags and ``--split-file`` as {component: {version: weight}}.

    Raises:
        SphanaError: naming the flag or the file and what is wrong.
    """
    import yaml

    from sphana.errors import InputError, SphanaError
    from sphana.serving.traffic import check_weights, parse_split

    out: dict[str, dict[str, float]] = {}
    if file is not None:
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InputError(file, f"cannot read it as YAML: {e}") from None
        if not isinstance(data, dict) or not all(isinstance(w, dict) for w in data.values()):
            raise InputError(file, "expected {component: {version: weight}}")
        try:
            for component, weights in data.items():
                out[str(component)] = check_weights(str(component), weights)
        except ValueError as e:
            raise InputError(file, str(e)) from None
    for spec in specs:
        try:
            component, weights = parse_split(spec)
        except ValueError as e:
            raise SphanaError(f"--split: {e}") from None
        out[component] = weights
    return out


def parse_shadows(specs: list[str]) -> dict[str, tuple[str, float]]:
    """``--shadow`` flags as {component: (version, share)}."""
    from sphana.errors import SphanaError
    from sphana.serving.traffic import parse_shadow

    out = {}
    for spec in specs:
        try:
            component, version, share = parse_shadow(spec)
        except ValueError as e:
            raise SphanaError(f"--shadow: {e}") from None
        out[component] = (version, share)
    return out


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
    if args.workers < 1:
        from sphana.errors import SphanaError

        raise SphanaError(f"--workers {args.workers}: give 1 or more")
    if args.workers > 1 and not args.stdio:
        return supervise(args)
    if bool(args.release) == bool(args.registry):
        from sphana.errors import SphanaError

        raise SphanaError("give a release (tarball, bundles or manifest) or --registry REPO")
    scratch = None if args.workdir else Path(tempfile.mkdtemp(prefix="sphana-serve-"))
    base = args.workdir or scratch
    try:
        follower = None
        sources = [str(s) for s in args.release]
        if args.registry:
            from sphana.serving.follow import Follower

            follower = Follower(args.registry, args.stage, base / "registry", args.poll_seconds)
            sources = follower.sources()
        splits = parse_splits(args.split, args.split_file)
        shadows = parse_shadows(args.shadow)
        loader = Loader(args, base, sources)
        engine, cleanup = loader()
        variants = [loader(v.split(",")) for v in args.variant]
        if args.stdio:
            from sphana.serving.stdio import serve_stdio

            engine.timings["ready"] = time.perf_counter() - started
            try:
                return serve_stdio(engine, args, sys.stdin, sys.stdout)
            finally:
                cleanup()
        traffic = {"variants": variants, "splits": splits, "shadows": shadows}
        return _serve_http(engine, args, started, loader, cleanup, follower, traffic)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _serve_http(
    engine: Engine,
    args: argparse.Namespace,
    started: float,
    loader: Loader,
    cleanup: Callable[[], None],
    follower: Any,
    traffic: dict[str, Any],
) -> int:
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
    app = create_app(
        engine,
        limits,
        batch,
        cleanup=cleanup,
        load=loader,
        admin_token=args.admin_token,
        follower=follower,
        **traffic,
    )

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
    sockets = None
    if args.reuse_port:  # one of --workers: every worker binds the same port
        import socket

        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((args.host, args.port))
        sockets = [sock]
    Server(config).run(sockets=sockets)
    return 0


def supervise(args: argparse.Namespace) -> int:
    """``--workers N``: N server processes on one port (``SO_REUSEPORT``: the kernel spreads the
    connections), each a whole server that loads, reloads and follows the registry on its own.
    SIGHUP is passed to every worker (each reloads); SIGTERM/SIGINT stop them all; a worker that
    dies stops the others, so the supervisor (Kubernetes, systemd) restarts the set."""
    import subprocess

    argv = [*sys.argv[1:], "--workers", "1", "--reuse-port"]  # the last --workers wins
    children = [
        subprocess.Popen([sys.executable, "-m", "sphana.cli", *argv]) for _ in range(args.workers)
    ]
    log.info(
        "started %d workers on port %d: %s", len(children), args.port, [c.pid for c in children]
    )

    def forward(signum: int, _: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGHUP, forward)
    stopping = []

    def stop(signum: int, _: Any) -> None:
        stopping.append(signum)
        forward(signal.SIGTERM, None)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while any(c.poll() is None for c in children):
        for child in children:
            if child.poll() is not None and not stopping:
                code = child.returncode or 1
                log.error("worker %d exited %s: stopping the others", child.pid, child.returncode)
                stop(signal.SIGTERM, None)
        time.sleep(0.2)
    return 0 if stopping and not code else code
