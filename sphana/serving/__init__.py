"""The reference server of a built release: ONNX Runtime, tokenizers and numpy only (no torch).

- :mod:`sphana.serving.engine`: loads a verified release (:mod:`sphana.release`) into warmed ONNX
  Runtime sessions and runs each component on raw inputs, with the code the build used.
- :mod:`sphana.serving.batching`: dynamic batching per model (token budget, request count, wait).
- :mod:`sphana.serving.app`: the HTTP API (FastAPI): OpenAI- and TEI-compatible embeddings,
  relations, rerank, generation with server-sent events, the Open Inference Protocol v2, health,
  info and Prometheus metrics, with bounded admission and input limits.
- :mod:`sphana.serving.stdio`: the same engine over JSON lines on stdin/stdout.
"""
