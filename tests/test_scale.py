"""Scale-out: fake devices, two processes, waves, kill -9 and resume.

Fake CPU devices need XLA_FLAGS before JAX starts, so those tests run the main
job (or a short script) in subprocesses. XLA's CPU batched matmul rounds
differently for different numbers of models per call, so a different device
layout or wave size gives parameters equal to about 1e-7, not bit for bit:
those comparisons allow 1e-4 relative on parameters and 0.005 on every MICO
metric. Resuming on the same layout is bit-identical and tested as such.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from mico_jax import data, models, parallel, pipeline, stats, tasks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 640 training points in batches of 32: 20 steps an epoch, checkpoints at
# steps 10, 20, ..., 40 (mid-epoch ones included); 5 models take 5 of 8
# devices in one process, and pad to 8 on 2 x 2.
# Runs in different workdirs are compared: one training seed for all.
ARGS = ("--num_models=5", "--epochs=2", "--len_training=640",
        "--checkpoint_every=10", "--attacks=loss,lira_online",
        "--training_seed=0")
METRIC_TOLERANCE = 0.005
PARAM_RTOL = 1e-4


def _command(workdir, *extra):
  return [sys.executable, "-m", "experiments.run", f"--workdir={workdir}",
          *ARGS, *extra]


def _env(devices=1):
  """`devices` CPU devices by XLA_FLAGS; None: none named there."""
  env = dict(os.environ)
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _run(workdir, *extra, devices=1):
  proc = subprocess.run(_command(workdir, *extra), cwd=ROOT, env=_env(devices),
                        capture_output=True, text=True, timeout=300)
  return proc


def _scores(workdir):
  return json.loads((workdir / "scores.json").read_text())["inf"]["all"]


def _params(workdir):
  with np.load(workdir / "inf" / "trained" / "models_0-4.npz") as f:
    return [f[name] for name in sorted(f.files) if name.startswith("param_")]


def _assert_close_scores(got, want):
  assert set(got) == set(want)
  for attack in want:
    for metric, value in want[attack].items():
      assert abs(got[attack][metric] - value) <= METRIC_TOLERANCE, (
          attack, metric)


@pytest.fixture(scope="module", name="reference")
def _reference(tmp_path_factory):
  """The main job on one device, in one process, never interrupted."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr
  assert "1 cpu devices in 1 process" in proc.stdout
  return workdir


def test_eight_devices_match_one(reference, tmp_path):
  proc = _run(tmp_path, "--cpu_devices=8", devices=None)
  assert proc.returncode == 0, proc.stderr
  # One process's CPU devices: as many as divide K, so nothing is padded.
  assert ("mesh: 5 of 8 cpu devices in 1 process on axis 'models'; 1 models"
          " per device\n") in proc.stdout
  _assert_close_scores(_scores(tmp_path), _scores(reference))
  for got, want in zip(_params(tmp_path), _params(reference)):
    assert got.shape[0] == 5
    np.testing.assert_allclose(got, want, rtol=PARAM_RTOL, atol=1e-6)
  assert len((tmp_path / "inf" / "models.csv").read_text().splitlines()) == 6


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(reference, tmp_path):
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      _command(tmp_path, f"--coordinator_address={address}",
               "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=_env(devices=2), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for proc, (_, err) in zip(procs, outs):
    assert proc.returncode == 0, err
  assert ("mesh: 4 cpu devices in 2 processes on axis 'models'; 2 models per"
          " device; 5 models padded to 8 with 3 copies of the last"
          ) in outs[0][0]
  assert "wrote" not in outs[1][0]  # only process 0 logs and writes
  _assert_close_scores(_scores(tmp_path), _scores(reference))
  for got, want in zip(_params(tmp_path), _params(reference)):
    np.testing.assert_allclose(got, want, rtol=PARAM_RTOL, atol=1e-6)


def test_killed_run_resumes_bit_identically(reference, tmp_path):
  checkpoints = tmp_path / "inf" / "checkpoints" / "models_0-4"
  proc = subprocess.Popen(_command(tmp_path), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  # Complete checkpoints are renamed into place; a bare step number is one.
  while not (checkpoints.is_dir() and any(
      p.name.isdigit() for p in checkpoints.iterdir())):
    assert proc.poll() is None and time.monotonic() < deadline
    time.sleep(0.005)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "scores.json").exists()

  resumed = _run(tmp_path)
  assert resumed.returncode == 0, resumed.stderr
  line = next(l for l in resumed.stdout.splitlines()
              if l.startswith("resuming from step"))
  assert int(line.split()[3]) in (10, 20, 30, 40)
  for got, want in zip(_params(tmp_path), _params(reference)):
    np.testing.assert_array_equal(got, want)
  assert _scores(tmp_path) == _scores(reference)


def test_checkpoint_of_another_configuration_is_refused(reference, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "inf" / "trained")  # leave only the checkpoints
  proc = _run(workdir, "--epochs=3")
  assert proc.returncode != 0
  # The workdir's manifest refuses first; the checkpoints' own fingerprint
  # check is tested in test_checkpoint.py.
  assert proc.stderr == (f"error: {workdir} holds a run of another"
                         " configuration (differs in: inf.epochs (2 there, 3"
                         " here)); use another --workdir or delete it\n")
  assert sorted(os.listdir(workdir / "inf" / "checkpoints" / "models_0-4")
                ) == ["30", "40"]


def test_attacks_rerun_on_saved_models_without_training(reference, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(reference, workdir)
  proc = _run(workdir, "--attacks_only", "--attacks=loss",
              "--submit_attack=loss")
  assert proc.returncode == 0, proc.stderr
  assert "reusing trained models and statistics" in proc.stdout
  assert "epoch 1/" not in proc.stdout
  assert _scores(workdir) == {"loss": _scores(reference)["loss"]}


_SHARDING_SCRIPT = textwrap.dedent("""
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from mico_jax import challenge, data, dp, models, parallel, pipeline
    from mico_jax import stats, train
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    dataset = data.Dataset("toy", x, x[:, :3].argmax(1).astype(np.int32), 3,
                           "tabular")
    chal = challenge.make_challenge(200, 64, 8, challenge.make_seeds(0, 16))
    mesh = parallel.make_mesh()
    # Given K, one process's CPU devices: the most of them that divide K.
    assert [parallel.make_mesh(k).shape["models"] for k in (12, 7, 1, 16)
            ] == [6, 7, 1, 8]
    model = models.MLP(3, (8,))
    trainer = pipeline.make_trainer(model, train.TrainConfig(batch_size=16),
                                    64)
    key_K = parallel.put_models(np.asarray(train.model_keys(chal.seeds_Kx3)),
                                mesh)
    state = pipeline.init_state(trainer, key_K, jnp.asarray(x[0]), mesh)
    args = (parallel.put_models(chal.train_KxT, mesh),
            *parallel.put_replicated((dataset.x, dataset.y), mesh))
    state = train.train(trainer, state, *args, epochs=1, log=None)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
      want = P() if leaf.ndim == 0 else P("models")
      assert leaf.sharding.spec == want, (path, leaf.sharding)
      if leaf.ndim:
        assert {s.data.shape[0] for s in leaf.addressable_shards} == {2}
    # Models never talk to one another: no collectives in the step, nor in
    # DP-SGD's (its chunk loop runs on each device for its own models).
    dp_trainer = pipeline.make_trainer(model, train.TrainConfig(
        batch_size=16, dp=dp.DPConfig(10.0, 1e-5, 1.0)), 64)
    for t in (trainer, dp_trainer):
      hlo = train.Trainer._run_compiled.lower(
          t, pipeline.init_state(t, key_K, jnp.asarray(x[0]), mesh), *args, 3,
          train._models_sharding(args[0], 8)).compile().as_text()
      assert not any(op in hlo for op in ("all-gather", "all-reduce",
                                          "all-to-all", "collective-permute"))
    # Stepped from Python (`unroll`), groups of one model per device: the
    # same models, still sharded.
    stepped = train.train(dataclasses.replace(trainer, unroll=True),
                          pipeline.init_state(trainer, key_K,
                                              jnp.asarray(x[0]), mesh),
                          *args, epochs=1, log=None)
    for leaf, want in zip(jax.tree.leaves(stepped), jax.tree.leaves(state)):
      assert leaf.sharding.spec == want.sharding.spec
      np.testing.assert_allclose(leaf, want, rtol=1e-5, atol=1e-6)
    seen = []
    def to_host(a):
      seen.append(a.sharding.spec)
      return np.asarray(a)
    stats.compute_stats(model.apply, state.params, dataset.x, dataset.y,
                        to_host=to_host)
    assert set(seen) == {P("models")}, seen
    print("ok")
""")


def test_training_and_statistics_stay_sharded():
  proc = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT], cwd=ROOT,
                        env=_env(devices=8), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "ok"


def test_default_cpu_devices_are_one_a_core_unless_xla_flags_name_them(
    monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
  assert parallel.default_cpu_devices() is None
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
  assert parallel.default_cpu_devices() == len(os.sched_getaffinity(0))


def test_waves_equal_one_wave():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 12)).astype(np.float32)
  dataset = data.Dataset("toy", x, x[:, :3].argmax(1).astype(np.int32), 3,
                         "tabular")
  config = train.TrainConfig(learning_rate=0.01, batch_size=25, epochs=2)
  task = tasks.Task("toy", lambda data_dir: dataset,
                    lambda c: models.MLP(c, (16,)), 300, 100, 20,
                    {"inf": config})
  results = [pipeline.run_scenario(
      task, config, dataset, 32, 0, ["loss", "lira_online"], (stats.IDENTITY,),
      log=None, execution=pipeline.Execution(wave_size=wave))
             for wave in (0, 8)]
  once, waves = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               once.params, waves.params)
  np.testing.assert_allclose(once.stats.stat_KxNxA, waves.stats.stat_KxNxA,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(once.stats.correct_KxN,
                                waves.stats.correct_KxN)
  assert jax.tree.leaves(waves.params)[0].shape[0] == 32
  for phase, by_attack in once.metrics.items():
    for attack, metrics in by_attack.items():
      for metric, value in metrics.items():
        assert (abs(waves.metrics[phase][attack][metric] - value) <=
                METRIC_TOLERANCE)
  # The models differ, so equal results are not a coincidence of copies.
  leaf = jax.tree.leaves(waves.params)[0]
  assert not np.allclose(leaf[0], leaf[8])
