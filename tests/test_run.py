"""The main job from the command line: outputs, and one-line errors for bad input.

Faults met during a run are in test_run_faults.py.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from absl import flags

from experiments import run as main_job

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


def _main(*args):
  """The main job in this process: its exit code.

  Only for runs that stop before any work (nothing here diverts this
  process's stderr or trains); a subprocess costs seconds of imports.
  """
  flags.FLAGS.unparse_flags()
  try:
    main_job.main(main_job._parse_flags(["experiments.run", *args]))  # pylint: disable=protected-access
  except SystemExit as e:
    if isinstance(e.code, str):  # printed by Python on its way out
      print(e.code, file=sys.stderr)
      return 1
    return e.code
  finally:
    flags.FLAGS.unparse_flags()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  return 0


@pytest.mark.parametrize("args,words", [
    (["--task=nope"], ["--task=nope", "digits"]),
    (["--num_models=1"], ["--num_models"]),
    (["--scenario=mid"], ["--scenario", "mid"]),
    (["--scenario=inf,inf"], ["--scenario names inf more than once"]),
    (["--attacks=loss,magic"], ["--attacks", "magic"]),
    (["--len_challenge=899"], ["only 1797"]),
    (["--submit_attack=lira_online", "--attacks=loss"], ["--submit_attack"]),
    (["--coordinator_address=127.0.0.1:1"], ["--num_processes"]),
    (["--num_processes=2"], ["--num_processes without"]),
    (["--scenario=lo", "--epsilon=0"], ["scenario lo: epsilon must be"]),
    (["--scenario=hi", "--delta=1"], ["delta must lie in (0, 1)"]),
    (["--scenario=lo", "--clip_norm=-2.6"], ["clip_norm must be"]),
    # Flags the run would ignore.
    (["--epsilon=0"], ["--epsilon", "--scenario=inf has none"]),
    (["--epsilon=3", "--delta=1e-6"], ["--epsilon, --delta", "has none"]),
    (["--data_dir=."], ["--data_dir", "digits", "reads no files"]),
    (["--ddp_references=4"], ["--ddp_references", "--scenario=ddp"]),
])
def test_bad_flags_get_one_line_before_any_work(args, words, tmp_path,
                                                 capfd):
  code = _main(*args, f"--workdir={tmp_path / 'w'}")
  err = capfd.readouterr().err
  assert code == 1
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for word in words:
    assert word in lines[0]
  assert not (tmp_path / "w").exists()  # refused before the workdir


def test_workdir_that_cannot_be_created(tmp_path, capfd):
  (tmp_path / "file").write_text("not a folder")
  assert _main(f"--workdir={tmp_path / 'file' / 'sub'}") == 1
  err = capfd.readouterr().err
  assert err == (f"error: --workdir {tmp_path / 'file' / 'sub'} cannot be"
                 " created: Not a directory\n")
  assert (tmp_path / "file").read_text() == "not a folder"


def test_attacks_only_needs_an_earlier_run(tmp_path, capfd):
  assert _main("--attacks_only", f"--workdir={tmp_path}") == 1
  assert capfd.readouterr().err == (
      f"error: {tmp_path} holds no earlier run to reuse\n")
  assert os.listdir(tmp_path) == [".lock"]
