"""Compare the INT8 quantization presets on the built embedding model (after `dvc repro`):

    python benchmarks/quantization_presets.py

For each preset of `export.quantization` it quantizes target/.../embedding.onnx, then prints the
mean/min cosine to the PyTorch model on validation texts, validation recall@5 and its retention,
and the file size. It measures; it asserts nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import yaml

from sphana.config import Quantization
from sphana.embedding import ValidationSet, encode, load_trained
from sphana.entry import quiet_libraries
from sphana.export import quantize, session
from sphana.export.embedding import ort_embed


def main() -> None:
    quiet_libraries()
    params = yaml.safe_load(Path("params.yaml").read_text())
    root = Path(params["paths"]["artifacts"]) / "embedding" / params["embedding"]["version"]
    max_len = params["embedding"]["max_seq_length"]
    validation = ValidationSet.load(Path(params["paths"]["datasets"]) / "embedding")
    encoder, tokenizer = load_trained(root / "pytorch")
    texts = validation.queries + validation.corpus_texts
    ref = encode(encoder, tokenizer, texts, 64, max_len)
    torch_r5 = validation.evaluate(lambda t: encode(encoder, tokenizer, t, 64, max_len))["recall@5"]
    print(f"{len(texts)} validation texts; PyTorch recall@5 {torch_r5:.4f}")
    print(
        f"{'preset':22s} {'mean cos':>9s} {'min cos':>9s} {'recall@5':>9s}"
        f" {'retention':>9s} {'MiB':>7s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for preset in Quantization:
            path = Path(tmp) / f"{preset.value}.onnx"
            quantize(root / "onnx/embedding.onnx", path, preset)
            embed = ort_embed(session(path), tokenizer, max_len)
            got = embed(texts)
            cos = np.sum(ref * got, axis=1) / np.linalg.norm(got, axis=1)
            r5 = validation.evaluate(embed)["recall@5"]
            print(
                f"{preset.value:22s} {cos.mean():9.4f} {cos.min():9.4f} {r5:9.4f} "
                f"{r5 / torch_r5:9.2%} {path.stat().st_size / 2**20:7.1f}"
            )


if __name__ == "__main__":
    main()
