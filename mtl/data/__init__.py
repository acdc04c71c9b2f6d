"""Datasets and input pipelines. Importing this registers `multi_digits` with TFDS."""

from mtl.data import multi_digits, pipeline

__all__ = ["multi_digits", "pipeline"]
