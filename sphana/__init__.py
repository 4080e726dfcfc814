"""Sphana: declarative build of the ONNX artifacts of a retrieval and knowledge database."""

import os

# Nothing is ever downloaded at run time: base models come from local paths, installed packages
# or the local Hugging Face cache (see sphana.base_models).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
