"""``sphana serve --stdio``: the engine over JSON lines, for a host that runs the server as a
child process (a Rust or .NET host, say) and talks to it through pipes.

One request per line on stdin, one response per line on stdout, in order::

    {"id": 1, "op": "ping"}                                  -> {"id": 1, "ok": true}
    {"id": 2, "op": "info"}                                  -> {"id": 2, "info": {...}}
    {"id": 3, "op": "embed", "inputs": ["a", "b"]}           -> {"id": 3, "embeddings": [[...]]}
    {"id": 4, "op": "relations", "text": "...", "entities": [{"start", "end"}]?}
                                                             -> {"id": 4, "entities", "pairs"}
    {"id": 5, "op": "rerank", "query": "...", "texts": [...], "ranks": [...]?}
                                               -> {"id": 5, "results": [{"index", "score"}]}
    {"id": 6, "op": "generate", "prompt": "...", "max_new_tokens": 16}
                                                             -> {"id": 6, "generated_text": ...}
    {"id": 7, "op": "query", "query": "...", "top_k": 5}    -> {"id": 7, "answer", "passages", ...}

``truncate`` (embed) and ``chat``, ``top_k``, ``top_p``, ``temperature``, ``seed``, ``stop``
(generate) are optional, as over HTTP. A bad request gets ``{"id", "error"}`` and the process
goes on; end of input ends it. Logs go to stderr, never stdout.
"""

from __future__ import annotations

import argparse
import json
from typing import IO, Any

from sphana.serving.engine import Engine, InputTooLong, InvalidInput

OPS = ("ping", "info", "embed", "relations", "rerank", "generate", "query")


class _Refused(ValueError):
    pass


def _texts(request: dict[str, Any], field: str, max_inputs: int) -> list[str]:
    value = request.get(field)
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _Refused(f"{field}: a text or a non-empty list of texts")
    if len(texts) > max_inputs:
        raise _Refused(f"{field}: {len(texts)} texts, more than max_inputs={max_inputs}")
    return texts


def _text(request: dict[str, Any], field: str) -> str:
    text = request.get(field)
    if not isinstance(text, str) or not text.strip():
        raise _Refused(f"{field}: a non-empty text")
    return text


def _need(component: Any, name: str) -> None:
    if component is None:
        raise _Refused(f"this release has no {name} component")


def handle(engine: Engine, request: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The response to one request (without its id)."""
    if not isinstance(request, dict):
        raise _Refused("each line must be a JSON object with an 'op'")
    op = request.get("op")
    if op == "ping":
        return {"ok": True, "version": engine.version}
    if op == "info":
        return {"info": engine.describe()}
    if op == "embed":
        _need(engine.embedder, "embedding")
        texts = _texts(request, "inputs", args.max_inputs)
        truncate = request.get("truncate", args.auto_truncate)
        try:
            vectors = engine.embedder.embed(texts, bool(truncate))
        except InputTooLong as e:
            raise _Refused(f"inputs[{e.index}]: {e}") from None
        return {"embeddings": vectors.tolist()}
    if op == "relations":
        _need(engine.extractor, "relation")
        text = _text(request, "text")
        spans = request.get("entities")
        if spans is not None and not isinstance(spans, list):
            raise _Refused("entities: a list of {start, end} spans")
        return engine.relations(text, spans)  # the engine checks each span (InvalidInput)
    if op == "rerank":
        _need(engine.embedder, "embedding")
        query = _text(request, "query")
        texts = _texts(request, "texts", args.max_inputs)
        ranks = request.get("ranks")
        if ranks is not None and not isinstance(ranks, list):
            raise _Refused(f"ranks: one rank >= 0 per text ({len(texts)})")
        scores, scorer = engine.rerank(query, texts, ranks)
        order = sorted(range(len(texts)), key=lambda i: -scores[i])
        return {"results": [{"index": i, "score": scores[i]} for i in order], "scored_by": scorer}
    if op == "generate":
        from sphana.generation import Sampling

        _need(engine.generator, "llm")
        prompt = _text(request, "prompt")
        new_tokens = request.get("max_new_tokens", 64)
        if not isinstance(new_tokens, int) or not 1 <= new_tokens <= args.max_new_tokens:
            raise _Refused(f"max_new_tokens: an integer from 1 to {args.max_new_tokens}")
        try:
            sampling = Sampling(
                int(request.get("top_k", 1)),
                float(request.get("top_p", 1.0)),
                float(request.get("temperature", 1.0)),
                int(request.get("seed", 0)),
            )
        except (TypeError, ValueError) as e:
            raise _Refused(f"sampling: {e}") from None
        decoding = engine.decoding(
            prompt,
            chat=bool(request.get("chat", True)),
            max_new_tokens=new_tokens,
            sampling=sampling,
            stop=request.get("stop") or [],
        )
        for _ in decoding:
            pass
        return {
            "generated_text": decoding.text,
            "finish_reason": decoding.finish_reason,
            "generated_tokens": decoding.tokens,
        }
    if op == "query":  # as POST /v1/query
        from sphana import query

        question = _text(request, "query")
        top_k = request.get("top_k", 5)
        if not isinstance(top_k, int) or not 1 <= top_k <= 50:
            raise _Refused("top_k: an integer from 1 to 50")
        try:
            return query.answer(engine, question, query.QueryOptions(top_k=top_k))
        except query.QueryUnavailable as e:
            raise _Refused(str(e)) from None
    raise _Refused(f"op: {op!r} is not one of {', '.join(OPS)}")


def serve_stdio(engine: Engine, args: argparse.Namespace, stdin: IO[str], stdout: IO[str]) -> int:
    """Answer every line of ``stdin`` until it ends."""
    for line in stdin:
        if not line.strip():
            continue
        request_id = None
        try:
            request = json.loads(line)
            request_id = request.get("id") if isinstance(request, dict) else None
            response = handle(engine, request, args)
        except json.JSONDecodeError as e:
            response = {"error": f"not a JSON line ({e.msg} at column {e.colno})"}
        except (_Refused, InvalidInput) as e:
            response = {"error": str(e)}
        except Exception as e:  # the engine failed on this request: say so, keep serving
            response = {"error": f"{type(e).__name__}: {e}"}
        stdout.write(json.dumps({"id": request_id, **response}) + "\n")
        stdout.flush()
    return 0
