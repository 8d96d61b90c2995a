"""MICO's CodaLab scorer: layout, scores.txt against MICO's formula, bad input."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics

from mico_jax import score_codalab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = ("toy_lo", "toy_inf", "toy_hi")  # written unsorted on purpose
C = 20  # challenge points per model


def _write_row(path, values, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(",".join(fmt % v for v in np.asarray(values).tolist()) + "\n")


def make_layout(root, seed=0):
  """ref/ with the final phase of 3 scenarios, res/ with dev and final."""
  rng = np.random.default_rng(seed)
  for s, scenario in enumerate(SCENARIOS):
    for phase, models in (("dev", range(4, 7)), ("final", range(7, 10))):
      for k in models:
        solution = rng.permutation(np.repeat([0, 1], C // 2))
        # Ties (rounding) and a per-scenario strength, so scenarios differ.
        prediction = np.clip(np.round(
            rng.random(C) * 0.6 + 0.1 * s * solution, 1), 0, 1)
        model = f"model_{k}"
        if phase == "final":
          _write_row(os.path.join(root, "ref", "toy", scenario, phase, model,
                                  "solution.csv"), solution, "%d")
        path = os.path.join(root, "res", "toy", scenario, phase, model,
                            "prediction.csv")
        if k % 2:  # one value per line also reads
          os.makedirs(os.path.dirname(path), exist_ok=True)
          np.savetxt(path, prediction)
        else:
          _write_row(path, prediction, "%r")


def mico_formula(root, scenario):
  """MICO's score.py, computed here independently of mico_jax."""
  ref = os.path.join(root, "ref", "toy", scenario, "final")
  solutions, predictions = [], []
  for model in os.listdir(ref):
    solutions.append(np.loadtxt(os.path.join(ref, model, "solution.csv"),
                                delimiter=","))
    predictions.append(np.loadtxt(os.path.join(
        root, "res", "toy", scenario, "final", model, "prediction.csv"),
                                  delimiter=","))
  solutions, predictions = np.concatenate(solutions), np.concatenate(
      predictions)
  fpr, tpr, _ = metrics.roc_curve(solutions, predictions)
  want = {f"TPR_FPR_{int(1e4 * t)}": max(tpr[fpr < t])
          for t in (0.001, 0.01, 0.05, 0.1, 0.15, 0.2)}
  want["AUC"] = metrics.roc_auc_score(solutions, predictions)
  want["MIA"] = np.max(tpr - fpr)
  want["accuracy"] = np.max(1 - (fpr + (1 - tpr)) / 2)
  return want


def test_scores_txt_equals_micos_formula(tmp_path):
  make_layout(str(tmp_path / "in"))
  assert score_codalab.main([str(tmp_path / "in"), str(tmp_path / "out")]) == 0
  lines = (tmp_path / "out" / "scores.txt").read_text().splitlines()
  got = dict(line.split(": ") for line in lines)
  assert len(got) == 3 * 9 + 1
  tpr_at_10 = []
  for j, scenario in enumerate(sorted(SCENARIOS), start=1):
    want = mico_formula(str(tmp_path / "in"), scenario)
    for key, value in want.items():
      assert float(got[f"scenario{j}_{key}"]) == pytest.approx(value,
                                                               abs=1e-12)
    tpr_at_10.append(want["TPR_FPR_1000"])
  assert float(got["average_TPR_FPR_1000"]) == pytest.approx(
      np.mean(tpr_at_10))
  assert lines[-1].startswith("average_TPR_FPR_1000: ")
  page = (tmp_path / "out" / "scores.html").read_text()
  assert "scenario1: toy_hi" in page and "<table>" in page


def test_command_line_entry_point(tmp_path):
  make_layout(str(tmp_path / "in"), seed=1)
  done = subprocess.run(
      [sys.executable, "-m", "mico_jax.score_codalab", str(tmp_path / "in"),
       str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert done.returncode == 0, done.stderr
  assert (tmp_path / "out" / "scores.txt").exists()


@pytest.mark.parametrize("content,message", [
    ("nan," * (C - 1) + "0.5", "NaN predictions"),
    ("1.5," * (C - 1) + "0.5", r"outside \[0, 1\]"),
    ("-0.1," * (C - 1) + "0.5", r"outside \[0, 1\]"),
    ("0.5," * (C - 2) + "0.5", f"{C - 1} predictions for {C}"),
    ("0.5,x", "cannot read numbers"),
    (None, "missing"),
])
def test_bad_predictions_fail_in_one_line_and_write_nothing(
    tmp_path, capsys, content, message):
  make_layout(str(tmp_path / "in"))
  path = tmp_path / "in" / "res" / "toy" / "toy_inf" / "final" / "model_8" / (
      "prediction.csv")
  if content is None:
    path.unlink()
  else:
    path.write_text(content + "\n")
  assert score_codalab.main([str(tmp_path / "in"), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert str(path) in err
  assert re.search(message, err)
  assert not (tmp_path / "out").exists()


def test_layout_errors_are_named(tmp_path, capsys):
  make_layout(str(tmp_path / "in"))
  os.rename(tmp_path / "in" / "res" / "toy" / "toy_lo",
            tmp_path / "in" / "res" / "toy" / "other")
  assert score_codalab.main([str(tmp_path / "in"), str(tmp_path / "out")]) == 1
  assert "scenarios ['other', 'toy_hi', 'toy_inf']" in capsys.readouterr().err
