"""Preemption-safe training: orbax checkpoints of the state; saved results.

`TrainCheckpoints` keeps the last few training states of one group of models
(params, optimizer state, data-order state, keys, step) with orbax, which
writes each step to a temporary folder and renames it when complete, so a
killed run leaves either a whole checkpoint or none. Each checkpoint also
records the configuration that produced it (and its fingerprint, a hash) and a
checksum of every leaf: a checkpoint of another configuration is refused, and a
damaged one is reported and skipped for the previous good one — never loaded.

`save_results` / `load_results` keep what training is for — the final
parameters and the statistics of the real (unpadded) models — in one npz, so
attacks can be rerun without training.
"""

import functools
import glob
import hashlib
import importlib.metadata
import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mico_jax import stats as stats_lib

PyTree = Any
Log = Callable[[str], None]


class CheckpointError(Exception):
  """A checkpoint or saved result that must not be used; says why."""


@functools.cache
def code_version() -> str:
  """mico_jax's package version and a hash of its sources.

  Saved state records it: a rerun with other code must not reuse models that
  the old code trained. A hash of the sources, not `git describe`, so that
  uncommitted changes and installs without git count too.
  """
  root = os.path.dirname(os.path.abspath(__file__))
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(root, "**", "*.py"),
                               recursive=True)):
    digest.update(os.path.relpath(path, root).encode() + b"\0")
    with open(path, "rb") as f:
      digest.update(f.read() + b"\0")
  try:
    version = importlib.metadata.version("mico_jax")
  except importlib.metadata.PackageNotFoundError:
    version = "unknown"
  return f"{version} sources {digest.hexdigest()[:12]}"


def _normal(description: Mapping[str, Any]) -> dict[str, Any]:
  # As it reads back from JSON: tuples become lists, the rest strings.
  return json.loads(json.dumps(description, default=str))


def _stamped(description: Mapping[str, Any]) -> dict[str, Any]:
  """The description as saved: normalized, with the code version."""
  return _normal({**description, "code_version": code_version()})


def fingerprint(description: Mapping[str, Any]) -> str:
  """A short hash of a JSON-able description of a configuration."""
  text = json.dumps(_normal(description), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _mismatch(path: str, saved: Mapping[str, Any],
              wanted: Mapping[str, Any]) -> str:
  keys = sorted(k for k in set(saved) | set(wanted)
                if saved.get(k) != wanted.get(k))
  shown = [f"{k} ({saved.get(k)} there, {wanted.get(k)} here)"
           if len(str(saved.get(k))) + len(str(wanted.get(k))) < 60 else k
           for k in keys]
  return (f"{path} was written by a different configuration (differs in: "
          f"{'; '.join(shown)}); delete it or use another --workdir")


@jax.jit
def checksums(tree: PyTree) -> jax.Array:
  """One uint32 per leaf: a position-weighted sum of its bits (wrapping)."""

  def one(a):
    bits = (jax.lax.bitcast_convert_type(a, jnp.uint32)
            if a.dtype.itemsize == 4 else a.astype(jnp.uint32)).reshape(-1)
    # Odd weights make swapped or shifted values change the sum.
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1
    return jnp.sum(bits * weights, dtype=jnp.uint32)

  return jnp.stack([one(a) for a in jax.tree.leaves(tree)])


class TrainCheckpoints:
  """The latest training states of one group of models, in `directory`.

  Args:
    directory: the folder of step subfolders (created if missing).
    description: JSON-able configuration; a checkpoint must match it exactly
      (and the code version).
    keep: how many checkpoints to keep; older good ones are the fallback
      when the latest is damaged.
  """

  def __init__(self, directory: str, description: Mapping[str, Any],
               keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.description = _stamped(description)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, cleanup_tmp_directories=True))

  def save(self, state: PyTree, step: int) -> None:
    """Saves `state` as `step` (asynchronously; finished by the next call)."""
    self._manager.wait_until_finished()
    meta = {"fingerprint": fingerprint(self.description),
            "description": self.description,
            "checksums": np.asarray(checksums(state)).tolist()}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def _restore_step(self, step: int, abstract_state: PyTree) -> PyTree:
    path = os.path.join(self.directory, str(step))
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # pylint: disable=broad-except
      raise _Damaged(f"{path}: unreadable metadata ({type(e).__name__})") from e
    if meta.get("fingerprint") != fingerprint(self.description):
      raise CheckpointError(_mismatch(path, meta.get("description", {}),
                                      self.description))
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state))).state
    except Exception as e:  # pylint: disable=broad-except
      # TensorStore's messages end in a long dump; its first sentence says it.
      detail = str(e).split(". See full")[0].splitlines()[0][:200] if str(
          e) else ""
      raise _Damaged(f"{path}: unreadable state ({type(e).__name__}:"
                     f" {detail})") from e
    if np.asarray(checksums(state)).tolist() != meta.get("checksums"):
      raise _Damaged(f"{path}: state does not match its checksums")
    return state

  def restore(self, abstract_state: PyTree, log: Log | None = print
              ) -> PyTree | None:
    """The latest good checkpoint, or None if there is none.

    Args:
      abstract_state: `jax.ShapeDtypeStruct`s (with shardings) of the state.
      log: where to say which checkpoint was skipped and why.

    Raises:
      CheckpointError: the latest checkpoint has another configuration, or
        checkpoints exist but none is readable.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    problems = []
    for step in steps:
      try:
        return self._restore_step(step, abstract_state)
      except _Damaged as e:
        problems.append(str(e))
        if log:
          log(f"checkpoint damaged, not loaded: {e}")
    if problems:
      raise CheckpointError(
          f"no usable checkpoint in {self.directory}: {'; '.join(problems)};"
          " delete it to start over")
    return None

  def close(self) -> None:
    """Waits for the last save to be written."""
    self._manager.wait_until_finished()
    self._manager.close()


class _Damaged(Exception):
  """A checkpoint that cannot be trusted; the caller may try an older one."""


def save_results(path: str, description: Mapping[str, Any], params: PyTree,
                 observed: stats_lib.Stats) -> None:
  """Writes host params and statistics to `path` (npz) atomically.

  The npz records `description` and the code version; `load_results` wants
  both to match.
  """
  description = _stamped(description)
  arrays = {f"param_{i}": leaf
            for i, leaf in enumerate(jax.tree.leaves(params))}
  arrays.update(observed._asdict())
  arrays["fingerprint"] = np.array(fingerprint(description))
  arrays["description"] = np.array(json.dumps(description))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def load_results(path: str, description: Mapping[str, Any], params_like: PyTree
                 ) -> tuple[PyTree, stats_lib.Stats] | None:
  """Reads what `save_results` wrote, or None if `path` does not exist.

  Args:
    path: the npz file.
    description: the configuration the results must come from (with this
      code version).
    params_like: a tree with the params' structure (e.g. abstract params).

  Raises:
    CheckpointError: the file is damaged or from another configuration.
  """
  if not os.path.exists(path):
    return None
  description = _stamped(description)
  try:
    with np.load(path) as f:
      arrays = {name: f[name] for name in f.files}
    saved = json.loads(str(arrays["description"]))
    treedef = jax.tree.structure(params_like)
    leaves = [arrays[f"param_{i}"] for i in range(treedef.num_leaves)]
    observed = stats_lib.Stats(*(arrays[k] for k in stats_lib.Stats._fields))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e});"
                          " delete it to recompute") from e
  if str(arrays["fingerprint"]) != fingerprint(description):
    raise CheckpointError(_mismatch(path, saved, description))
  return jax.tree.unflatten(treedef, leaves), observed
