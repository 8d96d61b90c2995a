"""One workdir, one run: a lock, a manifest, and outputs that appear together.

A run's folder holds what it trains (checkpoints, trained models), which a
rerun of the same configuration resumes or reuses, and what it reports (scores,
plots, MICO's bundle), which each run writes anew. `Workdir` keeps the two
honest:

* a lock (`.lock`, an fcntl lock the kernel drops when the process ends, with
  the holder's pid and host for the message) lets one run at a time use the
  folder; a lock file left by a killed run is stale and taken over;
* a manifest (`manifest.json`) records what decides the trained models and
  the code version that trained them: a run of another configuration or code
  is refused before anything in the folder changes;
* outputs are written under a staging folder (`.partial/`) and published by
  renames at the end, right after the previous run's outputs are removed, so
  old and new results never sit side by side, and a run that stops early
  leaves the previous run's results (of the same configuration) as they were.
"""

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Mapping

LOCK = ".lock"
MANIFEST = "manifest.json"
STAGING = ".partial"
LOG = "run.log"
# Files a run keeps beside the manifest that say nothing about results.
_BOOKKEEPING = (LOCK, MANIFEST, STAGING, LOG)


class WorkdirError(Exception):
  """The folder cannot hold this run; the message says why and what to do."""


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path} is unreadable ({e}); delete the folder or use"
                       " another --workdir") from e


def write_json(obj: Any, path: str) -> None:
  """Writes `obj` as JSON to `path` atomically (a temporary file, renamed)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
  keys = sorted(k for k in set(saved) | set(wanted)
                if saved.get(k) != wanted.get(k))
  return "; ".join(f"{k} ({saved.get(k)} there, {wanted.get(k)} here)"
                   for k in keys)


class Workdir:
  """The folder of one run; use as a context manager around the run.

  Entering takes the lock, checks the manifest (writing it for a new folder),
  checks that every folder inside is writable and removes any staging folder
  left by a run that stopped; leaving releases the lock.

  Args:
    path: the folder (created if missing).
    identity: JSON-able description of what decides the trained models; a
      folder holding another identity or another code version is refused.
    code_version: the version of the code that runs.
    must_exist: refuse a folder without an earlier run (e.g. to only rerun
      attacks on its models).
  """

  def __init__(self, path: str, identity: Mapping[str, Any],
               code_version: str, must_exist: bool = False):
    self.path = os.path.abspath(path)
    self.identity = json.loads(json.dumps(identity))
    self.code_version = code_version
    self.must_exist = must_exist
    self.staging = os.path.join(self.path, STAGING)
    self.notes: list[str] = []  # what entering found worth saying
    self._outputs: list[str] = []
    self._lock_fd: int | None = None

  def __enter__(self) -> "Workdir":
    try:
      os.makedirs(self.path, exist_ok=True)
    except OSError as e:
      raise WorkdirError(
          f"--workdir {self.path} cannot be created: {e.strerror}") from e
    self._lock()
    try:
      manifest = self._check_manifest()
      self._check_writable()
      self._remove([STAGING])
      write_json(manifest, os.path.join(self.path, MANIFEST))
    except BaseException:
      self._unlock()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self._unlock()

  def _lock(self) -> None:
    path = os.path.join(self.path, LOCK)
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"--workdir {self.path} is not writable: {e.strerror}"
                         ) from e
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
      os.close(fd)
      if e.errno in (errno.EACCES, errno.EAGAIN):
        raise WorkdirError(
            f"{self.path} is in use by another run ({holder or 'unknown'});"
            " wait for it to finish or use another --workdir") from e
      raise WorkdirError(f"cannot lock {path}: {e.strerror}") from e
    stale = os.pread(fd, 200, 0).decode(errors="replace").strip()
    if stale:
      # The kernel dropped the lock of a process that ended without
      # releasing it (killed): its run stopped, this one may continue it.
      self.notes.append(f"taking over the lock of a run that stopped without"
                        f" releasing it ({stale})")
    holder = (f"pid {os.getpid()} on host {socket.gethostname()}, since"
              f" {time.strftime('%Y-%m-%d %H:%M:%S')}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    self._lock_fd = fd

  def _unlock(self) -> None:
    if self._lock_fd is not None:
      try:
        os.ftruncate(self._lock_fd, 0)  # an empty lock file is not stale
      except OSError:
        pass  # the kernel still drops the lock on close
      os.close(self._lock_fd)
      self._lock_fd = None

  def _check_manifest(self) -> dict[str, Any]:
    path = os.path.join(self.path, MANIFEST)
    others = sorted(set(os.listdir(self.path)) - set(_BOOKKEEPING))
    if self.must_exist and not (others and os.path.exists(path)):
      raise WorkdirError(f"{self.path} holds no earlier run to reuse")
    if not others:
      # Nothing to protect (e.g. a run that failed to load its data): any
      # configuration may start here.
      return {"code_version": self.code_version, "identity": self.identity}
    if not os.path.exists(path):
      raise WorkdirError(
          f"{self.path} is not empty ({', '.join(others[:3])}"
          f"{', ...' if len(others) > 3 else ''}) but holds no {MANIFEST}:"
          " a run of an older mico_jax, or not a workdir; use another"
          " --workdir or empty it")
    manifest = _read_json(path)
    if manifest.get("code_version") != self.code_version:
      raise WorkdirError(
          f"{self.path} holds models trained by another version of mico_jax"
          f" ({manifest.get('code_version')} there, {self.code_version}"
          " here), which this version must not reuse; use another --workdir"
          " or delete it")
    if manifest.get("identity") != self.identity:
      raise WorkdirError(
          f"{self.path} holds a run of another configuration (differs in:"
          f" {_differences(manifest.get('identity', {}), self.identity)});"
          " use another --workdir or delete it")
    return manifest

  def _remove(self, names: list[str]) -> None:
    for name in names:
      path = os.path.join(self.path, name)
      try:
        if os.path.isdir(path):
          shutil.rmtree(path)
        elif os.path.lexists(path):
          os.remove(path)
      except OSError as e:
        raise WorkdirError(
            f"cannot remove the earlier run's output {e.filename or path}:"
            f" {e.strerror}; make it writable or use another --workdir"
        ) from e

  def _check_writable(self) -> None:
    # A probe file, not os.access: root passes access checks on read-only
    # folders, yet cannot write to immutable or read-only-mounted ones.
    for folder, _, _ in os.walk(self.path):
      try:
        with tempfile.TemporaryFile(dir=folder):
          pass
      except OSError as e:
        raise WorkdirError(
            f"{folder} is not writable ({e.strerror}); this run needs to write"
            " there: make it writable or use another --workdir") from e

  def output(self, name: str) -> str:
    """Where to write output `name` (a file or folder path relative to the
    workdir) during the run; `publish` moves it into place."""
    if name not in self._outputs:
      self._outputs.append(name)
    path = os.path.join(self.staging, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

  def publish(self) -> None:
    """Replaces the previous run's outputs with this run's.

    The new ones move in the order first asked for (put the file that marks
    a complete run last). The manifest lists old and new outputs until all
    are in place, so a run that stops halfway leaves nothing unlisted.
    """
    path = os.path.join(self.path, MANIFEST)
    manifest = _read_json(path)
    old = manifest.get("outputs", [])
    manifest["outputs"] = old + [n for n in self._outputs if n not in old]
    write_json(manifest, path)
    self._remove(old)
    for name in self._outputs:
      source = os.path.join(self.staging, name)
      if os.path.lexists(source):
        target = os.path.join(self.path, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(source, target)
    manifest["outputs"] = list(self._outputs)
    write_json(manifest, path)
    shutil.rmtree(self.staging, ignore_errors=True)
