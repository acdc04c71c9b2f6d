"""The step's plan: the one reader of what the weighting method consumes (`method.consumes`:
`mtl.weighting.LOSSES`, `JACOBIAN` or `GRAMIAN`) and of the settings that depend on it.

  * `check`: refuses, before anything is built, a gradient mode or Jacobian setting that the
    method (or the model) does not take, naming why;
  * `method_template`, `group_key`, `group_methods`: the granularity rule ("layer",
    "variable": one method instance per group of shared variables, each with its own state);
  * `shared_variables`, `scope_variables`: which variables the method combines the task
    gradients of (every shared one, or a `jacobian_scope`'s);
  * `gradient_source`: the one place where the family decides how gradients are computed.

Every function takes what it reads as arguments (the method, the `TrainerOptions`, the model,
the tasks); none keeps state.
"""

from __future__ import annotations

import copy
import functools

import tensorflow as tf
from absl import logging

from mtl import weighting as weighting_lib
from mtl.errors import UsageError
from mtl.step.decisions import LossDecision, PlainSum, RepDecision, RepMaskDecision, ScopeDecision
from mtl.step.exact import JacobianRows
from mtl.step.parts import Forward
from mtl.step.source import Source
from mtl.step.weighted import WeightedGradients


def _gradient_based(method) -> bool:
    """True for a method that combines per-task gradients (a Jacobian, or its Gramian)."""
    return method.consumes in (weighting_lib.JACOBIAN, weighting_lib.GRAMIAN)


def _gramian_based(method) -> bool:
    """True for a method whose weights come from the Gramian of the task gradients alone."""
    return method.consumes == weighting_lib.GRAMIAN


# ---------------------------------------------------------------------------------- checks
def check(method, options, model) -> None:
    """Refuses a gradient mode or Jacobian setting the method or the model does not take."""
    _check_gradient_mode(method, options.gradient_mode, model)
    _check_jacobian_options(method, options)


def _check_gradient_mode(method, mode: str, model) -> None:
    if not _gradient_based(method):
        if mode != "exact":
            raise UsageError(f"gradient_mode={mode!r} applies to gradient-based weighting "
                             f"methods; {method.name!r} is loss-based.")
        return
    if mode != "rep":
        return
    if not method.supports_rep:
        offered = sorted(n for n, c in weighting_lib.METHODS.items()
                         if getattr(c, "supports_rep", False))
        raise UsageError(f"gradient_mode='rep' is not defined for weighting {method.name!r}: "
                         f"{method.no_rep_reason}. Use gradient_mode='exact', or a method whose "
                         f"paper defines rep mode ({', '.join(offered)}).")
    architecture = getattr(model, "architecture", None)
    if architecture is not None:
        raise UsageError(f"gradient_mode='rep' is not defined for the {architecture.name!r} "
                         f"architecture: {architecture.no_rep_reason}. Use gradient_mode='exact' "
                         "(the methods combine the task gradients of every variable more than "
                         "one task uses), or the 'hps' architecture.")
    if getattr(model, "backbone", None) is None:
        raise UsageError("gradient_mode='rep' needs a MultiTaskModel built from a backbone and "
                         "heads (the shared representation is the backbone's output).")


def _check_jacobian_options(method, options) -> None:
    """jacobian_chunk_size and jacobian_dtype shape the per-task gradients of shared variables:
    set with a method or a mode that computes none, they would be ignored. Refused, naming why."""
    given = []
    if options.jacobian_chunk_size is not None:
        given.append(f"jacobian_chunk_size={options.jacobian_chunk_size}")
    if options.jacobian_dtype != "float32":
        given.append(f"jacobian_dtype={options.jacobian_dtype!r}")
    if not given:
        return
    if not _gradient_based(method):
        raise UsageError(f"{' and '.join(given)} shape the per-task gradients of gradient-based "
                         f"weighting methods; {method.name!r} is loss-based and computes none. "
                         "Leave them unset, or use a gradient-based method.")
    if options.gradient_mode == "rep":
        raise UsageError(f"{' and '.join(given)} shape the per-task gradients of the shared "
                         "variables (exact mode, or a jacobian_scope); gradient_mode='rep' "
                         "computes them of the shared representation instead, one batched "
                         "Jacobian [T, batch, features] in the features' dtype. Leave them "
                         "unset, or use gradient_mode='exact'.")


# ----------------------------------------------------------------------------- granularity
def method_template(method, options):
    """An unbuilt copy of `method` that the per-group methods start from, with the same options
    (granularity "layer" or "variable" and a gradient-based method; None otherwise). Take it
    before `method` is built."""
    if options.granularity != "all" and _gradient_based(method):
        return copy.deepcopy(method)
    return None


def group_key(variable, granularity: str) -> str:
    """The group of a shared variable under `granularity` (its layer, or itself)."""
    if granularity == "variable":
        return variable.path
    return variable.path.rsplit("/", 1)[0]


def group_methods(method, template, options, model, tasks) -> dict:
    """One method instance per group of shared variables (granularity "layer" or "variable"),
    each a copy of `template` (`method_template`) built like `method`; empty for "all"."""
    if options.granularity == "all":
        return {}
    if not _gradient_based(method):
        raise UsageError(f"granularity={options.granularity!r} applies to gradient-based "
                         f"weighting methods; {method.name!r} is loss-based.")
    keys = dict.fromkeys(group_key(v, options.granularity) for v in shared_variables(
        model, [t.name for t in tasks], trainable_only=False))
    methods = {}
    for key in keys:
        group_method = copy.deepcopy(template)
        group_method.build([t.name for t in tasks], [t.weight for t in tasks])
        methods[key] = group_method
    return methods


# ------------------------------------------------------------------------------- variables
def shared_variables(model, task_names, *, trainable_only: bool = True) -> list:
    """Variables that more than one task's output depends on (by layer use): the trainable
    ones, or (`trainable_only=False`) all of them, frozen ones included."""
    users: dict[int, int] = {}
    task_model = getattr(model, "task_model", None)
    if task_model is None:
        return []
    for name in task_names:
        task = task_model(name)
        for v in (task.trainable_variables if trainable_only else task.weights):
            users[id(v)] = users.get(id(v), 0) + 1
    pool = model.trainable_variables if trainable_only else model.weights
    return [v for v in pool if users.get(id(v), 0) > 1]


def scope_variables(method, options, shared: list) -> list | None:
    """The shared variables of `options.jacobian_scope` (None: no scope): of the last N
    shared layers ("top:N", in the model's variable order), or of the layers named (a
    layer's path, or its last part: "conv_1" names every layer called conv_1)."""
    scope = options.jacobian_scope
    if scope is None:
        return None
    if not _gramian_based(method):
        gramian_methods = sorted(n for n, c in weighting_lib.METHODS.items()
                                 if c.consumes == weighting_lib.GRAMIAN)
        raise UsageError(
            f"jacobian_scope applies to methods whose weights come from the Gramian of the "
            f"task gradients; {method.name!r} is not one. Use one of "
            f"{gramian_methods}, or leave jacobian_scope unset.")
    layers = list(dict.fromkeys(v.path.rsplit("/", 1)[0] for v in shared))
    if scope[0] == "top":
        chosen = set(layers[-scope[1]:])
    else:
        chosen = set()
        for name in scope[1]:
            found = [k for k in layers if k == name or k.endswith("/" + name)]
            if not found:
                raise UsageError(f"jacobian_scope names layer {name!r}, which has no "
                                 f"variable shared by several tasks; the shared layers are "
                                 f"{layers}.")
            chosen.update(found)
    return [v for v in shared if v.path.rsplit("/", 1)[0] in chosen]


# ---------------------------------------------------------------------------- the source
def gradient_source(*, method, options, model, tasks, strategy, model_variables,
                    shared_variables, scope_variables=None,
                    group_methods: dict | None = None) -> Source:
    """The one place where the weighting family decides how gradients are computed: loss-based
    methods, and gradient methods with nothing to combine, a `jacobian_scope` or in rep mode,
    get `WeightedGradients`; gradient methods in exact mode `JacobianRows`."""
    tasks = tuple(tasks)
    task_weights = tf.constant([t.weight for t in tasks], tf.float32)
    common = dict(tasks=tasks, method=method, strategy=strategy,
                  model_variables=model_variables, micro_batches=options.grad_accum_steps,
                  chunk_size=options.jacobian_chunk_size, jacobian_dtype=options.jacobian_dtype,
                  jit_compile=options.jit_compile)

    def forward(need_features: bool) -> Forward:
        return Forward(model, tasks, need_features=need_features)

    if not _gradient_based(method):
        return WeightedGradients(LossDecision(method), forward=forward(False),
                                 shared_variables=(), **common)
    if not shared_variables:
        logging.info("Weighting %r has nothing to combine: no trainable variable is shared "
                     "between tasks; every variable trains on its task's plain gradient.",
                     method.name)
        return WeightedGradients(PlainSum(task_weights), forward=forward(False),
                                 shared_variables=(), **common)
    if scope_variables:
        return WeightedGradients(ScopeDecision(method, task_weights), forward=forward(False),
                                 shared_variables=shared_variables,
                                 scope_variables=scope_variables, **common)
    if options.gradient_mode == "rep":
        decision = (RepMaskDecision if method.rep_form == "masks" else RepDecision)(
            method, task_weights)
        return WeightedGradients(decision, forward=forward(True),
                                 shared_variables=shared_variables, **common)
    return JacobianRows(forward=forward(False), shared_variables=shared_variables,
                        group_methods=group_methods,
                        group_of=functools.partial(group_key, granularity=options.granularity),
                        jacobian_to_float32=not _gramian_based(method), **common)
