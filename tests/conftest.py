"""Shared fixtures. TensorFlow's C++ start-up banner is hidden; warnings still show."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    """A TFDS data folder holding a prepared `multi_digits` (built once per test session)."""
    import tensorflow_datasets as tfds

    import mtl  # noqa: F401  (registers multi_digits)

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("multi_digits", data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.fixture(scope="session")
def overlap_data_dir(digits_data_dir):
    """`digits_data_dir` with `multi_digits/overlap` prepared too."""
    import tensorflow_datasets as tfds

    tfds.builder("multi_digits/overlap", data_dir=digits_data_dir).download_and_prepare()
    return digits_data_dir
