"""Registered tasks build, their sizes fit, the text model masks padding, and
the main job runs a task from a --data_dir."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import results_table
from mico_jax import challenge, data, dp, models, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Input of one example and number of classes, per data set (the task's name up
# to "_"); a new data set must be added here, or its task's test fails.
_INPUTS = {
    "digits": (jnp.zeros((2, 8, 8, 1)), 10),
    "cifar10": (jnp.zeros((2, 32, 32, 3)), 10),
    "sst2": (jnp.ones((2, 64), jnp.int32), 2),
    "purchase100": (jnp.zeros((2, 600)), 100),
    "location": (jnp.zeros((2, 446)), 30),
}


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_task_builds_and_its_sizes_fit_its_pool(name):
  task = tasks.TASKS[name]
  assert task.name == name
  x, num_classes = _INPUTS[name.split("_")[0]]
  model = task.make_model(num_classes)
  params = model.init(jax.random.key(0), x)
  assert model.apply(params, x).shape == (2, num_classes)
  challenge.check_sizes(task.pool_size, task.len_training, task.len_challenge)
  assert "inf" in task.scenarios
  assert task.default_models >= 2


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_mico_tasks_follow_micos_batch_order_and_rate_rule(name):
  """MICO's non-DP CIFAR-10/Purchase-100 loops do not shuffle (members first);
  SST-2's HF Trainer does; SST-2's DP rate is B / n, the others' 1 / steps."""
  scenarios = tasks.TASKS[name].scenarios
  family = name.split("_")[0]
  if family != "digits":  # not a MICO task
    assert scenarios["inf"].shuffle == (family == "sst2")
  for scenario in ("hi", "lo"):
    assert scenarios[scenario].dp.sample_rate_rule == (
        "batch" if family == "sst2" else "steps")


def test_cnn_channels_set_every_layers_width():
  x = jnp.zeros((1, 32, 32, 3))
  count = lambda model: sum(
      leaf.size for leaf in jax.tree.leaves(model.init(jax.random.key(0), x)))
  # conv k8 (3 -> c1), k3 (c1 -> c2), k3 (c2 -> c3), dense 25 c3 -> 10.
  expected = lambda c1, c2, c3: (8 * 8 * 3 * c1 + c1 + 9 * c1 * c2 + c2 +
                                 9 * c2 * c3 + c3 + 25 * c3 * 10 + 10)
  assert count(models.CNN(10)) == expected(128, 256, 256)
  assert count(tasks.CIFAR10_CPU.make_model(10)) == expected(16, 32, 32)


def test_text_model_ignores_padding_but_not_tokens():
  model = models.TextClassifier(2, models.BagOfEmbeddings(50, dim=8))
  tokens = jnp.array([[5, 7, 9, 0, 0], [3, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
                     jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  logits = model.apply(params, tokens)
  assert np.isfinite(np.asarray(logits)).all()  # All-padding text included.
  padded = jnp.pad(tokens, ((0, 0), (0, 7)))
  np.testing.assert_allclose(model.apply(params, padded), logits, rtol=1e-6)
  changed = tokens.at[0, 1].set(8)
  assert not np.allclose(model.apply(params, changed)[0], logits[0])


def test_dp_clips_the_text_model_by_ghost_norms_exactly():
  model = models.TextClassifier(2, models.BagOfEmbeddings(30, dim=4), (8,))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 30, size=(6, 7)) * (rng.random((6, 7)) < 0.7)
  tokens = jnp.asarray(tokens, jnp.int32)
  y = jnp.asarray(rng.integers(0, 2, 6), jnp.int32)
  mask = jnp.array([True] * 5 + [False])
  params = model.init(jax.random.key(0), tokens)
  ghost = dp.clipped_grad_sum(model.apply, params, tokens, y, mask, 0.5)
  naive = dp.clipped_grad_sum(model.apply, params, tokens, y, mask, 0.5,
                              method="naive")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               ghost, naive)
  assert (np.asarray(ghost[2]) > 0.5).any()  # Some examples were clipped.


def test_subset_is_seeded_and_in_pool_order():
  idx = data.subset_indices(100, 30, seed=1)
  assert len(set(idx.tolist())) == 30 and (np.diff(idx) > 0).all()
  np.testing.assert_array_equal(idx, data.subset_indices(100, 30, seed=1))
  assert not np.array_equal(idx, data.subset_indices(100, 30, seed=2))
  digits = data.load_digits()
  small = data.subset(digits, 30, seed=1)
  idx = data.subset_indices(len(digits), 30, seed=1)
  np.testing.assert_array_equal(small.x, digits.x[idx])
  np.testing.assert_array_equal(small.y, digits.y[idx])
  with pytest.raises(data.DataError, match="cannot take 101 of 100"):
    data.subset_indices(100, 101)


def test_tabular_task_without_data_dir_names_the_flag():
  with pytest.raises(data.DataError, match="--data_dir.*location/bangkok"):
    tasks.LOCATION.load(None)


def _write_location(directory, num_records, rng):
  os.makedirs(directory / "location")
  features = rng.integers(0, 2, size=(num_records, 446))
  labels = rng.integers(1, 31, size=num_records)
  with open(directory / "location" / "bangkok", "w") as f:
    for label, row in zip(labels, features):
      f.write(f'"{label}",' + ",".join(map(str, row)) + "\n")


def _run(*args):
  return subprocess.run(
      [sys.executable, "-m", "experiments.run", *args], cwd=ROOT,
      capture_output=True, text=True, timeout=300)


def test_main_job_runs_location_from_data_dir(tmp_path):
  _write_location(tmp_path / "data", 300, np.random.default_rng(0))
  workdir = tmp_path / "out"
  proc = _run("--task=location_cpu", f"--data_dir={tmp_path / 'data'}",
              f"--workdir={workdir}", "--num_models=4", "--epochs=2",
              "--len_training=150", "--len_challenge=20",
              "--attacks=loss,lira_online")
  assert proc.returncode == 0, proc.stderr
  assert "150 of 300 location_cpu points" in proc.stdout
  scores = json.loads((workdir / "scores.json").read_text())
  assert set(scores["inf"]) == {"dev", "final", "all"}
  assert set(scores["inf"]["final"]) == {"loss", "lira_online"}
  assert 0 <= scores["inf"]["final"]["lira_online"]["AUC"] <= 1
  assert len((workdir / "inf" / "models.csv").read_text().splitlines()) == 5
  run = json.loads((workdir / "inf" / "run.json").read_text())
  assert run["command"].startswith("python -m experiments.run --task=")
  assert (run["num_models"], run["pool_size"], run["len_training"],
          run["len_challenge"]) == (4, 300, 150, 20)
  assert run["config"]["epochs"] == 2 and run["epsilon"] is None
  assert 0 <= run["eval_accuracy"] <= 1
  table = results_table.markdown(results_table.load_runs(str(workdir)))
  auc = scores["inf"]["final"]["lira_online"]["AUC"]
  assert "| inf | final | lira_online | " in table and f"{auc:.3f} |" in table
  assert "| inf | all | lira_online | " in table
  assert "| inf | 4 | 300 | 150 | 20 | 2 | 512 |" in table


def test_results_table_reads_old_scores_and_skips_missing_runs(
    tmp_path, capsys):
  """An older scores.json ({attack: metrics} with an audit entry) gives its
  attack rows and audit table; one without its run.json is named, not fatal."""
  metrics = {"TPR_FPR_1000": 0.25, "TPR_FPR_100": 0.05, "AUC": 0.6}
  audit = {"epsilon": 10.0, "natural": {"epsilon_lower_bound": 0.5,
                                        "epsilon_gdp": 0.7}}
  (tmp_path / "old" / "hi").mkdir(parents=True)
  (tmp_path / "old" / "scores.json").write_text(json.dumps(
      {"hi": {"loss": metrics, "audit": audit}}))
  (tmp_path / "old" / "hi" / "run.json").write_text(json.dumps({
      "task": "t", "scenario": "hi", "num_models": 2, "pool_size": 10,
      "len_training": 5, "len_challenge": 2, "epsilon": 10.0,
      "config": {"epochs": 1, "batch_size": 4}, "train_accuracy": 0.5,
      "eval_accuracy": 0.5, "seconds": 1.0, "command": "c"}))
  (tmp_path / "bare").mkdir()
  (tmp_path / "bare" / "scores.json").write_text(json.dumps(
      {"lo": {"loss": metrics}}))
  table = results_table.markdown(results_table.load_runs(str(tmp_path)))
  assert "| hi | all | loss | 0.250 | 0.050 | 0.600 |" in table
  assert "| hi | 10.00 | 0.50 | 0.70 | – | – |" in table
  assert "bare/scores.json: no lo/run.json" in capsys.readouterr().err


@pytest.mark.parametrize("setup,message", [
    ("none", "task location reads local files: pass --data_dir"),
    ("missing", "location/bangkok: no such file"),
    ("malformed", "location/bangkok, line 2: 3 columns, expected 447"),
])
def test_main_job_reports_data_errors_in_one_line(setup, message, tmp_path):
  args = ["--task=location", f"--workdir={tmp_path / 'out'}"]
  if setup != "none":
    args.append(f"--data_dir={tmp_path}")
  if setup == "malformed":
    os.makedirs(tmp_path / "location")
    row = ",".join(["1"] * 446)
    (tmp_path / "location" / "bangkok").write_text(f"1,{row}\n2,0,1\n")
  proc = _run(*args)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
