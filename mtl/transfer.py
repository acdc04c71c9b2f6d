"""Start a backbone from trained weights: another mtl run's checkpoint, or a Keras weights file.

    init_backbone(model.backbone, "runs/multi_digits")            # a run folder
    init_backbone(model.backbone, "runs/x/checkpoints/ckpt-3000")  # one checkpoint
    init_backbone(model.backbone, "mobilenet_v2.weights.h5")       # a Keras weights/model file

Only the backbone's variables are written (trainable ones and non-trainable ones such as
BatchNorm moving statistics); heads keep their fresh initialisation. Everything is checked before
anything is assigned: a backbone that does not fit the source raises an error naming the first
variable that differs, and leaves the backbone as it was.

How a run's checkpoint is read: `Trainer` saves `tf.train.Checkpoint(model=..., optimizer=...)`,
an object graph in which the MultiTaskModel sits at `model` and its backbone at
`model/_operations/<i>` (a nested Functional model). `restore_backbone` finds, in the saved object
graph, the node whose variables have the backbone's structure, checks every shape, then restores
through a stand-in object that has the backbone at that same path:
`tf.train.Checkpoint(model=<_operations: [placeholder, ..., backbone]>)`. Object-based restore
matches by path, so nothing outside the backbone is read.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import warnings

import keras
import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import trackable_object_graph_pb2
from mtl.errors import UsageError, UsageTypeError
from mtl.model import seed_states

WEIGHTS_FILE_SUFFIXES = (".weights.h5", ".keras", ".h5", ".hdf5")

# How deep below `model` a backbone is searched for in a checkpoint's object graph (a
# MultiTaskModel's backbone is at depth 2: model/_operations/<i>).
_MAX_SEARCH_DEPTH = 8


class SourceNotFoundError(FileNotFoundError, UsageError):
    """The source to load from does not exist. Also a UsageError: to an experiment script it is a
    bad flag value (`--init_backbone_from`), reported as such (exit status 2, no traceback)."""


# ------------------------------------------------------------------------------------ dispatch
def init_backbone(backbone: keras.Model, source: str) -> str:
    """Loads `backbone`'s weights from `source`; returns the checkpoint or file that was read.

    `source` is one of: a run folder (its latest checkpoint in `checkpoints/`), a checkpoints
    folder, a checkpoint prefix (`.../ckpt-3000`), or a Keras file (`.weights.h5`, `.keras`,
    `.h5`). Raises SourceNotFoundError (a FileNotFoundError) when `source` is none of these.
    """
    source = os.fspath(source)
    if _is_weights_file(source):
        if not tf.io.gfile.exists(source):
            raise SourceNotFoundError(f"init_backbone: weights file {source!r} does not exist.")
        load_backbone_weights(backbone, source)
        return source
    if tf.io.gfile.isdir(source) or tf.io.gfile.exists(source + ".index"):
        return restore_backbone(backbone, source)
    raise SourceNotFoundError(
        f"init_backbone: {source!r} does not exist. Expected an mtl run folder, a checkpoints "
        f"folder, a checkpoint prefix (with a .index file beside it) or a Keras weights file "
        f"({', '.join(WEIGHTS_FILE_SUFFIXES)}).")


def _is_weights_file(path: str) -> bool:
    return path.lower().endswith(WEIGHTS_FILE_SUFFIXES)


def resolve_checkpoint(source: str) -> str:
    """The checkpoint prefix that `source` (run folder, checkpoints folder or prefix) names."""
    source = os.fspath(source)
    if tf.io.gfile.isdir(source):
        for directory in (os.path.join(source, "checkpoints"), source):
            if tf.io.gfile.isdir(directory):
                latest = tf.train.latest_checkpoint(directory)
                if latest:
                    return latest
        raise SourceNotFoundError(
            f"No checkpoint in {source!r}: expected an mtl run folder (with checkpoints/ inside) "
            "or a folder holding a `checkpoint` file.")
    if tf.io.gfile.exists(source + ".index"):
        return source
    raise SourceNotFoundError(
        f"Checkpoint {source!r} does not exist: expected a run folder, a checkpoints folder or a "
        "checkpoint prefix such as runs/x/checkpoints/ckpt-1000.")


# ----------------------------------------------------------------------- from a checkpoint
@dataclasses.dataclass(frozen=True)
class _Pair:
    """One backbone variable and what the checkpoint holds at the same object path."""

    variable: object
    object_path: str          # e.g. model/_operations/1/_operations/1/_kernel
    key: str | None           # the checkpoint key of its value; None when missing there
    saved_shape: tuple | None


class _SavedGraph:
    """A checkpoint's object graph with its tensor shapes."""

    def __init__(self, path: str):
        reader = tf.train.load_checkpoint(path)
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
        self.nodes = graph.nodes
        self.shapes = reader.get_variable_to_shape_map()

    def children(self, node_id: int) -> dict:
        return {c.local_name: c.node_id for c in self.nodes[node_id].children}

    def variable_key(self, node_id: int) -> str | None:
        for attribute in self.nodes[node_id].attributes:
            if attribute.name == "VARIABLE_VALUE":
                return attribute.checkpoint_key
        return None


def _is_variable(obj) -> bool:
    return isinstance(obj, (tf.Variable, keras.Variable))


def _live_children(obj) -> dict:
    return dict(tf.train.TrackableView.children(obj))


def _pair_variables(live, graph: _SavedGraph, node_id: int | None, path: str, seen: set,
                    out: list) -> None:
    """Walks the live object and the saved node side by side, collecting one `_Pair` per
    variable reachable from `live` (the same traversal `tf.train.Checkpoint` restores by)."""
    if id(live) in seen:
        return
    seen.add(id(live))
    if _is_variable(live):
        key = graph.variable_key(node_id) if node_id is not None else None
        shape = tuple(graph.shapes[key]) if key in graph.shapes else None
        out.append(_Pair(live, path, key, shape))
        return
    saved = graph.children(node_id) if node_id is not None else {}
    for name, child in _live_children(live).items():
        _pair_variables(child, graph, saved.get(name), f"{path}/{name}", seen, out)


def _candidate_paths(graph: _SavedGraph):
    """(path, node id) of every non-variable node under `model` (or the root), shallow first."""
    root_children = graph.children(0)
    start = [("model",), root_children["model"]] if "model" in root_children else [(), 0]
    queue = collections.deque([tuple(start)])
    visited = set()
    while queue:
        path, node_id = queue.popleft()
        if node_id in visited or graph.variable_key(node_id) is not None:
            continue
        visited.add(node_id)
        yield path, node_id
        if len(path) < _MAX_SEARCH_DEPTH:
            for name, child in graph.children(node_id).items():
                queue.append((path + (name,), child))


def _weights_in_order(backbone: keras.Model, pairs: list) -> list:
    """`pairs` in the order of `backbone.weights` (the order users know)."""
    order = {id(v): i for i, v in enumerate(backbone.weights)}
    return sorted(pairs, key=lambda p: order.get(id(p.variable), len(order)))


def _variable_name(variable) -> str:
    return getattr(variable, "path", None) or variable.name


def _locate_backbone(backbone: keras.Model, graph: _SavedGraph, checkpoint: str):
    """The saved path whose variables fit `backbone`, and the variable pairs; raises otherwise."""
    best, best_rank = None, None
    for path, node_id in _candidate_paths(graph):
        pairs = []
        _pair_variables(backbone, graph, node_id, "/".join(path), set(), pairs)
        if not pairs:
            continue
        all_found = all(p.key is not None for p in pairs)
        fitting = sum(p.saved_shape == tuple(p.variable.shape) for p in pairs)
        if all_found and fitting == len(pairs):
            return path, pairs
        rank = (all_found, fitting)  # The closest candidate, for the error message.
        if best_rank is None or rank > best_rank:
            best, best_rank = (path if all_found else None, pairs), rank
    name = backbone.name
    if best is None:
        raise UsageError(
            f"Cannot restore backbone {name!r} from {checkpoint}: the checkpoint holds no "
            "variables at all where a model would be. Nothing was restored.")
    path, pairs = best
    pairs = _weights_in_order(backbone, pairs)
    if path is not None:  # Every variable is there, some with another shape.
        first = next(p for p in pairs if p.saved_shape != tuple(p.variable.shape))
        raise UsageError(
            f"Cannot restore backbone {name!r} from {checkpoint}: variable "
            f"{_variable_name(first.variable)} has shape {tuple(first.variable.shape)} here but "
            f"{first.saved_shape} in the checkpoint (at {first.object_path}). Nothing was "
            "restored; build the backbone with the source run's configuration.")
    first = next(p for p in pairs if p.key is None or p.saved_shape != tuple(p.variable.shape))
    raise UsageError(
        f"Cannot restore backbone {name!r} from {checkpoint}: no part of the saved model has the "
        f"backbone's structure (closest match: variable {_variable_name(first.variable)} of shape "
        f"{tuple(first.variable.shape)} has "
        + ("no counterpart" if first.key is None else f"shape {first.saved_shape}")
        + f" at {first.object_path}). Nothing was restored.")


def _stand_in(path: tuple, leaf) -> dict:
    """Objects that hold `leaf` at `path`: `("model", "_operations", "1")` ->
    `{"model": Module(_operations=[Module(), leaf])}` (the root's keyword arguments)."""
    obj = leaf
    for index in range(len(path) - 1, 0, -1):
        name = path[index]
        if name.isdigit():  # An element of a list attribute (the next name up).
            items = [tf.Module() for _ in range(int(name) + 1)]
            items[int(name)] = obj
            obj = items
        else:
            module = tf.Module()
            setattr(module, name, obj)
            obj = module
    if isinstance(obj, list):
        raise UsageError(f"Unexpected checkpoint layout: a list at {path[0]!r}.")
    return {path[0]: obj}


def restore_backbone(backbone: keras.Model, source: str) -> str:
    """Restores only `backbone`'s variables from an mtl run's checkpoint; returns its path.

    `source`: a run folder, its checkpoints folder or a checkpoint prefix. The backbone must have
    the architecture of the source run's backbone (its layers may be named differently: the
    checkpoint is matched by structure). Heads, optimizer state and everything else in the
    checkpoint are left alone. Raises ValueError, before anything is assigned, naming the first
    variable whose shape differs.
    """
    if not isinstance(backbone, keras.Model):
        raise UsageTypeError(f"restore_backbone: backbone must be a keras.Model; got "
                        f"{type(backbone).__name__}.")
    if not backbone.weights:
        raise UsageError(f"restore_backbone: backbone {backbone.name!r} has no variables; build "
                         "it (call it on an input) first.")
    checkpoint = resolve_checkpoint(source)
    graph = _SavedGraph(checkpoint)
    path, pairs = _locate_backbone(backbone, graph, checkpoint)
    if not path:  # The checkpoint's root is the backbone itself.
        status = tf.train.Checkpoint(root=backbone).restore(checkpoint)
    else:
        status = tf.train.Checkpoint(**_stand_in(path, backbone)).restore(checkpoint)
    status.expect_partial().assert_existing_objects_matched()
    logging.info("Restored %d variables of backbone %r from %s (%s).", len(pairs),
                 backbone.name, checkpoint, "/".join(path) or "root")
    return checkpoint


def restorable_variables(backbone: keras.Model) -> list:
    """The backbone's variables that checkpoints hold: all but RNG seed states (Dropout's
    `SeedGenerator`), which `tf.train.Checkpoint(model=...)` does not save."""
    seeds = {id(state) for state in seed_states(backbone)}
    return [v for v in backbone.weights if id(v) not in seeds]


# ------------------------------------------------------------------- from a Keras weights file
def load_backbone_weights(backbone: keras.Model, path: str) -> str:
    """Loads `backbone`'s weights from a local Keras file; returns `path`.

    `path`: a `.weights.h5` file (`model.save_weights`), a `.keras` archive or a legacy `.h5`
    file (`model.save`), written from a model with the backbone's architecture. When the backbone
    wraps one inner model that holds all its weights (as `mtl.backbones.mobilenet_v2` wraps
    `keras.applications.MobileNetV2`), a file saved from that inner model fits too. Nothing is
    downloaded. On a mismatch the backbone is left as it was and ValueError says why.
    """
    path = os.fspath(path)
    if not tf.io.gfile.exists(path):
        raise SourceNotFoundError(f"load_backbone_weights: {path!r} does not exist.")
    if not _is_weights_file(path):
        raise UsageError(f"load_backbone_weights: {path!r} is not a Keras weights or model file; "
                         f"expected one of {list(WEIGHTS_FILE_SUFFIXES)}.")
    before = [v.numpy() for v in backbone.weights]
    errors = []
    for target in _weight_targets(backbone):
        try:
            with warnings.catch_warnings():
                # Keras 3.15 warns once per container of a Functional model's layers that older
                # files do not have; the variables themselves are still matched and checked.
                warnings.filterwarnings("ignore", message="Skipping nested container")
                target.load_weights(path)
        except (ValueError, KeyError, TypeError, OSError) as e:
            # Keras may have assigned some variables before failing: put them back.
            for variable, value in zip(backbone.weights, before):
                variable.assign(value)
            errors.append(f"into {target.name!r}: {_keras_load_error(e)}")
            continue
        logging.info("Loaded weights of backbone %r from %s.", backbone.name, path)
        return path
    raise UsageError(
        f"Cannot load {path} into backbone {backbone.name!r}: " + "; ".join(errors)
        + ". The backbone was left unchanged; the file must come from a model with the "
        "backbone's architecture.")


def _weight_targets(backbone: keras.Model) -> list:
    """The backbone, then its only weighted inner model when it merely wraps one."""
    targets = [backbone]
    weighted = [layer for layer in backbone.layers if layer.weights]
    if (len(weighted) == 1 and isinstance(weighted[0], keras.Model)
            and len(weighted[0].weights) == len(backbone.weights)):
        targets.append(weighted[0])
    return targets


_SHAPE_ERROR = re.compile(r"variable\.shape=(\(.*?\)), Received: value\.shape=(\(.*?\))\. "
                          r"Target variable: <Variable path=([^,]+),")


def _keras_load_error(error: Exception) -> str:
    """The useful sentence of a Keras `load_weights` error (which can quote whole tensors)."""
    text = str(error)
    shape = _SHAPE_ERROR.search(text)
    if shape:
        here, there, name = shape.groups()
        return f"variable {name} has shape {here} here but {there} in the file"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:  # Skip Keras's "A total of N objects could not be loaded..." preamble.
        if not line.startswith(("A total of", "List of objects", "[<")):
            return line[:300]
    return (lines[0] if lines else type(error).__name__)[:300]
