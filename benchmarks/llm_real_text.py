"""Generators on real text nobody here wrote: perplexity and bits per character on Python
standard-library docstrings (the general out-of-domain set, ``sphana.general_eval``).

    python benchmarks/llm_real_text.py DIR [DIR ...] [--passages 150]

A directory is a ``train_llm`` output (``target/artifacts/llm/<version>/pytorch``) or an
``export_llm`` one (``.../onnx``: each of its ONNX files, fp32, INT8 and 4-bit, on ONNX Runtime
with 2 threads). Perplexity is per token of the model's own tokenizer, so only bits per character
compare models with different tokenizers. Prints one line per model. It asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

from sphana import general_eval
from sphana.llm import encode, evaluate, load_trained


def scorers(directory: Path) -> list[tuple[str, Any, Any]]:
    """(name, tokenizer, perplexity of encoded examples) for each model in ``directory``."""
    if not list(directory.glob("*.onnx")):
        model, tokenizer, info = load_trained(directory)
        score = partial(evaluate, model.eval(), pad_id=info["pad_token_id"], batch_size=16)
        return [(info.get("base_model") or str(directory), tokenizer, score)]
    from transformers import AutoTokenizer

    from sphana.export.llm import ort_perplexity
    from sphana.generation import OnnxGenerator

    tokenizer = AutoTokenizer.from_pretrained(directory)  # what encode() takes
    out = []
    for path in sorted(directory.glob("*.onnx")):
        llm = OnnxGenerator(directory, path.name, threads=2)
        shape = (llm.info["layers"], llm.info["kv_heads"], llm.info["head_dim"])
        score = partial(ort_perplexity, llm.step, shape=shape, pad_id=llm.info["pad_token_id"])
        out.append((str(path), tokenizer, score))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--passages", type=int, default=150)
    args = parser.parse_args()
    texts = [p.passage for p in general_eval.build(800).selection][: args.passages]
    records = [{"kind": "passage", "prompt": "", "text": t} for t in texts]
    chars = sum(len(t) for t in texts)
    for name, tokenizer, score in (s for d in args.models for s in scorers(d)):
        data = encode(tokenizer, records, 256)
        tokens = sum(len(x["input_ids"]) for x in data)
        start = time.perf_counter()
        result = score(data)
        bits = math.log(result["perplexity"]) * tokens / chars / math.log(2)
        print(
            f"{name}: perplexity {result['perplexity']:.2f} "
            f"({tokens} tokens), {bits:.3f} bits/char over {len(texts)} stdlib docstrings "
            f"({chars} chars), {time.perf_counter() - start:.0f} s"
        )


if __name__ == "__main__":
    main()
