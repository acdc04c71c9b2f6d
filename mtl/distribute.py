"""Strategy selection by name: `get_strategy("mirrored")` and friends.

Names: `default` (no distribution), `one_device`, `mirrored` (all local GPUs, `num_gpus` of them,
or `cpu_replicas` logical CPU devices), `multi_worker` (MultiWorkerMirroredStrategy from
`TF_CONFIG`) and `tpu`. Any `tf.distribute.Strategy` object can be passed to the library instead.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf
from mtl.errors import UsageError

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


def configure_cpu_replicas(num: int) -> list[str]:
    """Splits the CPU into `num` logical devices; must run before TensorFlow initialises."""
    if not isinstance(num, int) or num < 1:
        raise UsageError(f"cpu_replicas must be an int >= 1; got {num!r}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == num:
        return [f"/cpu:{i}" for i in range(num)]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num)])
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have == num:
            return [f"/cpu:{i}" for i in range(num)]
        raise RuntimeError(
            f"cpu_replicas={num}: TensorFlow is already initialised with {have} logical CPU "
            "device(s); choose the strategy before any TensorFlow op runs.") from None
    return [f"/cpu:{i}" for i in range(num)]


def parse_tf_config(text: str | None = None) -> dict:
    """Reads and checks `TF_CONFIG` (JSON with `cluster` and `task`), naming any bad field."""
    text = os.environ.get("TF_CONFIG", "") if text is None else text
    if not text:
        raise UsageError("multi_worker needs the TF_CONFIG environment variable, e.g. "
                         '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                         '"task": {"type": "worker", "index": 0}}.')
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"TF_CONFIG is not valid JSON ({e}); got {text!r}.") from None
    if not isinstance(config, dict):
        raise UsageError(f"TF_CONFIG must be a JSON object; got {text!r}.")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise UsageError(f"TF_CONFIG field 'cluster' must be a non-empty object of job name -> "
                         f"list of 'host:port'; got {cluster!r}.")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(
                isinstance(a, str) and ":" in a for a in addresses):
            raise UsageError(f"TF_CONFIG field 'cluster.{job}' must be a list of 'host:port' "
                             f"strings; got {addresses!r}.")
    task = config.get("task")
    if not isinstance(task, dict):
        raise UsageError(f"TF_CONFIG field 'task' must be an object with 'type' and 'index'; "
                         f"got {task!r}.")
    if task.get("type") not in cluster:
        raise UsageError(f"TF_CONFIG field 'task.type' is {task.get('type')!r}; expected one of "
                         f"the cluster's jobs {sorted(cluster)}.")
    index = task.get("index")
    if not isinstance(index, int) or not 0 <= index < len(cluster[task["type"]]):
        raise UsageError(f"TF_CONFIG field 'task.index' is {index!r}; expected an int in "
                         f"[0, {len(cluster[task['type']])}) for job {task['type']!r}.")
    return config


class NoTPUError(UsageError, RuntimeError):
    """`--strategy=tpu` where no TPU answers (the user's to fix)."""


def get_strategy(name: str = "default", *, num_gpus: int | None = None,
                 cpu_replicas: int | None = None, tpu: str | None = None
                 ) -> tf.distribute.Strategy:
    """Builds the strategy called `name` (one of `STRATEGIES`)."""
    if name not in STRATEGIES:
        raise UsageError(f"Unknown strategy {name!r}; expected one of {list(STRATEGIES)}.")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multi_worker":
        parse_tf_config()
        # Must be created before any other TF op runs: collective ops are configured at start.
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            raise NoTPUError(f"strategy 'tpu': no TPU found at {tpu or '(local)'!r} ({e}). Pass "
                               "--tpu=ADDRESS on a TPU VM or host.") from None
        return tf.distribute.TPUStrategy(resolver)
    if cpu_replicas:
        devices = configure_cpu_replicas(cpu_replicas)
    else:
        gpus = tf.config.list_logical_devices("GPU")
        if num_gpus is not None:
            if num_gpus < 1 or num_gpus > len(gpus):
                raise UsageError(f"num_gpus={num_gpus}, but this machine has {len(gpus)} GPU(s).")
            gpus = gpus[:num_gpus]
        devices = [d.name for d in gpus]
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(devices[0] if devices else "/cpu:0")
    if not devices:
        raise UsageError("strategy 'mirrored' found no GPU on this machine; run on a GPU "
                         "machine, or set cpu_replicas=N (--cpu_replicas=N) to mirror over N "
                         "logical CPU devices.")
    # One MirroredStrategy per device set and process: a second one over the same devices
    # reuses collective instance keys, and its all-reduces then clash with the first one's.
    key = tuple(devices)
    if key not in _MIRRORED:
        _MIRRORED[key] = tf.distribute.MirroredStrategy(devices)
    return _MIRRORED[key]


_MIRRORED: dict = {}
