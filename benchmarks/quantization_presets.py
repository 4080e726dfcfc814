"""Compare the INT8 quantization presets on the built embedding model (after `dvc repro`):

    python benchmarks/quantization_presets.py [--weights detected|full|reduced|both]

For each preset of `export.quantization` it quantizes target/.../embedding.onnx, then prints the
mean/min cosine to the PyTorch model on validation texts, validation recall@5 and its retention,
the mean cosine on real text nobody here wrote (the license paragraphs of
benchmarks/export_speed.py) and the file size. The export gives the weights 8 bits on a CPU with
VNNI and 7 (``reduce_range``) on one without (:func:`sphana.export.cpu_has_vnni`); ``--weights``
also measures what the other choice would give on this CPU (``both``: each). It measures; it
asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import yaml
from export_speed import license_paragraphs

from sphana.config import Quantization
from sphana.embedding import ValidationSet, encode, load_trained
from sphana.entry import quiet_libraries
from sphana.export import cpu_has_vnni, quantize, session
from sphana.export.embedding import ort_embed
from sphana.vectors import row_cosines


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights",
        choices=["detected", "full", "reduced", "both"],
        default="detected",
        help="INT8 weights of 8 bits (full) or 7 (reduced: reduce_range); detected: as the "
        "export chooses on this CPU",
    )
    args = parser.parse_args()
    vnni = cpu_has_vnni()
    ranges = {
        "detected": [vnni],
        "full": [True],
        "reduced": [False],
        "both": [True, False],
    }[args.weights]

    params = yaml.safe_load(Path("params.yaml").read_text())
    root = Path(params["paths"]["artifacts"]) / "embedding" / params["embedding"]["version"]
    max_len = params["embedding"]["max_seq_length"]
    validation = ValidationSet.load(Path(params["paths"]["datasets"]) / "embedding")
    encoder, tokenizer = load_trained(root / "pytorch")
    texts = validation.queries + validation.corpus_texts
    real = license_paragraphs()[:256]
    ref = encode(encoder, tokenizer, texts, 64, max_len)
    real_ref = encode(encoder, tokenizer, real, 64, max_len) if real else None
    torch_r5 = validation.evaluate(lambda t: encode(encoder, tokenizer, t, 64, max_len))["recall@5"]
    print(
        f"{len(texts)} validation texts, {len(real)} license paragraphs; PyTorch recall@5 "
        f"{torch_r5:.4f}; this CPU {'has' if vnni else 'lacks'} VNNI"
    )
    print(
        f"{'preset':22s} {'weights':>7s} {'mean cos':>9s} {'min cos':>9s} {'recall@5':>9s}"
        f" {'retention':>9s} {'real cos':>9s} {'MiB':>7s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for preset in Quantization:
            for full in ranges:
                path = Path(tmp) / f"{preset.value}.onnx"
                quantize(root / "onnx/embedding.onnx", path, preset, reduce_range=not full)
                embed = ort_embed(session(path), tokenizer, max_len)
                cos = row_cosines(ref, embed(texts))
                real_cos = row_cosines(real_ref, embed(real)).mean() if real else np.nan
                r5 = validation.evaluate(embed)["recall@5"]
                print(
                    f"{preset.value:22s} {'8-bit' if full else '7-bit':>7s} {cos.mean():9.4f} "
                    f"{cos.min():9.4f} {r5:9.4f} {r5 / torch_r5:9.2%} {real_cos:9.4f} "
                    f"{path.stat().st_size / 2**20:7.1f}"
                )


if __name__ == "__main__":
    main()
