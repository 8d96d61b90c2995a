"""attack_mico end to end on a MICO-layout release made by PyTorch; bad input.

The release is made here by `experiments/torch_mico.py` (MICO's Purchase-100
trainer re-created: torch's `random_split` seeds, unshuffled loader, Adam,
StepLR) for the `location` task on a synthetic file in Location's format
(2,700 records instead of 5,010), 8 models per scenario (4 train, 2 dev, 2
final), 1 epoch. The `hi` and `lo` models are NOT trained with opacus: they
are plain models whose keys carry Opacus's `_module.` prefix, which is all
the importer sees of DP.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from sklearn import metrics

torch = pytest.importorskip("torch")

# pylint: disable=g-import-not-at-top
from experiments import torch_mico
from mico_jax import challenge, score_codalab

TASK, POOL, N, M, MODELS = "location", 2_700, 2_500, 100, 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """`<root>/location/location_{inf,hi,lo}`, `<root>/solutions/location/...`

  and the pool in `<root>/data/location/bangkok`.
  """
  root = tmp_path_factory.mktemp("release")
  rng = np.random.default_rng(0)
  x = (rng.random((POOL, 446)) < 0.3).astype(np.float32)
  y = (x @ rng.normal(size=(446, 30))).argmax(1)
  (root / "data" / "location").mkdir(parents=True)
  np.savetxt(root / "data" / "location" / "bangkok", np.c_[y + 1, x],
             fmt="%d", delimiter=",")
  recipe = torch_mico.Recipe(epochs=1, learning_rate=1e-2)
  for s, scenario in enumerate(("inf", "hi", "lo")):
    for index, phase in enumerate(challenge.mico_phases(MODELS)):
      seeds = torch_mico.mico_seeds(7, index + 1000 * s)
      _, member, train_idx, _ = torch_mico.mico_splits(POOL, N, M, seeds)
      state = torch_mico.train_mlp(x, y, train_idx, 30, 128, recipe,
                                   seed=index)
      if scenario != "inf":
        state = {"_module." + k: v for k, v in state.items()}
      sub = os.path.join(f"{TASK}_{scenario}", phase, f"model_{index}")
      torch_mico.write_model(str(root / TASK / sub), phase, seeds, member,
                             state, str(root / "solutions" / TASK / sub))
  return root


def _attack(*argv):
  """Runs the command line as a user would; returns its stderr if it failed.

  A subprocess: the main job's tests parse its own absl flags (some of the
  same names) in this process.
  """
  result = subprocess.run(
      [sys.executable, "-m", "experiments.attack_mico", f"--task={TASK}",
       *argv], cwd=ROOT, capture_output=True, text=True, check=False)
  if result.returncode == 0:
    return None
  return result.stderr.strip()


def _mico_score(solutions, predictions):
  """MICO's score.py on concatenated files: sklearn's ROC, strict FPR < t."""
  fpr, tpr, _ = metrics.roc_curve(solutions, predictions)
  return {"TPR_FPR_1000": max(tpr[fpr < 0.1]),
          "TPR_FPR_100": max(tpr[fpr < 0.01]),
          "AUC": metrics.roc_auc_score(solutions, predictions)}


def test_end_to_end_predictions_zip_scores(release, tmp_path):
  workdir = tmp_path / "w"
  assert _attack(f"--mico_dir={release / TASK}", f"--workdir={workdir}",
                 f"--data_dir={release / 'data'}",
                 f"--solutions_dir={release / 'solutions' / TASK}",
                 "--fresh_shadows=0", "--attacks=loss,lira_online") is None
  scores = json.loads((workdir / "scores.json").read_text())
  assert set(scores) == {"inf", "hi", "lo"}
  for per_phase in scores.values():
    assert set(per_phase) == {"train", "dev", "final"}
    assert set(per_phase["dev"]) == {"loss", "lira_online"}
  with zipfile.ZipFile(workdir / "submission.zip") as z:
    names = sorted(z.namelist())
    z.extractall(tmp_path / "res")
  expected = sorted(
      f"{TASK}/{TASK}_{s}/{p}/model_{i}/prediction.csv"
      for s in ("inf", "hi", "lo")
      for i, p in enumerate(challenge.mico_phases(MODELS)) if p != "train")
  assert names == expected
  # MICO's own formula on our files gives our numbers.
  for scenario in ("inf", "hi", "lo"):
    for phase in ("dev", "final"):
      folder = f"{TASK}/{TASK}_{scenario}/{phase}"
      models = sorted(os.listdir(tmp_path / "res" / folder))
      predictions = np.concatenate([np.loadtxt(
          tmp_path / "res" / folder / m / "prediction.csv", delimiter=",")
                                    for m in models])
      solutions = np.concatenate([np.loadtxt(
          release / "solutions" / folder / m / "solution.csv", delimiter=",")
                                  for m in models])
      assert predictions.shape == (len(models) * 2 * M,)
      assert 0 <= predictions.min() and predictions.max() <= 1
      ours = scores[scenario][phase]["lira_online"]
      for key, value in _mico_score(solutions, predictions).items():
        assert ours[key] == pytest.approx(value, abs=1e-12), (scenario, phase,
                                                              key)
  # CodaLab's scorer on the zip, one phase at a time as CodaLab runs it.
  for phase in ("dev", "final"):
    codalab = tmp_path / f"codalab_{phase}"
    shutil.copytree(tmp_path / "res", codalab / "res")
    for scenario in ("inf", "hi", "lo"):
      sub = f"{TASK}/{TASK}_{scenario}/{phase}"
      shutil.copytree(release / "solutions" / sub, codalab / "ref" / sub)
    assert score_codalab.main([str(codalab), str(codalab / "out")]) == 0
    lines = dict(line.split(": ") for line in
                 (codalab / "out" / "scores.txt").read_text().splitlines())
    for j, scenario in enumerate(sorted(("hi", "inf", "lo")), start=1):
      ours = scores[scenario][phase]["lira_online"]
      for key in ("TPR_FPR_1000", "TPR_FPR_100", "AUC", "MIA"):
        assert float(lines[f"scenario{j}_{key}"]) == pytest.approx(
            ours[key], abs=1e-12)
  assert (workdir / "roc.png").stat().st_size > 1000


def test_fresh_shadows_and_recipe_check(release, tmp_path):
  workdir = tmp_path / "w"
  assert _attack(f"--mico_dir={release / TASK}", f"--workdir={workdir}",
                 f"--data_dir={release / 'data'}", "--scenario=inf",
                 "--fresh_shadows=4", "--shadows=both", "--epochs=1",
                 "--attacks=lira_online") is None
  scores = json.loads((workdir / "scores.json").read_text())
  assert set(scores) == {"inf"} and set(scores["inf"]) == {"train"}
  report = (workdir / "report.md").read_text()
  assert "shadows: 4 provided + 4 fresh" in report
  for line in ("train accuracy: targets", "eval accuracy: targets",
               "mean IN - OUT statistic: targets"):
    assert line in report
  with zipfile.ZipFile(workdir / "submission.zip") as z:
    assert len(z.namelist()) == 4


def _broken_release(release, tmp_path, relpath, damage):
  root = tmp_path / "mico"
  shutil.copytree(release / TASK / f"{TASK}_inf", root / f"{TASK}_inf")
  path = root / f"{TASK}_inf" / relpath
  damage(path)
  return root, path


def _truncate(path):
  path.write_bytes(path.read_bytes()[:100])


def _pickle_payload(path):
  # Unpickling would run open(<marker>, "w"): the marker proves it did not.
  torch.save({"mlp.0.weight": _Payload(str(path.parent / "executed"))}, path)


class _Payload:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def _wrong_shape(path):
  state = torch.load(path, weights_only=True)
  state["mlp.0.weight"] = torch.zeros(128, 445)
  torch.save(state, path)


@pytest.mark.parametrize("relpath, damage, message", [
    ("dev/model_4/seed_challenge", os.remove, "missing seed file"),
    ("train/model_1/seed_membership", os.remove, "missing seed file"),
    ("final/model_7/model.pt", _truncate, "not a readable PyTorch file"),
    ("train/model_0/model.pt", _pickle_payload, "refused"),
    ("dev/model_5/model.pt", _wrong_shape, "mlp.0.weight has shape (128, 445)"),
])
def test_bad_release_one_line_nothing_written(release, tmp_path, relpath,
                                              damage, message):
  root, path = _broken_release(release, tmp_path, relpath, damage)
  workdir = tmp_path / "w"
  error = _attack(f"--mico_dir={root}", f"--workdir={workdir}",
                  f"--data_dir={release / 'data'}", "--fresh_shadows=0")
  assert error is not None and "\n" not in error
  assert error.startswith(f"error: {path}: ") and message in error, error
  assert not (path.parent / "executed").exists()
  for name in ("scores.json", "submission.zip", "report.md", "predictions"):
    assert not (workdir / name).exists()
