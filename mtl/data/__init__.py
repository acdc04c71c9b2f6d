"""Datasets and input pipelines. Importing this registers `multi_digits` with TFDS.

One module per dataset (`multi_digits`, `cifar100`, `celeb_a`, `smallnorb`, `shapes3d`), each
with `TASKS`, `TASK_SPECS`, `tasks()`, `heads()`, `examples()` and `load()`; shared parts in
`pipeline` and `task_specs`; `mix` (in `mixing`) mixes per-task datasets into one stream.
"""

from mtl.data import (celeb_a, cifar100, mixing, multi_digits, pipeline, shapes3d, smallnorb,
                      task_specs)
from mtl.data.mixing import mix
from mtl.data.pipeline import DatasetUnavailableError
from mtl.data.task_specs import TaskSpec

__all__ = ["DatasetUnavailableError", "TaskSpec", "celeb_a", "cifar100", "mix", "mixing",
           "multi_digits", "pipeline", "shapes3d", "smallnorb", "task_specs"]
