"""The main job from the command line: outputs, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mico_jax import challenge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  return subprocess.run(
      [sys.executable, "-m", "experiments.run", *args], cwd=ROOT,
      capture_output=True, text=True, timeout=timeout)


def test_small_run_writes_scores_bundle_and_plot(tmp_path):
  workdir = tmp_path / "out"
  proc = _run(f"--workdir={workdir}", "--num_models=4", "--epochs=2",
              "--attacks=loss,lira_online", "--scenario=inf,lo")
  assert proc.returncode == 0, proc.stderr
  assert "epoch 2/2" in proc.stdout
  scores = json.loads((workdir / "scores.json").read_text())
  assert set(scores) == {"inf", "lo"}
  # DP models carry MICO's epsilon file: the budget spent, at the target.
  spent = float((workdir / "bundle" / "lo" / "dev" / "model_2" /
                 "epsilon").read_text())
  assert 3.95 <= spent <= 4.0
  assert not (workdir / "bundle" / "inf" / "dev" / "model_2" /
              "epsilon").exists()
  # MICO's phases scored apart, and every model pooled.
  assert set(scores["inf"]) == {"dev", "final", "all"}
  assert set(scores["inf"]["final"]) == {"loss", "lira_online"}
  assert set(scores["inf"]["dev"]["loss"]) == {
      "TPR_FPR_10", "TPR_FPR_100", "TPR_FPR_500", "TPR_FPR_1000",
      "TPR_FPR_1500", "TPR_FPR_2000", "AUC", "MIA", "accuracy"}
  assert (workdir / "roc.png").stat().st_size > 1000
  prediction = challenge.read_values(
      str(workdir / "bundle" / "inf" / "final" / "model_3" / "prediction.csv"))
  assert prediction.shape == (200,)
  assert prediction.min() >= 0 and prediction.max() <= 1
  models = (workdir / "inf" / "models.csv").read_text().splitlines()
  assert models[0] == "model,phase,train_accuracy,eval_accuracy"
  assert len(models) == 5


@pytest.mark.parametrize("args,message", [
    (["--task=nope"], "--task"),
    (["--num_models=1"], "--num_models"),
    (["--scenario=mid"], "--scenario"),
    (["--attacks=loss,magic"], "--attacks"),
    (["--len_challenge=899"], "only 1797"),
    (["--workdir=/dev/null/sub"], "not writable"),
    (["--submit_attack=lira_online", "--attacks=loss"], "--submit_attack"),
    (["--attacks_only"], "no trained models and statistics to reuse"),
    (["--coordinator_address=127.0.0.1:1"], "--num_processes"),
    (["--scenario=lo", "--epsilon=0"], "epsilon must be"),
    (["--scenario=hi", "--delta=1"], "delta must lie in (0, 1)"),
    (["--scenario=lo", "--clip_norm=-2.6"], "clip_norm must be"),
])
def test_bad_input_gets_one_line_error(args, message, tmp_path):
  if not any(a.startswith("--workdir") for a in args):
    args = [*args, f"--workdir={tmp_path}"]
  proc = _run(*args)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "scores.json").exists()
