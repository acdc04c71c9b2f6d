"""Task heads: small layers mapping the backbone's features to one task's output.

Each builder returns an (unbuilt) `keras.Sequential`; `MultiTaskModel` calls it on the backbone's
output. The last layer computes in float32 so that, under a mixed-precision policy, outputs and
losses stay in float32.

Each head records what it outputs (`kind_of(head)`): "classification" (logits over classes) and
"binary" (one logit per binary label) output logits, "regression" plain values. The checks
before training read it: a loss that takes probabilities on a logits head, a class id outside
[0, num_classes), a binary label other than 0 or 1. It is a plain Python attribute, not part of
the layer's config or checkpoint: a head rebuilt from a saved model has no kind (nothing is
checked against it).
"""

from __future__ import annotations

import numbers
from typing import Sequence

import keras
from mtl.errors import UsageError

#: The head kinds whose outputs are logits (pair them with `from_logits=True` losses).
LOGITS_KINDS = ("classification", "binary")
_KIND_ATTRIBUTE = "mtl_head_kind"


def kind_of(layer) -> str | None:
    """What an `mtl.heads` head outputs ("classification", "binary", "regression"); None for
    any other layer."""
    return getattr(layer, _KIND_ATTRIBUTE, None)


def outputs_logits(layer) -> bool:
    """True for a head built by `classification`, `binary` or `multi_label`."""
    return kind_of(layer) in LOGITS_KINDS


def _head(units: int, hidden: Sequence[int], dropout: float, name: str | None,
          kind: str) -> keras.Sequential:
    if isinstance(units, bool) or not isinstance(units, numbers.Integral) or units < 1:
        raise UsageError(f"{kind} head: the number of outputs must be an int >= 1; got "
                         f"{units!r}.")
    layers = []
    for width in hidden:
        layers.append(keras.layers.Dense(width, activation="relu"))
        if dropout:
            layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(int(units), dtype="float32"))
    head = keras.Sequential(layers, name=name)
    setattr(head, _KIND_ATTRIBUTE, kind)
    return head


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
