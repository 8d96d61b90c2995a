"""The main job under faults, as a user meets them: one line, exit != 0, and
nothing left that looks like a result it is not.

One row of issue 10's table per test (or parameter). Runs that need trained
models share one small trained workdir (5 models, 2 epochs, checkpoints at
steps 29 and 58) and work on copies of it.
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 900 training points in batches of 32: 29 steps an epoch.
ARGS = ("--num_models=5", "--epochs=2", "--checkpoint_every=29",
        "--attacks=loss,lira_online")
BOOKKEEPING = {".lock", "manifest.json", "run.log"}


def _command(workdir, *args):
  return [sys.executable, "-m", "experiments.run", f"--workdir={workdir}",
          *args]


def _run(workdir, *args, env=None):
  return subprocess.run(_command(workdir, *args), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _error_line(proc, *words, code=1):
  """The one stderr line of a failed run, checked to name `words`."""
  assert proc.returncode == code, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: "), lines[0]
  for word in words:
    assert word in lines[0], lines[0]
  return lines[0]


def _snapshot(workdir):
  """Every file under `workdir` (the log aside) -> a hash of its bytes."""
  files = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      if name != "run.log":
        with open(os.path.join(folder, name), "rb") as f:
          files[os.path.relpath(f.name, workdir)] = hashlib.sha256(
              f.read()).hexdigest()
  return files


def _left(workdir):
  return set(os.listdir(workdir)) if os.path.exists(workdir) else set()


@pytest.fixture(scope="module", name="trained")
def _trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained") / "w"
  proc = _run(workdir, *ARGS)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ""
  return workdir


@pytest.fixture(name="copy")
def _copy(trained, tmp_path):
  shutil.copytree(trained, tmp_path / "w")
  return tmp_path / "w"


def _damage(checkpoint_dir):
  for path in glob.glob(os.path.join(checkpoint_dir, "state", "**", "d", "*"),
                        recursive=True):
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("task,words", [
    ("cifar10_cpu", ["TFDS cifar10/train is not readable", "--data_dir"]),
    ("sst2_cpu", ["TFDS glue/sst2/train is not readable", "--data_dir"]),
])
def test_missing_tfds_data_without_data_dir(task, words, tmp_path):
  # An empty TFDS folder, whatever this machine has prepared.
  os.makedirs(tmp_path / "tfds")
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  proc = _run(tmp_path / "w", f"--task={task}", env=env)
  _error_line(proc, *words)
  assert _left(tmp_path / "w") <= BOOKKEEPING


def test_truncated_cifar_archive(tmp_path):
  os.makedirs(tmp_path / "data" / "cifar10")
  whole = tmp_path / "whole.npz"
  np.savez(whole, jpeg=np.arange(400_000, dtype=np.uint8),
           offsets=np.array([0, 200_000, 400_000]), label=np.zeros(2),
           split=np.zeros(2))
  archive = tmp_path / "data" / "cifar10" / "cifar10_jpeg.npz"
  archive.write_bytes(whole.read_bytes()[:250_000])
  proc = _run(tmp_path / "w", "--task=cifar10_cpu",
              f"--data_dir={tmp_path / 'data'}")
  _error_line(proc, str(archive), "not a readable .npz archive", "truncated")
  assert _left(tmp_path / "w") <= BOOKKEEPING


@pytest.mark.parametrize("args,words", [
    (["--num_models=4"], ["another configuration", "num_models (5 there, 4"
                          " here)"]),  # and no warning about 3 shadows
    (["--seed=1"], ["another configuration", "seed (0 there, 1 here)"]),
])
def test_rerun_with_another_configuration_touches_nothing(copy, args, words):
  before = _snapshot(copy)
  proc = _run(copy, *ARGS, *args)
  _error_line(proc, str(copy), *words)
  # The earlier run's results stay whole: scores, plot, bundle, checkpoints.
  assert _snapshot(copy) == before
  assert len(glob.glob(str(copy / "bundle" / "inf" / "*" / "*" /
                           "prediction.csv"))) == 5


def test_rerun_of_attacks_replaces_every_output(copy):
  proc = _run(copy, *ARGS[:2], "--attacks_only", "--attacks=loss",
              "--submit_attack=loss")
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ""
  assert "training" not in proc.stdout and "epoch" not in proc.stdout
  assert "attacks only" in proc.stdout
  assert set(json.loads((copy / "scores.json").read_text())["inf"]["all"]) == {
      "loss"}
  assert len(glob.glob(str(copy / "bundle" / "**" / "prediction.csv"),
                       recursive=True)) == 5
  assert not (copy / ".partial").exists()


def test_bad_privacy_fails_before_training_anything(tmp_path):
  # The other flag checks run in-process: tests/test_run.py.
  proc = _run(tmp_path / "w", "--scenario=inf,hi", "--epsilon=-1")
  _error_line(proc, "scenario hi: epsilon must be")
  assert "training" not in proc.stdout
  assert not (tmp_path / "w").exists()  # refused before the workdir


def test_query_shift_larger_than_the_images(tmp_path):
  proc = _run(tmp_path / "w", "--query_shift=100")
  _error_line(proc, "--query_shift=100", "8x8 images")
  assert _left(tmp_path / "w") <= BOOKKEEPING  # before any training


def test_two_runs_at_once_and_ctrl_c(tmp_path):
  workdir = tmp_path / "w"
  # A suite started in the background ignores SIGINT, and an ignored signal
  # stays ignored across exec: the child gets Python's own handler only if
  # this process handles SIGINT when it starts the child.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    first = subprocess.Popen(
        _command(workdir, "--num_models=5", "--epochs=100000",
                 "--attacks=loss", "--submit_attack=loss"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  finally:
    signal.signal(signal.SIGINT, previous)
  try:
    for line in first.stdout:  # training has started: the lock is held
      if line.startswith("epoch 1/"):
        break
    second = _run(workdir, "--num_models=5", "--seed=1")
    _error_line(second, str(workdir), "in use by another run",
                f"pid {first.pid}")
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
  finally:
    first.kill()
  assert first.returncode == 130, err
  assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err
  saved = int(next(l for l in out.splitlines()
                   if l.startswith("interrupted: saving")).split()[-1])
  steps = os.listdir(workdir / "inf" / "checkpoints" / "models_0-4")
  assert str(saved) in steps and saved % 29 == 0  # at an epoch's end
  assert not (workdir / "scores.json").exists()
  assert (workdir / ".lock").read_text() == ""  # released


def test_all_checkpoints_damaged(copy):
  shutil.rmtree(copy / "inf" / "trained")
  for step in ("29", "58"):
    _damage(copy / "inf" / "checkpoints" / "models_0-4" / step)
  scores = (copy / "scores.json").read_bytes()
  proc = _run(copy, *ARGS)
  _error_line(proc, "no usable checkpoint", "models_0-4/58: unreadable",
              "models_0-4/29: unreadable")
  # The log keeps the whole story (orbax's own traceback too, when orbax
  # logs one: under load it sometimes fails on another file first, without).
  assert "models_0-4/58: unreadable" in (copy / "run.log").read_text()
  # The earlier complete run's results of this configuration, untouched.
  assert (copy / "scores.json").read_bytes() == scores
  assert not (copy / ".partial").exists()


def test_disk_full(tmp_path):
  workdir = tmp_path / "w"
  os.makedirs(workdir)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs",
                     str(workdir)], capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs (needs root)")
  try:
    proc = _run(workdir, *ARGS)
    _error_line(proc, "No space left on device", str(workdir))
    assert not (workdir / "scores.json").exists()
  finally:
    subprocess.run(["umount", str(workdir)], check=True)


def test_one_damaged_checkpoint_recovers_quietly(copy, trained):
  shutil.rmtree(copy / "inf" / "trained")
  _damage(copy / "inf" / "checkpoints" / "models_0-4" / "58")
  proc = _run(copy, *ARGS)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ""  # no "Event loop is closed"
  assert "checkpoint damaged, not loaded: " in proc.stdout
  assert "resuming from step 29" in proc.stdout
  assert ((copy / "scores.json").read_text() ==
          (trained / "scores.json").read_text())


@pytest.mark.parametrize("change,words", [
    ("version", ["another version of mico_jax", "0.0.1 sources old there"]),
    ("no_manifest", ["holds no manifest.json", "older mico_jax"]),
])
def test_workdir_of_another_version(copy, change, words):
  manifest = copy / "manifest.json"
  if change == "version":
    saved = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**saved,
                                    "code_version": "0.0.1 sources old"}))
  else:
    manifest.unlink()
  before = _snapshot(copy)
  _error_line(_run(copy, *ARGS), *words)
  assert _snapshot(copy) == before


def _make_read_only(path):
  """Read-only even for root (immutable) where chmod is not enough."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    return lambda: os.chmod(path, 0o755)
  if subprocess.run(["chattr", "+i", str(path)],
                    capture_output=True).returncode:
    pytest.skip("root, and chattr +i does not work here")
  return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_folder_inside_the_workdir(copy):
  before = _snapshot(copy)
  undo = _make_read_only(copy / "inf" / "trained")
  try:
    proc = _run(copy, *ARGS)
  finally:
    undo()
  _error_line(proc, str(copy / "inf" / "trained"), "is not writable")
  assert _snapshot(copy) == before


def test_one_shadow_model_warns(tmp_path):
  proc = _run(tmp_path / "w", "--num_models=2", "--epochs=1",
              "--len_training=200", "--len_challenge=20")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("warning: --num_models=2"
                                                 " leaves 1 shadow"), lines
  assert (tmp_path / "w" / "scores.json").exists()
