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
import json
import time
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as StdJSONResponse
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from sphana.serving.batching import Batcher, BatchLimits, ClientGone, Timing
from sphana.serving.engine import Engine, InputTooLong, InvalidInput
from sphana.serving.server import ServeLimits


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


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def create_app(engine: Engine, limits: ServeLimits, batch: BatchLimits) -> Any:
    """The ASGI app serving ``engine`` (already warmed)."""
    metrics = Metrics()
    version = engine.version
    started = time.time()
    app = FastAPI(
        title="Sphana",
        version=version,
        description="Serves a Sphana release on ONNX Runtime: embeddings (OpenAI, TEI), "
        "relations, rerank, generation, and raw tensors over the Open Inference Protocol v2.",
        default_response_class=JSONResponse,
    )
    batchers: dict[str, Batcher] = {}
    if engine.embedder is not None:
        embedder = engine.embedder

        def observe(size: int, seconds: float) -> None:
            metrics.batch_size.labels("embedding").observe(size)
            metrics.inference.labels("embedding").observe(seconds)

        batchers["embedding"] = Batcher(
            "embedding",
            lambda items: embedder.run([text for text, _ in items]),
            lambda item: item[1],  # its length in tokens
            batch,
            observe,
        )
    llm_executor = None
    if engine.generator is not None:
        from concurrent.futures import ThreadPoolExecutor

        llm_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm")

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
        version header on every response."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.active = 0

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.inner(scope, receive, send)
                return
            path = scope["path"]
            exempt = path in ("/health", "/metrics") or path.startswith("/v2/health")
            refusal = None
            if not exempt and self.active >= limits.max_concurrent_requests:
                refusal = (
                    429,
                    "too many requests in flight; retry after the Retry-After "
                    f"seconds (max_concurrent_requests={limits.max_concurrent_requests})",
                )
            else:
                length = dict(scope.get("headers") or []).get(b"content-length")
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
                    (b"x-model-version", version.encode()),
                ]
                if status == 429:
                    headers.append((b"retry-after", b"1"))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return

            async def send_with_version(message: dict) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"x-model-version", version.encode()),
                    ]
                await send(message)

            self.active += 1
            metrics.in_flight.inc()
            try:
                await self.inner(scope, receive, send_with_version)
            finally:
                self.active -= 1
                metrics.in_flight.dec()

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

    def need(name: str) -> None:
        if name not in engine.models:
            skipped = engine.manifest.get("skipped_components", {}).get(name)
            why = f": {skipped['reason']}" if skipped else ""
            raise ApiError(404, f"this release has no {name} component{why}", "model")

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
        need("embedding")
        assert engine.embedder is not None
        start = time.perf_counter()
        try:
            lengths = engine.embedder.lengths(texts, truncate)
        except InputTooLong as e:
            raise ApiError(413, f"{field}[{e.index}]: {e}", f"{field}[{e.index}]") from None
        tokenize = time.perf_counter() - start
        metrics.tokenize.labels("embedding").observe(tokenize)
        batcher = batchers["embedding"]
        metrics.queue_depth.labels("embedding").set(batcher.depth)
        items = list(zip(texts, lengths, strict=True))
        try:
            vectors, timing = await batcher.submit(items, lambda: gone(request))
        except ClientGone:
            return None
        metrics.queue.labels("embedding").observe(timing.queue)
        headers = model_headers(timing, tokenize, time.perf_counter() - start)
        return vectors, sum(lengths), headers

    def count(endpoint: str, model: str, code: int = 200) -> None:
        m = engine.models.get(model)
        metrics.requests.labels(endpoint, model, m.version if m else "", str(code)).inc()

    # --- embeddings --------------------------------------------------------------------------

    @app.post("/v1/embeddings", tags=["embeddings"])
    async def openai_embeddings(body: EmbeddingsRequest, request: Request) -> Response:
        """OpenAI-compatible embeddings (what the ``openai`` client's ``embeddings.create``
        sends)."""
        if body.model not in (None, "embedding", engine.manifest.get("name"), version):
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
        need("relation")
        if not body.text.strip():
            raise ApiError(422, "text: empty", "text")
        if len(body.text) > limits.max_text_chars:
            raise ApiError(
                413,
                f"text: {len(body.text)} characters, more than "
                f"max_text_chars={limits.max_text_chars}",
                "text",
            )
        spans = None if body.entities is None else [e.model_dump() for e in body.entities]
        out, headers = await in_thread(request, engine.relations, body.text, spans)
        if out is None:
            return Response(status_code=499)
        count("/v1/relations", "relation")
        return JSONResponse({"text": body.text, **out}, headers=headers)

    @app.post("/v1/rerank", tags=["rerank"])
    async def rerank(body: RerankRequest, request: Request) -> Response:
        """TEI-style rerank: ``[{"index", "score"}]``, best first, scored by the graph ranker
        (embedding similarity when the release has no ranker)."""
        need("embedding")
        if not body.query.strip():
            raise ApiError(422, "query: empty", "query")
        texts = texts_of(body.texts, "texts")
        out, headers = await in_thread(request, engine.rerank, body.query, texts, body.ranks)
        if out is None:
            return Response(status_code=499)
        scores, scorer = out
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
        need("llm")
        from sphana.generation import Sampling

        if body.max_new_tokens > limits.max_new_tokens:
            raise ApiError(
                422, f"max_new_tokens: at most {limits.max_new_tokens}", "max_new_tokens"
            )
        if not body.prompt.strip():
            raise ApiError(422, "prompt: empty", "prompt")
        decoding = engine.decoding(
            body.prompt,
            chat=body.chat,
            max_new_tokens=body.max_new_tokens,
            sampling=Sampling(body.top_k, body.top_p, body.temperature, body.seed),
            stop=body.stop,
        )
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

        async def pieces():
            try:
                while (piece := await events.get()) is not None:
                    yield piece
                await work  # a failure of the decode loop surfaces here
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

    # --- Open Inference Protocol v2 ----------------------------------------------------------

    from sphana.serving import oip

    oip.register(app, engine, ApiError, count)

    # --- health, info, metrics ---------------------------------------------------------------

    @app.get("/health", tags=["server"])
    async def health() -> dict[str, Any]:
        """Ready: every component of the release loaded and warmed."""
        return {"status": "ok", "version": version, "components": sorted(engine.models)}

    @app.get("/info", tags=["server"])
    async def info() -> dict[str, Any]:
        """The release, its components (versions, precision, files and checksums, inputs and
        outputs) and the effective limits."""
        return {
            **engine.describe(),
            "uptime_seconds": round(time.time() - started, 1),
            "limits": asdict(limits),
            "batching": asdict(batch),
            "session": asdict(engine.settings),
            "timings": {k: round(v, 3) for k, v in engine.timings.items()},
        }

    @app.get("/metrics", tags=["server"])
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for name, b in batchers.items():
            metrics.queue_depth.labels(name).set(b.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.on_event("shutdown")
    async def close() -> None:
        for b in batchers.values():
            b.close()
        if llm_executor is not None:
            llm_executor.shutdown(wait=False, cancel_futures=True)

    app.state.metrics = metrics
    app.state.batchers = batchers
    return Admission(app)
