"""Task heads: small layers mapping the backbone's features to one task's output.

Each builder returns an (unbuilt) `keras.Sequential`; `MultiTaskModel` calls it on the backbone's
output. The last layer computes in float32 so that, under a mixed-precision policy, outputs and
losses stay in float32.
"""

from __future__ import annotations

from typing import Sequence

import keras
from mtl.config import UsageError


def _head(units: int, hidden: Sequence[int], dropout: float, name: str | None,
          kind: str) -> keras.Sequential:
    if int(units) < 1:
        raise UsageError(f"{kind} head: the number of outputs must be >= 1; got {units!r}.")
    layers = []
    for width in hidden:
        layers.append(keras.layers.Dense(width, activation="relu"))
        if dropout:
            layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(int(units), dtype="float32"))
    return keras.Sequential(layers, name=name)


def classification(num_classes: int, *, hidden: Sequence[int] = (), dropout: float = 0.0,
                   name: str | None = None) -> keras.Sequential:
    """Logits over `num_classes` classes: [batch, num_classes]. Pair with
    `SparseCategoricalCrossentropy(from_logits=True)` (integer labels)."""
    return _head(num_classes, hidden, dropout, name, "classification")


def binary(num_labels: int = 1, *, hidden: Sequence[int] = (), dropout: float = 0.0,
           name: str | None = None) -> keras.Sequential:
    """One logit per binary label: [batch, num_labels] (multi-label when num_labels > 1). Pair
    with `BinaryCrossentropy(from_logits=True)`."""
    return _head(num_labels, hidden, dropout, name, "binary")


multi_label = binary


def regression(units: int = 1, *, hidden: Sequence[int] = (), dropout: float = 0.0,
               name: str | None = None) -> keras.Sequential:
    """A linear output: [batch, units]."""
    return _head(units, hidden, dropout, name, "regression")
