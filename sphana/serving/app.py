"""The HTTP API of ``sphana serve`` (FastAPI; the OpenAPI page is at ``/docs``).

Endpoints follow what users of the well-known servers already call:

- ``POST /v1/embeddings`` (OpenAI) and ``POST /embed`` (Text Embeddings Inference);
- ``POST /v1/relations``, ``POST /v1/rerank``, ``POST /v1/generate`` (server-sent events with
  ``"stream": true``);
- the Open Inference Protocol v2 (``/v2/...``, JSON and the binary tensor extension) for raw
  tensors of any component, so Triton and KServe clients work unchanged;
- ``GET /health``, ``GET /info`` (release, components, checksums, limits), ``GET /metrics``
  (Prometheus).

Admission is bounded: beyond ``max_concurrent_requests`` a request gets 429 with ``Retry-After``
at once; a body over ``max_payload_bytes`` gets 413. Bad input gets a 4xx whose message names the
field. Every response carries ``x-model-version`` and, for model calls, TEI's timing headers
(``x-queue-time``, ``x-inference-time``, ``x-tokenization-time``, ``x-total-time``, in ms).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as StdJSONResponse
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from sphana.errors import SphanaError
from sphana.serving.batching import Batcher, BatchLimits, ClientGone, Timing
from sphana.serving.engine import Engine, InputTooLong, InvalidInput
from sphana.serving.live import Live, ReloadError, Served
from sphana.serving.server import ServeLimits
from sphana.serving.traffic import (
    KEY_HEADER,
    PIN_HEADER,
    Outcomes,
    check_share,
    check_weights,
    component_of,
    cosine_agreement,
    label_agreement,
    ranking_agreement,
    token_agreement,
)

log = logging.getLogger("sphana.serve")
SHADOW_PENDING = 4  # shadow copies running or waiting at once; beyond, copies are dropped


class JSONResponse(StdJSONResponse):
    """JSON rendered by orjson: numpy arrays as they are (no ``tolist``), float vectors several
    times faster than the standard library, which matters at hundreds of requests/s."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class EmbeddingsRequest(BaseModel):
    input: str | list[str] = Field(description="a text or a list of texts")
    model: str | None = Field(
        None, description="ignored beyond a check: 'embedding' or the release name"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="must equal the model's dimension")
    user: str | None = None


class EmbedRequest(BaseModel):
    inputs: str | list[str]
    normalize: bool = True
    truncate: bool | None = None


class GenerateRequest(BaseModel):
    prompt: str = Field(description="the text to continue, or the user turn with chat=true")
    chat: bool = Field(True, description="wrap the prompt in the model's chat template")
    max_new_tokens: int = Field(64, ge=1)
    top_k: int = Field(1, ge=0, description="1 = greedy; 0 = no top-k cut")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)
    seed: int = 0
    stop: list[str] = Field(default_factory=list, description="stop strings")
    stream: bool = Field(False, description="server-sent events, one per token")


class EntitySpan(BaseModel):
    start: int = Field(ge=0, description="character offset in text")
    end: int = Field(ge=1, description="character offset in text, exclusive")
    type: str | None = None


class RelationsRequest(BaseModel):
    text: str
    entities: list[EntitySpan] | None = Field(
        None, description="entity spans; leave out to detect them as ingest does"
    )


class RerankRequest(BaseModel):
    query: str
    texts: list[str] = Field(description="the candidate passages")
    top_n: int | None = Field(None, ge=1)
    return_text: bool = False
    ranks: list[int] | None = Field(
        None,
        description="each text's rank in the first-stage retrieval (0 = best), a feature of the "
        "ranker's graphs as in training; default: its rank among texts by embedding similarity",
    )


class QueryRequest(BaseModel):
    query: str = Field(description="the question")
    top_k: int = Field(5, ge=1, le=50, description="passages cited, best first")
    candidates: int = Field(
        20, ge=1, le=200, description="passages retrieved from the index for the ranker"
    )


class Feedback(BaseModel):
    request_id: str = Field(description="the x-request-id of the response it is about")
    reward: float = Field(description="the outcome: 0/1 (click, thumbs) or any number")


class ApiError(Exception):
    """A request the server refuses: the status and a message that says what to fix."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _field(loc: tuple | list) -> str:
    """``input[0]`` from pydantic's ``("body", "input", "list[str]", 0)``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "body" and not any(c in part for c in "[]|") and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after"}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "overloaded"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class Metrics:
    """The server's Prometheus metrics (one registry per app)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sphana_requests",
            "Requests by endpoint, model, version and status code",
            ["endpoint", "model", "version", "code"],
            registry=r,
        )
        self.failures = Counter(
            "sphana_request_failures",
            "Refused or failed requests by endpoint and reason",
            ["endpoint", "reason"],
            registry=r,
        )
        fast = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
        self.queue = Histogram(
            "sphana_queue_seconds", "Time waiting for a batch", ["model"], buckets=fast, registry=r
        )
        self.tokenize = Histogram(
            "sphana_tokenization_seconds",
            "Tokenization time",
            ["model"],
            buckets=fast,
            registry=r,
        )
        self.inference = Histogram(
            "sphana_inference_seconds",
            "Model time per batch",
            ["model"],
            buckets=fast,
            registry=r,
        )
        self.batch_size = Histogram(
            "sphana_batch_size",
            "Inputs per batch",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.queue_depth = Gauge(
            "sphana_queue_depth", "Requests waiting for a batch", ["model"], registry=r
        )
        self.in_flight = Gauge("sphana_requests_in_flight", "Requests being served", registry=r)
        self.generated = Counter(
            "sphana_generated_tokens", "Tokens generated", ["version"], registry=r
        )
        self.latency = Histogram(
            "sphana_request_seconds",
            "Time to the last byte of a model request, by component and its version",
            ["model", "version"],
            buckets=fast,
            registry=r,
        )
        self.shadow = Counter(
            "sphana_shadow_requests",
            "Requests copied to a shadow version, by outcome (compared, dropped, failed)",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.reloads = Counter(
            "sphana_reloads", "Releases swapped in, by what asked", ["origin"], registry=r
        )
        self.reload_failures = Counter(
            "sphana_reload_failures",
            "Reloads refused (the old release kept serving), by reason",
            ["reason"],
            registry=r,
        )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def create_app(
    engine: Engine,
    limits: ServeLimits,
    batch: BatchLimits,
    *,
    cleanup: Callable[[], None] | None = None,
    load: Callable[[list[str] | None], tuple[Engine, Callable[[], None] | None]] | None = None,
    admin_token: str | None = None,
    follower: Any = None,
    variants: list[tuple[Engine, Callable[[], None] | None]] = (),  # type: ignore[assignment]
    splits: dict[str, dict[str, float]] | None = None,
    shadows: dict[str, tuple[str, float]] | None = None,
) -> Any:
    """The ASGI app serving ``engine`` (already warmed).

    Args:
        cleanup: removes ``engine``'s verified copy once it is no longer served.
        load: ``load(sources)`` -> the next engine (verified, warmed, its parity samples
            replayed) and its cleanup, or :class:`~sphana.serving.live.ReloadError`; ``None``
            sources: those the server started from. What ``POST /admin/reload`` and SIGHUP run.
        admin_token: the bearer token of ``/admin/*``; without one they answer 401.
        follower: a :class:`~sphana.serving.follow.Follower` of a registry stage, run in the
            background: it reloads when the stage moves.
        variants: other releases (engine, cleanup) served through ``splits`` and pins.
        splits: component -> {version: weight} (:mod:`sphana.serving.traffic`).
        shadows: component -> (version, share of its requests copied to that version).

    Raises:
        SphanaError: a split weighting a version no release serves.
    """
    metrics = Metrics()
    started = time.time()
    app = FastAPI(
        title="Sphana",
        version=engine.version,
        description="Serves a Sphana release on ONNX Runtime: embeddings (OpenAI, TEI), "
        "relations, rerank, generation, and raw tensors over the Open Inference Protocol v2.",
        default_response_class=JSONResponse,
    )

    def observe(size: int, seconds: float) -> None:
        metrics.batch_size.labels("embedding").observe(size)
        metrics.inference.labels("embedding").observe(seconds)

    def serving(engine: Engine, cleanup: Callable[[], None] | None) -> Served:
        """``engine`` with its batchers and generator thread."""
        served = Served(engine, cleanup=cleanup)
        if engine.embedder is not None:
            embedder = engine.embedder
            served.batchers["embedding"] = Batcher(
                "embedding",
                lambda items: embedder.run([text for text, _ in items]),
                lambda item: item[1],  # its length in tokens
                batch,
                observe,
            )
        if engine.generator is not None:
            from concurrent.futures import ThreadPoolExecutor

            served.llm_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm")
        return served

    live = Live(serving(engine, cleanup))
    for variant, variant_cleanup in variants:
        live.add_variant(serving(variant, variant_cleanup))
    for component, weights in (splits or {}).items():
        try:
            live.set_split(component, weights)
        except LookupError as e:
            raise SphanaError(f"--split: {e}") from None
    for component, (version, share) in (shadows or {}).items():
        try:
            live.set_shadow(component, version, share)
        except LookupError as e:
            raise SphanaError(f"--shadow: {e}") from None
    outcomes = Outcomes()
    # the release a request started on: its handlers read this, never live.current
    current: ContextVar[Served] = ContextVar("served")

    def model_headers(timing: Timing | None, tokenize: float, total: float) -> dict[str, str]:
        headers = {"x-tokenization-time": _ms(tokenize), "x-total-time": _ms(total)}
        if timing is not None:
            headers["x-queue-time"] = _ms(timing.queue)
            headers["x-inference-time"] = _ms(timing.inference)
            headers["x-batch-size"] = str(timing.batch_size)
        return headers

    # --- admission, errors, common headers -----------------------------------------------------

    class Admission:
        """Pure ASGI middleware: bounded concurrency (429 at once), body size (413), the
        release a request is served by (held to its last byte) and its version header."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.active = 0

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.inner(scope, receive, send)
                return
            path = scope["path"]
            exempt = path in ("/health", "/metrics") or path.startswith("/v2/health")
            headers_in = dict(scope.get("headers") or [])
            refusal = None
            if not exempt and self.active >= limits.max_concurrent_requests:
                refusal = (
                    429,
                    "too many requests in flight; retry after the Retry-After "
                    f"seconds (max_concurrent_requests={limits.max_concurrent_requests})",
                )
            else:
                length = headers_in.get(b"content-length")
                if length is not None and int(length) > limits.max_payload_bytes:
                    refusal = (
                        413,
                        f"request body of {int(length)} bytes is over "
                        f"max_payload_bytes={limits.max_payload_bytes}",
                    )
            if refusal is not None:
                status, message = refusal
                metrics.failures.labels(path, "overloaded" if status == 429 else "payload").inc()
                body = json.dumps(error_body(status, message)).encode()
                headers = [
                    (b"content-type", b"application/json"),
                    (b"x-model-version", live.current.version.encode()),
                ]
                if status == 429:
                    headers.append((b"retry-after", b"1"))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return

            component = component_of(path)
            key = headers_in.get(KEY_HEADER.encode(), b"").decode("latin-1") or None
            pin = headers_in.get(PIN_HEADER.encode(), b"").decode("latin-1") or None
            try:
                served = live.route(component, key, pin)
            except LookupError as e:
                metrics.failures.labels(path, "unknown_version").inc()
                body = json.dumps(error_body(404, str(e), PIN_HEADER)).encode()
                headers = [(b"content-type", b"application/json")]
                await send({"type": "http.response.start", "status": 404, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            # the version of the component that serves it, and an id to send feedback against
            model = served.engine.models.get(component) if component else None
            added = [(b"x-model-version", served.version.encode())]
            request_id = uuid.uuid4().hex if model is not None else ""
            if model is not None:
                added.append((b"x-component-version", model.version.encode()))
                added.append((b"x-request-id", request_id.encode()))
            status = [500]

            async def send_with_version(message: dict) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                    message["headers"] = [*message.get("headers", []), *added]
                await send(message)

            self.active += 1
            metrics.in_flight.inc()
            token = current.set(served)
            start = time.perf_counter()
            try:
                await self.inner(scope, receive, send_with_version)
            finally:
                current.reset(token)
                live.release(served)
                self.active -= 1
                metrics.in_flight.dec()
                if model is not None and status[0] < 400:
                    seconds = time.perf_counter() - start
                    outcomes.record(request_id, model.name, model.version, seconds)
                    metrics.latency.labels(model.name, model.version).observe(seconds)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        metrics.failures.labels(request.url.path, f"http_{e.status}").inc()
        if request.url.path.startswith("/v2/"):
            return JSONResponse({"error": e.message}, status_code=e.status)
        return JSONResponse(error_body(e.status, e.message, e.param), status_code=e.status)

    @app.exception_handler(InvalidInput)  # the engine's own checks (spans, ranks)
    async def on_invalid_input(request: Request, e: InvalidInput) -> JSONResponse:
        return await on_api_error(request, ApiError(422, str(e), e.field))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            status, param = 400, None
            message = "the body is not valid JSON; send a JSON object"
        else:
            status = 422
            # the deepest field named (a union's member types are not fields: dropped)
            named = [(_field(err.get("loc", ())), err.get("msg", "invalid")) for err in errors]
            param = max((p for p, _ in named), key=len, default="") or None
            reasons = list(dict.fromkeys(m for p, m in named if p == (param or "")))
            message = f"{param or 'body'}: {' or '.join(reasons)}"
        metrics.failures.labels(request.url.path, f"http_{status}").inc()
        if request.url.path.startswith("/v2/"):
            return JSONResponse({"error": message}, status_code=status)
        return JSONResponse(error_body(status, message, param), status_code=status)

    async def gone(request: Request) -> bool:
        """Whether the client of ``request`` has left (asked before its work starts: a request
        whose client has gone is dropped before inference)."""
        if await request.is_disconnected():
            metrics.failures.labels(request.url.path, "client_gone").inc()
            return True
        return False

    def need(name: str) -> Engine:
        """The request's engine, if its release has component ``name`` (else 404)."""
        engine = current.get().engine
        if name not in engine.models:
            skipped = engine.manifest.get("skipped_components", {}).get(name)
            why = f": {skipped['reason']}" if skipped else ""
            raise ApiError(404, f"this release has no {name} component{why}", "model")
        return engine

    def texts_of(value: str | list[str], field: str) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise ApiError(422, f"{field}: give at least one text", field)
        if len(texts) > limits.max_inputs:
            raise ApiError(
                413,
                f"{field}: {len(texts)} texts, more than max_inputs={limits.max_inputs}; "
                "split the request",
                field,
            )
        for i, t in enumerate(texts):
            if not t.strip():
                raise ApiError(422, f"{field}[{i}]: empty text", f"{field}[{i}]")
        return texts

    async def embed(request: Request, texts: list[str], truncate: bool, field: str):
        engine = need("embedding")
        assert engine.embedder is not None
        start = time.perf_counter()
        try:
            lengths = engine.embedder.lengths(texts, truncate)
        except InputTooLong as e:
            raise ApiError(413, f"{field}[{e.index}]: {e}", f"{field}[{e.index}]") from None
        tokenize = time.perf_counter() - start
        metrics.tokenize.labels("embedding").observe(tokenize)
        batcher = current.get().batchers["embedding"]
        metrics.queue_depth.labels("embedding").set(batcher.depth)
        items = list(zip(texts, lengths, strict=True))
        try:
            vectors, timing = await batcher.submit(items, lambda: gone(request))
        except ClientGone:
            return None
        metrics.queue.labels("embedding").observe(timing.queue)
        headers = model_headers(timing, tokenize, time.perf_counter() - start)
        shadow("embedding", lambda e: e.embedder.run(texts), vectors, cosine_agreement)
        return vectors, sum(lengths), headers

    # --- shadow traffic ----------------------------------------------------------------------

    shadow_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
    shadow_tasks: set[asyncio.Task] = set()
    draw = random.Random()

    def shadow(component: str, compute: Any, served: Any, agree: Any) -> None:
        """Copy this request to ``component``'s shadow version (for its share of requests):
        ``compute(engine)`` on that release's engine, after the served answer, on a thread of
        its own, compared with ``served`` by ``agree``; never returned. At most
        :data:`SHADOW_PENDING` copies run or wait at once: beyond, a copy is dropped (counted),
        so shadow work never queues up behind the served traffic."""
        plan = live.shadows.get(component)
        if plan is None or draw.random() >= plan[1]:
            return
        version = plan[0]
        arm = live.find(component, version)
        if arm is None or arm is current.get():
            return
        if len(shadow_tasks) >= SHADOW_PENDING:
            metrics.shadow.labels(component, version, "dropped").inc()
            return
        arm.active += 1  # held until the copy is done, like a request

        async def run() -> None:
            try:
                loop = asyncio.get_running_loop()
                out = await loop.run_in_executor(shadow_executor, compute, arm.engine)
                outcomes.arm(component, version).shadowed(agree(served, out))
                metrics.shadow.labels(component, version, "compared").inc()
            except Exception:
                log.exception("shadow copy of a %s request to %s failed", component, version)
                metrics.shadow.labels(component, version, "failed").inc()
            finally:
                live.release(arm)

        task = asyncio.get_running_loop().create_task(run())
        shadow_tasks.add(task)
        task.add_done_callback(shadow_tasks.discard)

    def count(endpoint: str, model: str, code: int = 200) -> None:
        m = current.get().engine.models.get(model)
        metrics.requests.labels(endpoint, model, m.version if m else "", str(code)).inc()

    # --- embeddings --------------------------------------------------------------------------

    @app.post("/v1/embeddings", tags=["embeddings"])
    async def openai_embeddings(body: EmbeddingsRequest, request: Request) -> Response:
        """OpenAI-compatible embeddings (what the ``openai`` client's ``embeddings.create``
        sends)."""
        engine = current.get().engine
        if body.model not in (None, "embedding", engine.manifest.get("name"), engine.version):
            raise ApiError(404, f"model {body.model!r}: this server has 'embedding'", "model")
        dim = engine.embedder.dimension if engine.embedder else None
        if body.dimensions is not None and body.dimensions != dim:
            raise ApiError(422, f"dimensions: the model gives {dim}; omit it", "dimensions")
        texts = texts_of(body.input, "input")
        out = await embed(request, texts, limits.auto_truncate, "input")
        if out is None:
            return Response(status_code=499)
        vectors, tokens, headers = out
        if body.encoding_format == "base64":
            data = [base64.b64encode(np.asarray(v, "<f4").tobytes()).decode() for v in vectors]
        else:
            data = list(vectors)  # rows of float32, as orjson writes them
        count("/v1/embeddings", "embedding")
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": d} for i, d in enumerate(data)
                ],
                "model": "embedding",
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            headers=headers,
        )

    @app.post("/embed", tags=["embeddings"])
    async def tei_embed(body: EmbedRequest, request: Request) -> Response:
        """Text Embeddings Inference's ``/embed``: a list of vectors."""
        if not body.normalize:
            raise ApiError(
                422,
                "normalize: the model normalizes in its graph (pooling and L2 norm are part "
                "of the export); send true or leave it out",
                "normalize",
            )
        texts = texts_of(body.inputs, "inputs")
        truncate = limits.auto_truncate if body.truncate is None else body.truncate
        out = await embed(request, texts, truncate, "inputs")
        if out is None:
            return Response(status_code=499)
        vectors, _, headers = out
        count("/embed", "embedding")
        return JSONResponse(vectors, headers=headers)

    # --- relations and rerank ------------------------------------------------------------

    def check_text(text: str, field: str) -> None:
        """One text of a request: not blank (422), at most ``max_text_chars`` (413)."""
        if not text.strip():
            raise ApiError(422, f"{field}: empty", field)
        if len(text) > limits.max_text_chars:
            raise ApiError(
                413,
                f"{field}: {len(text)} characters, more than "
                f"max_text_chars={limits.max_text_chars}",
                field,
            )

    async def in_thread(request: Request, fn: Any, *args: Any) -> tuple[Any, dict[str, str]]:
        """``fn(*args)`` on a worker thread (the event loop keeps serving), with timing headers."""
        if await gone(request):
            return None, {}
        start = time.perf_counter()
        result = await asyncio.to_thread(fn, *args)
        seconds = time.perf_counter() - start
        return result, {"x-inference-time": _ms(seconds), "x-total-time": _ms(seconds)}

    @app.post("/v1/relations", tags=["relations"])
    async def relations(body: RelationsRequest, request: Request) -> Response:
        """Entities of a text and, for every candidate pair (found as ``ingest`` finds them, or
        every two of the given spans in one sentence), both readings scored and the relation it
        states."""
        engine = need("relation")
        check_text(body.text, "text")
        spans = None if body.entities is None else [e.model_dump() for e in body.entities]
        out, headers = await in_thread(request, engine.relations, body.text, spans)
        if out is None:
            return Response(status_code=499)
        shadow("relation", lambda e: e.relations(body.text, spans), out, label_agreement)
        count("/v1/relations", "relation")
        return JSONResponse({"text": body.text, **out}, headers=headers)

    @app.post("/v1/rerank", tags=["rerank"])
    async def rerank(body: RerankRequest, request: Request) -> Response:
        """TEI-style rerank: ``[{"index", "score"}]``, best first, scored by the graph ranker
        (embedding similarity when the release has no ranker)."""
        engine = need("embedding")
        if not body.query.strip():
            raise ApiError(422, "query: empty", "query")
        texts = texts_of(body.texts, "texts")
        out, headers = await in_thread(request, engine.rerank, body.query, texts, body.ranks)
        if out is None:
            return Response(status_code=499)
        scores, scorer = out
        shadow(
            "gnn",
            lambda e: e.rerank(body.query, texts, body.ranks)[0],
            scores,
            ranking_agreement,
        )
        order = sorted(range(len(texts)), key=lambda i: -scores[i])[: body.top_n or len(texts)]
        ranked = [
            {"index": i, "score": scores[i], **({"text": texts[i]} if body.return_text else {})}
            for i in order
        ]
        count("/v1/rerank", scorer)
        return JSONResponse(ranked, headers={**headers, "x-scored-by": scorer})

    # --- generation --------------------------------------------------------------------------

    @app.post("/v1/generate", tags=["generation"])
    async def generate(body: GenerateRequest, request: Request) -> Response:
        """Text generation on the KV-cache decoder: greedy, or seeded top-k/top-p sampling."""
        engine = need("llm")
        llm_executor = current.get().llm_executor
        from sphana.generation import Sampling

        if body.max_new_tokens > limits.max_new_tokens:
            raise ApiError(
                422, f"max_new_tokens: at most {limits.max_new_tokens}", "max_new_tokens"
            )
        if not body.prompt.strip():
            raise ApiError(422, "prompt: empty", "prompt")

        def decoding_on(e: Engine) -> Any:
            return e.decoding(
                body.prompt,
                chat=body.chat,
                max_new_tokens=body.max_new_tokens,
                sampling=Sampling(body.top_k, body.top_p, body.temperature, body.seed),
                stop=body.stop,
            )

        decoding = decoding_on(engine)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        start = time.perf_counter()

        def decode() -> None:  # on the generator's thread; pieces go to the event loop
            try:
                for piece in decoding:
                    loop.call_soon_threadsafe(events.put_nowait, piece)
            finally:
                loop.call_soon_threadsafe(events.put_nowait, None)

        work = loop.run_in_executor(llm_executor, decode)

        def final() -> dict[str, Any]:
            seconds = time.perf_counter() - start
            metrics.generated.labels(engine.models["llm"].version).inc(decoding.tokens)
            return {
                "generated_text": decoding.text,
                "finish_reason": decoding.finish_reason,
                "generated_tokens": decoding.tokens,
                "seconds": round(seconds, 4),
                "tokens_per_second": round(decoding.tokens / seconds, 2),
            }

        served_ids: list[int] = []

        def shadow_decode(other: Engine) -> list[int]:
            return [token for token, _ in decoding_on(other)]

        async def pieces():
            try:
                while (piece := await events.get()) is not None:
                    served_ids.append(piece[0])
                    yield piece
                await work  # a failure of the decode loop surfaces here
                shadow("llm", shadow_decode, served_ids, token_agreement)
            finally:
                decoding.cancel()  # the client left, or the stream ended

        count("/v1/generate", "llm")
        if body.stream:

            async def stream():
                async for token, text in pieces():
                    event = {"token": {"id": token, "text": text}, "generated_text": None}
                    yield f"data: {json.dumps(event)}\n\n"
                yield f"data: {json.dumps(final())}\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")
        async for _ in pieces():
            pass
        seconds = time.perf_counter() - start
        headers = {"x-inference-time": _ms(seconds), "x-total-time": _ms(seconds)}
        return JSONResponse(final(), headers=headers)

    # --- query: the whole chain ---------------------------------------------------------------

    @app.post("/v1/query", tags=["query"])
    async def query_endpoint(body: QueryRequest, request: Request) -> Response:
        """A question answered over the release's corpus index: embedded, retrieved, re-ranked
        by the graph ranker, answered by the generator from the best passages; the cited
        passages (document, section, offsets, scores) and the time of each step."""
        from sphana import query

        engine = current.get().engine
        check_text(body.query, "query")
        try:
            query.check(engine)
        except query.QueryUnavailable as e:
            raise ApiError(404, str(e), "model") from None
        options = query.QueryOptions(top_k=body.top_k, candidates=body.candidates)
        if await gone(request):
            return Response(status_code=499)
        loop = asyncio.get_running_loop()
        # on the generator's thread when there is a generator, as /v1/generate decodes
        executor = current.get().llm_executor if engine.generator is not None else None
        out = await loop.run_in_executor(executor, query.answer, engine, body.query, options)
        count("/v1/query", out["ranked_by"])
        total = _ms(out["timings_ms"]["total"] / 1000)
        return JSONResponse(out, headers={"x-inference-time": total, "x-total-time": total})

    # --- Open Inference Protocol v2 ----------------------------------------------------------

    from sphana.serving import oip

    oip.register(app, lambda: current.get().engine, ApiError, count)

    # --- health, info, metrics ---------------------------------------------------------------

    @app.get("/health", tags=["server"])
    async def health() -> dict[str, Any]:
        """Ready: every component of the release loaded and warmed (and it stays ready while a
        reload loads the next release beside it)."""
        engine = current.get().engine
        return {"status": "ok", "version": engine.version, "components": sorted(engine.models)}

    @app.get("/info", tags=["server"])
    async def info() -> dict[str, Any]:
        """The release, its components (versions, precision, files and checksums, inputs and
        outputs), the effective limits, the last reload and the registry stage followed."""
        engine = current.get().engine
        return {
            **engine.describe(),
            "uptime_seconds": round(time.time() - started, 1),
            "pid": os.getpid(),  # where SIGHUP reloads
            "limits": asdict(limits),
            "batching": asdict(batch),
            "session": asdict(engine.settings),
            "timings": {k: round(v, 3) for k, v in engine.timings.items()},
            "reload": {**reloads, "in_progress": reload_lock.locked()},
            **({"registry": follower.describe()} if follower is not None else {}),
        }

    @app.get("/metrics", tags=["server"])
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for name, b in live.current.batchers.items():
            metrics.queue_depth.labels(name).set(b.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- reload (admin) ------------------------------------------------------------------------

    reload_lock = asyncio.Lock()
    reloads: dict[str, Any] = {"count": 0, "last": None, "last_failure": None}

    async def load_release(
        sources: list[str] | Callable[[], list[str]] | None, origin: str
    ) -> tuple[Engine, Any]:
        """The next release, loaded beside what serves (:class:`~sphana.serving.server.Loader`),
        one at a time; a :class:`ReloadError` is counted, logged and shown in ``/info``.
        ``sources``: paths, or what fetches them (a registry's bundles), or ``None`` for those
        the server started from."""
        if load is None:
            raise ReloadError("source", "this server was started without a way to load")
        if reload_lock.locked():
            raise ReloadError("busy", "a release is loading already; retry when it has ended")
        try:
            async with reload_lock:  # the caller swaps before it awaits again
                if callable(sources):
                    sources = await asyncio.to_thread(sources)
                return await asyncio.to_thread(load, sources)
        except ReloadError as e:
            metrics.reload_failures.labels(e.reason).inc()
            serving_now = live.current.version
            reloads["last_failure"] = {
                "reason": e.reason,
                "message": str(e),
                "origin": origin,
                "at": _now(),
                "serving": serving_now,
            }
            log.warning("load (%s) refused, %s keeps serving: %s", origin, serving_now, e)
            raise

    async def reload(
        sources: list[str] | Callable[[], list[str]] | None, origin: str
    ) -> dict[str, Any]:
        """Load the next release beside the current one and swap it in (see
        :mod:`sphana.serving.live`); :class:`ReloadError` leaves the current one serving."""
        start = time.perf_counter()
        previous = live.current.version
        engine, cleanup = await load_release(sources, origin)
        live.swap(serving(engine, cleanup))
        metrics.reloads.labels(origin).inc()
        reloads["count"] += 1
        reloads["last"] = {
            "version": engine.version,
            "previous": previous,
            "origin": origin,
            "at": _now(),
            "seconds": round(time.perf_counter() - start, 3),
            "timings": {k: round(v, 3) for k, v in engine.timings.items()},
        }
        log.info("reloaded (%s): %s -> %s", origin, previous, engine.version)
        return {"status": "reloaded", **reloads["last"]}

    def check_admin(request: Request) -> None:
        if admin_token is None:
            raise ApiError(
                401,
                "admin endpoints are off on this server: start `sphana serve` with "
                "--admin-token (or SPHANA_ADMIN_TOKEN) to use them",
            )
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {admin_token}".encode()):
            metrics.failures.labels(request.url.path, "unauthorized").inc()
            raise ApiError(401, "send the admin token as 'Authorization: Bearer <token>'")

    async def admin_body(request: Request) -> dict[str, Any]:
        """The JSON object of an admin request, once its token is checked."""
        check_admin(request)
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise ApiError(400, "the body is not valid JSON; send a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(422, "the body must be a JSON object")
        return body

    def release_of(body: dict[str, Any], required: bool) -> list[str] | None:
        release = body.get("release")
        if release is None and not required:
            return None
        if (
            not isinstance(release, list)
            or not release
            or not all(isinstance(x, str) for x in release)
        ):
            raise ApiError(
                422, "release: a list of paths (tarball, bundles or manifest)", "release"
            )
        return release

    def refused(request: Request, e: ReloadError) -> JSONResponse:
        status = 409 if e.reason == "busy" else 422
        metrics.failures.labels(request.url.path, f"http_{status}").inc()
        body = {**error_body(status, str(e)), "reason": e.reason, "serving": live.current.version}
        return JSONResponse(body, status_code=status)

    @app.post("/admin/reload", tags=["admin"])
    async def admin_reload(request: Request) -> Response:
        """Load a release (``{"release": [paths]}``, or those the server started from) and swap
        it in once verified, warmed and its parity samples replayed; 422 (with ``reason``) when
        it fails, 409 while another load runs. The old release serves throughout."""
        release = release_of(await admin_body(request), required=False)
        try:
            return JSONResponse(await reload(release, "admin"))
        except ReloadError as e:
            return refused(request, e)

    def arms() -> list[dict[str, Any]]:
        return [
            {
                "release": s.version,
                "role": "control" if s is live.current else "variant",
                "components": {n: m.version for n, m in s.engine.models.items()},
            }
            for s in live.arms()
        ]

    def split_state() -> dict[str, Any]:
        shadows = {c: {"version": v, "share": share} for c, (v, share) in live.shadows.items()}
        return {"splits": live.splits, "shadows": shadows, "releases": arms()}

    @app.get("/admin/split", tags=["admin"])
    async def get_split(request: Request) -> dict[str, Any]:
        """The splits and the loaded releases (the control and the variants)."""
        check_admin(request)
        return split_state()

    @app.post("/admin/split", tags=["admin"])
    async def set_split(request: Request) -> dict[str, Any]:
        """``{"component", "weights": {version: weight}}`` splits that component's traffic from
        the next request on (``"weights": null`` ends the split)."""
        body = await admin_body(request)
        component = body.get("component")
        if not isinstance(component, str) or not component:
            raise ApiError(422, "component: the component to split, e.g. 'embedding'", "component")
        weights = body.get("weights")
        try:
            if weights is not None:
                if not isinstance(weights, dict):
                    raise ValueError(f"split of {component}: weights must be {{version: weight}}")
                weights = check_weights(component, weights)
            live.set_split(component, weights)
        except (ValueError, LookupError) as e:
            raise ApiError(422, str(e), "weights") from None
        log.info("split of %s: %s", component, weights)
        return split_state()

    @app.post("/admin/shadow", tags=["admin"])
    async def set_shadow(request: Request) -> dict[str, Any]:
        """``{"component", "version", "share"}`` copies that share of the component's requests to
        that version (``"version": null`` ends it); its answers are compared, never returned."""
        body = await admin_body(request)
        component, version = body.get("component"), body.get("version")
        if not isinstance(component, str) or not component:
            raise ApiError(422, "component: the component to shadow, e.g. 'embedding'", "component")
        try:
            if version is None:
                live.set_shadow(component, None)
            else:
                share = check_share(component, body.get("share", 1.0))
                live.set_shadow(component, str(version), share)
        except (ValueError, LookupError) as e:
            raise ApiError(422, str(e), "version") from None
        return split_state()

    @app.post("/admin/variants", tags=["admin"])
    async def add_variant(request: Request) -> Response:
        """``{"release": [paths]}`` loads another release beside the control (verified, warmed,
        its parity samples replayed), for splits, pins and shadow traffic."""
        release = release_of(await admin_body(request), required=True)
        try:
            engine, cleanup = await load_release(release, "variant")
        except ReloadError as e:
            return refused(request, e)
        served = serving(engine, cleanup)
        if any(a.version == engine.version for a in live.arms()):
            served.close()
            raise ApiError(409, f"a release {engine.version} is loaded already", "release")
        live.add_variant(served)
        return JSONResponse(split_state())

    @app.delete("/admin/variants/{version}", tags=["admin"])
    async def remove_variant(version: str, request: Request) -> dict[str, Any]:
        """Stop serving variant release ``version`` (freed once its requests end)."""
        check_admin(request)
        try:
            live.remove_variant(version)
        except LookupError as e:
            raise ApiError(404, str(e), "version") from None
        return split_state()

    @app.get("/admin/ab", tags=["admin"])
    async def ab_report(request: Request, component: str) -> dict[str, Any]:
        """Per version of ``component``: requests, latency p50/p95, shadow agreement, mean reward
        with its 95% confidence interval, and the test against the control's version."""
        check_admin(request)
        control = live.current.engine.models.get(component)
        shadowed = live.shadows.get(component)
        return {
            **outcomes.report(component, control.version if control else None),
            "split": live.splits.get(component),
            "shadow": {"version": shadowed[0], "share": shadowed[1]} if shadowed else None,
        }

    @app.post("/v1/feedback", tags=["server"])
    async def feedback(body: Feedback) -> dict[str, Any]:
        """Record an outcome against the version that served a request."""
        if not np.isfinite(body.reward):
            raise ApiError(422, "reward: a finite number", "reward")
        served = outcomes.feedback(body.request_id, body.reward)
        if served is None:
            raise ApiError(
                404,
                f"request_id {body.request_id!r}: not a recent request of this server "
                "(the x-request-id header of a model response)",
                "request_id",
            )
        return {"request_id": body.request_id, "component": served[0], "version": served[1]}

    async def on_sighup() -> None:
        with contextlib.suppress(ReloadError):  # logged, counted and shown in /info by reload()
            await reload(None, "sighup")

    tasks: list[asyncio.Task] = []

    @app.on_event("startup")
    async def start() -> None:
        loop = asyncio.get_running_loop()
        if load is not None and threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(
                signal.SIGHUP, lambda: tasks.append(loop.create_task(on_sighup()))
            )
        if follower is not None:
            tasks.append(loop.create_task(follower.run(reload)))

    @app.on_event("shutdown")
    async def close() -> None:
        for task in [*tasks, *shadow_tasks]:
            task.cancel()
        shadow_executor.shutdown(wait=False, cancel_futures=True)
        live.close()

    app.state.metrics = metrics
    app.state.live = live
    return Admission(app)


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
