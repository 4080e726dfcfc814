"""Generators on real text nobody here wrote: perplexity and bits per character on Python
standard-library docstrings (the general out-of-domain set, ``sphana.general_eval``).

    python benchmarks/llm_real_text.py PYTORCH_DIR [PYTORCH_DIR ...] [--passages 150]

Each directory is a ``train_llm`` output (``target/artifacts/llm/<version>/pytorch``). Perplexity
is per token of the model's own tokenizer, so only bits per character compare models with
different tokenizers. Prints one line per model. It asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from sphana import general_eval
from sphana.llm import encode, evaluate, load_trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--passages", type=int, default=150)
    args = parser.parse_args()
    texts = [p.passage for p in general_eval.build(800).selection][: args.passages]
    records = [{"kind": "passage", "prompt": "", "text": t} for t in texts]
    chars = sum(len(t) for t in texts)
    for directory in args.models:
        model, tokenizer, info = load_trained(directory)
        data = encode(tokenizer, records, 256)
        tokens = sum(len(x["input_ids"]) for x in data)
        start = time.perf_counter()
        result = evaluate(model.eval(), data, info["pad_token_id"], 16)
        bits = math.log(result["perplexity"]) * tokens / chars / math.log(2)
        print(
            f"{info.get('base_model') or directory}: perplexity {result['perplexity']:.2f} "
            f"({tokens} tokens), {bits:.3f} bits/char over {len(texts)} stdlib docstrings "
            f"({chars} chars), {time.perf_counter() - start:.0f} s"
        )


if __name__ == "__main__":
    main()
