"""Many devices, many hosts: the models axis K sharded over a device mesh.

Every leaf of a stacked model pytree has a leading axis K, and models never
talk to one another, so the K axis is split over a mesh axis `"models"` and
each device trains and queries its own slice of models with no communication.
The pool data (`x_N`, `y_N`) is replicated. K must be a multiple of the
number of devices: callers pad it (`padded_size`) with copies of a real model
and drop the copies afterwards.

Multi-host runs start `jax.distributed` (`initialize`) before any other JAX
use; each process then builds global arrays from the host data it shares with
the others, feeding only its own devices (`put_models`, `put_replicated`), and
gathers results back with `to_host`. A data-parallel axis would be a second
mesh axis that splits each model's batch; nothing here needs one yet.
"""

import math
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
MODELS = "models"


class ParallelError(ValueError):
  """Devices or processes that cannot work as asked; the message says why."""


def default_cpu_devices() -> int | None:
  """CPU devices to expose when the user names no count: one a core, or None
  (JAX's choice) where `XLA_FLAGS` already names one.

  XLA:CPU runs the programs of different devices side by side, and that
  fills the cores where one program's own threads leave them idle: on 2
  cores the Purchase MLP trains ~1.5x faster a model at K = 64 over 2
  devices than on one, DP or not, and the CNN ~1.1x at K = 8
  (benchmarks/RESULTS.md).
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS",
                                                               ""):
    return None
  return len(os.sched_getaffinity(0))


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               cpu_devices: int | None = None) -> bool:
  """Sets up this process's devices; call before any other JAX use.

  Exposes `cpu_devices` CPU devices (None: `default_cpu_devices()`, or the
  devices JAX already has if it already runs) and starts `jax.distributed`
  if a coordinator is given. Missing coordinator arguments fall back to the
  environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`.

  Returns:
    Whether a multi-process run was started.
  """
  count = default_cpu_devices() if cpu_devices is None else cpu_devices
  if count is not None:
    if count < 1:
      raise ParallelError(f"the CPU device count must be at least 1, not"
                          f" {count}")
    try:
      jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as e:  # JAX already runs: its devices are fixed
      if cpu_devices is not None and len(jax.devices("cpu")) != cpu_devices:
        raise ParallelError(f"{cpu_devices} CPU devices were asked for after"
                            " JAX started with"
                            f" {len(jax.devices('cpu'))}") from e
  env = os.environ.get
  coordinator_address = coordinator_address or env("JAX_COORDINATOR_ADDRESS")
  if not coordinator_address:
    return False
  if num_processes is None and env("JAX_NUM_PROCESSES"):
    num_processes = int(env("JAX_NUM_PROCESSES"))
  if process_id is None and env("JAX_PROCESS_ID"):
    process_id = int(env("JAX_PROCESS_ID"))
  if num_processes is None or process_id is None:
    raise ParallelError("a coordinator address needs the number of processes"
                        " and this process's id (--num_processes,"
                        " --process_id)")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def is_main_process() -> bool:
  """Whether this process writes outputs (process 0)."""
  return jax.process_index() == 0


def make_mesh(num_models: int | None = None) -> Mesh:
  """A mesh with one axis, `"models"`, over every device of every process.

  Given `num_models`, one process's CPU devices are the exception: the mesh
  takes the most of them that divide K, so that no model is padded. They
  are threads sharing one machine's cores, so fewer of them cost little,
  where each padding copy costs a model's compute.
  """
  devices = jax.devices()
  if (num_models and jax.process_count() == 1
      and devices[0].platform == "cpu"):
    count = max(d for d in range(1, len(devices) + 1) if num_models % d == 0)
    devices = devices[:count]
  return jax.make_mesh((len(devices),), (MODELS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def padded_size(num_models: int, mesh: Mesh) -> int:
  """The smallest multiple of the models-axis size that holds `num_models`."""
  size = mesh.shape[MODELS]
  return math.ceil(num_models / size) * size


def pad_indices(num_models: int, mesh: Mesh) -> np.ndarray:
  """Rows that pad K models to `padded_size`: all, then the last repeated.

  A copy of a model trains exactly as the model does (its randomness comes
  from its own seeds), so the copies cost compute but change nothing.
  """
  padded = padded_size(num_models, mesh)
  return np.minimum(np.arange(padded), num_models - 1)


def describe(mesh: Mesh, num_models: int) -> str:
  """One log line: the mesh, the padding and the models per device."""
  padded = padded_size(num_models, mesh)
  size = mesh.shape[MODELS]
  processes = jax.process_count()
  of = f" of {jax.device_count()}" if size < jax.device_count() else ""
  line = (f"mesh: {size}{of} {jax.devices()[0].platform} devices in"
          f" {processes}"
          f" process{'es' if processes > 1 else ''} on axis '{MODELS}';"
          f" {padded // size} models per device")
  if padded > num_models:
    line += (f"; {num_models} models padded to {padded} with"
             f" {padded - num_models} copies of the last (dropped after"
             " training)")
  return line


def model_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the models axis, the rest whole."""
  return NamedSharding(mesh, P(MODELS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  # Each process hands over only the slices its own devices hold.
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding,
                                      lambda index: array[index])


def put_models(tree: PyTree, mesh: Mesh) -> PyTree:
  """Host arrays `[K, ...]`, the same on every process, sharded over models."""
  return jax.tree.map(lambda a: _put(a, model_sharding(mesh)), tree)


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
  """Host arrays, the same on every process, copied to every device."""
  return jax.tree.map(lambda a: _put(a, replicated(mesh)), tree)


def state_shardings(abstract_state: PyTree, mesh: Mesh) -> PyTree:
  """Shardings for a stacked state: K-leading leaves split, scalars whole."""
  return jax.tree.map(
      lambda a: model_sharding(mesh) if a.ndim else replicated(mesh),
      abstract_state)


def to_host(tree: PyTree) -> PyTree:
  """Global arrays as numpy arrays on every process (gathered from all)."""
  return jax.tree.map(
      lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)),
      tree)
