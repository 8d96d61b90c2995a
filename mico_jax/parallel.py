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


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts `jax.distributed` if a coordinator is given; call before JAX use.

  Missing arguments fall back to the environment variables
  `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.

  Returns:
    Whether a multi-process run was started.
  """
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


def make_mesh() -> Mesh:
  """A mesh with one axis, `"models"`, over every device of every process."""
  return jax.make_mesh((jax.device_count(),), (MODELS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


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
  line = (f"mesh: {size} {jax.devices()[0].platform} devices in {processes}"
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
