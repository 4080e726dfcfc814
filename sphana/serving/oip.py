"""The Open Inference Protocol v2 (KServe / Triton) over a release's raw ONNX sessions.

Tensors come as JSON (``data`` in row-major order) or through the binary tensor data extension
(``Inference-Header-Content-Length``: a JSON header, then each tensor's little-endian bytes), which
``tritonclient`` uses by default; outputs go back the way the request asks
(``parameters.binary_data`` per output, ``binary_data_output`` for all).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from sphana.serving.engine import Engine, Model

DATATYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_V2 = {v: k for k, v in DATATYPES.items()}
HEADER_LENGTH = "inference-header-content-length"


def tensor_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": meta["name"],
        "datatype": NUMPY_TO_V2.get(meta["dtype"], meta["dtype"]),
        "shape": meta["shape"],
    }


def parse_request(
    body: bytes, header_length: str | None, model: Model, error: Any
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(feed, request JSON)`` of an infer request; ``error(status, message, param)`` builds
    the exception for anything wrong, naming the input."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise error(400, "Inference-Header-Content-Length: not an integer") from None
        if not 0 <= n <= len(body):
            raise error(
                400, f"Inference-Header-Content-Length {n} is outside the body ({len(body)} bytes)"
            )
        header, binary = body[:n], memoryview(body)[n:]
    else:
        header, binary = body, memoryview(b"")
    try:
        request = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(400, f"the request is not valid JSON ({e})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise error(400, "the request needs an 'inputs' list")
    expected = {m["name"]: m for m in model.inputs}
    feed: dict[str, np.ndarray] = {}
    offset = 0
    for k, spec in enumerate(request["inputs"]):
        where = f"inputs[{k}]"
        if not isinstance(spec, dict):
            raise error(400, f"{where}: an object with name, shape, datatype, data")
        name = spec.get("name")
        if name not in expected:
            raise error(
                400,
                f"{where}.name: {name!r} is not an input of {model.name} "
                f"(inputs: {', '.join(expected)})",
                where,
            )
        want = expected[name]
        datatype = spec.get("datatype")
        if DATATYPES.get(datatype) != want["dtype"]:
            raise error(
                400,
                f"{where} ({name}): datatype {datatype!r}, the model takes "
                f"{NUMPY_TO_V2.get(want['dtype'], want['dtype'])}",
                where,
            )
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise error(400, f"{where} ({name}): shape must be a list of sizes", where)
        if len(shape) != len(want["shape"]) or any(
            w not in (-1, d) for w, d in zip(want["shape"], shape, strict=True)
        ):
            raise error(
                400,
                f"{where} ({name}): shape {shape} does not fit {want['shape']} (-1: any size)",
                where,
            )
        dtype = np.dtype(want["dtype"])
        size = int(np.prod(shape)) if shape else 1
        params = spec.get("parameters") or {}
        if "binary_data_size" in params:
            nbytes = params["binary_data_size"]
            if nbytes != size * dtype.itemsize or offset + nbytes > len(binary):
                raise error(
                    400,
                    f"{where} ({name}): binary_data_size {nbytes} does not match "
                    f"shape {shape} of {datatype} or the bytes sent",
                    where,
                )
            array = np.frombuffer(binary[offset : offset + nbytes], dtype=dtype.newbyteorder("<"))
            offset += nbytes
        elif "data" in spec:
            try:
                array = np.asarray(spec["data"], dtype=dtype)
            except (TypeError, ValueError) as e:
                raise error(400, f"{where} ({name}).data: {e}", where) from None
            if array.size != size:
                raise error(400, f"{where} ({name}): {array.size} values for shape {shape}", where)
        else:
            raise error(400, f"{where} ({name}): give data or parameters.binary_data_size", where)
        feed[name] = array.reshape(shape).astype(dtype, copy=False)
    missing = sorted(set(expected) - set(feed))
    if missing:
        raise error(
            400, f"inputs: missing {', '.join(missing)} (the model takes {', '.join(expected)})"
        )
    return feed, request


def encode_response(
    model: Model, request: dict[str, Any], outputs: list[np.ndarray], names: list[str]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (binary where the request asked for it)."""
    asked = {o.get("name"): o for o in request.get("outputs") or [] if isinstance(o, dict)}
    default_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    entries, blobs = [], []
    for name, value in zip(names, outputs, strict=True):
        value = np.ascontiguousarray(value)
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(value.shape),
            "datatype": NUMPY_TO_V2[str(value.dtype)],
        }
        params = (asked.get(name) or {}).get("parameters") or {}
        if params.get("binary_data", default_binary):
            blob = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = value.ravel().tolist()
        entries.append(entry)
    out: dict[str, Any] = {
        "model_name": model.name,
        "model_version": model.version,
        "outputs": entries,
    }
    if "id" in request:
        out["id"] = request["id"]
    header = json.dumps(out).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def register(app: Any, engine_of: Callable[[], Engine], api_error: Any, count: Any) -> None:
    """Add the ``/v2`` routes to ``app``; ``engine_of()`` is the engine of the request being
    served (the release it started on)."""

    def model_of(name: str, version: str | None) -> Model:
        engine = engine_of()
        model = engine.models.get(name)
        if model is None:
            raise api_error(
                404,
                f"unknown model {name!r}; this server has {', '.join(sorted(engine.models))}",
                "name",
            )
        if version not in (None, "", model.version):
            raise api_error(
                404, f"model {name} has version {model.version}, not {version!r}", "version"
            )
        return model

    @app.get("/v2", tags=["v2"])
    async def server_metadata() -> dict[str, Any]:
        version = engine_of().version
        return {"name": "sphana", "version": version, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", tags=["v2"])
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"])
    async def ready() -> dict[str, Any]:
        return {"ready": True}

    async def metadata(name: str, version: str | None = None) -> dict[str, Any]:
        model = model_of(name, version)
        return {
            "name": model.name,
            "versions": [model.version],
            "platform": "onnxruntime_onnx",
            "inputs": [tensor_meta(m) for m in model.inputs],
            "outputs": [tensor_meta(m) for m in model.outputs],
        }

    async def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        model_of(name, version)
        return {"name": name, "ready": True}

    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        model = model_of(name, version)
        body = await request.body()
        feed, req = parse_request(body, request.headers.get(HEADER_LENGTH), model, api_error)
        asked = [o.get("name") for o in req.get("outputs") or [] if isinstance(o, dict)]
        names = [m["name"] for m in model.outputs]
        unknown = [n for n in asked if n not in names]
        if unknown:
            raise api_error(400, f"outputs: {unknown} not among {names}", "outputs")
        names = asked or names
        try:
            outputs = await asyncio.to_thread(model.run, feed, names)
        except Exception as e:  # ONNX Runtime refuses inputs the metadata could not catch
            raise api_error(400, f"{name}: the model refused the inputs: {e}") from None
        content, headers = encode_response(model, req, outputs, names)
        count(f"/v2/models/{name}/infer", name)
        return Response(content, headers=headers)

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.get(prefix, tags=["v2"])(metadata)
        app.get(prefix + "/ready", tags=["v2"])(model_ready)
        app.post(prefix + "/infer", tags=["v2"])(infer)
