"""Sphana: declarative build of the ONNX artifacts of a retrieval and knowledge database."""

__version__ = "0.1.0"
