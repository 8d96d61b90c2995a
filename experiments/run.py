r"""The main job: MICO challenge -> K models trained together -> attacks -> MICO scores.

  python -m experiments.run --workdir=/tmp/mico_jax

writes, under --workdir:
  scores.json                 {scenario: {attack: {MICO metric: value}}}
  roc.png                     log-log ROC curves, one panel per scenario
  <scenario>/models.csv       each model's phase, train and evaluation accuracy
  <scenario>/run.json         the command, sizes, recipe, mean accuracies,
                              epsilon spent (DP) and seconds taken
  bundle/<scenario>/<phase>/model_<i>/  MICO's layout: seeds, solution.csv,
                              prediction.csv (scores of --submit_attack in
                              [0, 1]), epsilon (ε spent, DP scenarios only)
scores.json is written last: a run that stops early leaves none.
"""

import dataclasses
import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

from mico_jax import attacks, challenge, data, dp, report, scoring, stats
from mico_jax.pipeline import run_scenario
from mico_jax.tasks import TASKS

_TASK = flags.DEFINE_enum("task", "digits", sorted(TASKS), "MICO task to run.")
_SCENARIOS = flags.DEFINE_list(
    "scenario", ["inf"], "Scenarios to run, comma-separated: inf (no DP),"
    " hi (epsilon 10), lo (epsilon 4), where the task defines them.")
_NUM_MODELS = flags.DEFINE_integer(
    "num_models", None, "Models per scenario (each is a target and a shadow);"
    " default: the task's.", lower_bound=2)
_LEN_TRAINING = flags.DEFINE_integer(
    "len_training", None, "Training points per model, n (default: the task's).",
    lower_bound=1)
_LEN_CHALLENGE = flags.DEFINE_integer(
    "len_challenge", None, "Member challenges per model, m; there are as many"
    " non-members (default: the task's).", lower_bound=1)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder with the task's data files (cifar10/"
    "cifar10_jpeg.npz, sst2/{train,dev}.tsv, location/bangkok,"
    " purchase100/dataset_purchase). Unset: CIFAR-10 and SST-2 come from"
    " TFDS's prepared data; the tabular tasks need it.")
_SEED = flags.DEFINE_integer("seed", 0, "Base seed of every challenge seed.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Output folder.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Override the recipe's epochs.",
                               lower_bound=1)
_ATTACKS = flags.DEFINE_list("attacks", list(attacks.ATTACKS),
                             "Attacks to run.")
_SUBMIT = flags.DEFINE_string(
    "submit_attack", "lira_online",
    "Attack whose scores become prediction.csv in the bundle.")
_SHADOWS = flags.DEFINE_enum(
    "shadows", "all", ["all", "train"], "Shadow models: every other model, or"
    " only MICO's train phase (whose membership MICO reveals).")
_EPSILON = flags.DEFINE_float(
    "epsilon", None, "Override the target epsilon of the DP scenarios.")
_DELTA = flags.DEFINE_float(
    "delta", None, "Override the delta of the DP scenarios (MICO: 1e-5).")
_CLIP_NORM = flags.DEFINE_float(
    "clip_norm", None, "Override the DP scenarios' per-example clipping norm"
    " C (MICO: 2.6).")
_QUERY_SHIFT = flags.DEFINE_integer(
    "query_shift", 1, "Pixels of the shifted image queries (0: none).",
    lower_bound=0)

flags.register_validator(
    "attacks", lambda names: set(names) <= set(attacks.ATTACKS),
    f"--attacks must be a subset of {sorted(attacks.ATTACKS)}")


class UserError(Exception):
  """A problem with the user's flags or files, reported in one line."""


def _check_flags():
  task = TASKS[_TASK.value]
  unknown = [s for s in _SCENARIOS.value if s not in task.scenarios]
  if unknown or not _SCENARIOS.value:
    raise UserError(f"--scenario: task {task.name} has scenarios"
                    f" {sorted(task.scenarios)}, got {_SCENARIOS.value}")
  if _SUBMIT.value not in _ATTACKS.value:
    raise UserError(f"--submit_attack={_SUBMIT.value} is not among --attacks")


def _prepare_workdir(path: str) -> str:
  path = os.path.abspath(path)
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise UserError(f"--workdir {path} is not writable: {e.strerror}") from e
  # A stale scores.json would look like this run's result if we stopped early.
  stale = os.path.join(path, "scores.json")
  if os.path.exists(stale):
    os.remove(stale)
  return path


def _write_json_atomically(obj, path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _write_models_csv(path, result):
  train_acc, eval_acc = result.accuracy()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("model,phase,train_accuracy,eval_accuracy\n")
    for k, phase in enumerate(result.challenge.phases):
      f.write(f"{k},{phase},{train_acc[k]:.6f},{eval_acc[k]:.6f}\n")
  return train_acc, eval_acc


def run(log=print) -> dict:
  """Runs every requested scenario; returns the scores written to disk."""
  _check_flags()
  workdir = _prepare_workdir(_WORKDIR.value)
  task = TASKS[_TASK.value]
  task = dataclasses.replace(
      task, len_training=_LEN_TRAINING.value or task.len_training,
      len_challenge=_LEN_CHALLENGE.value or task.len_challenge)
  num_models = _NUM_MODELS.value or task.default_models
  log(f"loading {task.name}")
  dataset = task.load(_DATA_DIR.value)
  challenge.check_sizes(len(dataset), task.len_training, task.len_challenge)
  queries = stats.default_queries(dataset, _QUERY_SHIFT.value)
  all_scores, panels = {}, {}
  for scenario in _SCENARIOS.value:
    config = task.scenarios[scenario]
    if _EPOCHS.value:
      config = dataclasses.replace(config, epochs=_EPOCHS.value)
    if config.dp is not None:
      overrides = {name: flag.value for name, flag in (
          ("epsilon", _EPSILON), ("delta", _DELTA), ("clip_norm", _CLIP_NORM))
                   if flag.value is not None}
      config = dataclasses.replace(
          config, dp=dataclasses.replace(config.dp, **overrides))
    log(f"[{scenario}] training {num_models} models together on"
        f" {task.len_training} of {len(dataset)} {task.name} points"
        f" ({config.epochs} epochs, batch {config.batch_size},"
        f" {config.optimizer} lr {config.learning_rate}"
        + (f"; DP-SGD to epsilon {config.dp.epsilon}, delta"
           f" {config.dp.delta:g}, clip norm {config.dp.clip_norm}"
           if config.dp else "") + ")")
    start = time.perf_counter()
    result = run_scenario(task, config, dataset, num_models, _SEED.value,
                          _ATTACKS.value, queries, _SHADOWS.value, log,
                          task.train_chunk, task.unroll)
    train_acc, eval_acc = _write_models_csv(
        os.path.join(workdir, scenario, "models.csv"), result)
    log(f"[{scenario}] accuracy: train {train_acc.mean():.4f}, evaluation"
        f" {eval_acc.mean():.4f} (mean of {num_models} models;"
        f" {time.perf_counter() - start:.1f}s)")
    _write_json_atomically({
        "command": " ".join(["python -m experiments.run", *sys.argv[1:]]),
        "task": task.name, "scenario": scenario, "num_models": num_models,
        "pool_size": len(dataset), "len_training": task.len_training,
        "len_challenge": task.len_challenge, "num_queries": len(queries),
        "config": dataclasses.asdict(config),
        "train_accuracy": float(train_acc.mean()),
        "eval_accuracy": float(eval_acc.mean()),
        "epsilon": (None if result.epsilon_K is None else
                    float(result.epsilon_K.max())),
        "seconds": round(time.perf_counter() - start, 1),
    }, os.path.join(workdir, scenario, "run.json"))
    predictions = scoring.to_unit_interval(result.scores_KxC[_SUBMIT.value])
    challenge.write_bundle(os.path.join(workdir, "bundle"), scenario,
                           result.challenge, predictions, result.epsilon_K)
    all_scores[scenario] = result.metrics
    panels[scenario] = {name: (result.challenge.member_KxC, s)
                        for name, s in result.scores_KxC.items()}
    log(f"[{scenario}] MICO scores over {num_models} x"
        f" {2 * task.len_challenge} challenge points:\n" +
        scoring.score_table(result.metrics))
  report.plot_roc(panels, os.path.join(workdir, "roc.png"),
                  title=f"{task.name}, {num_models} models")
  _write_json_atomically(all_scores, os.path.join(workdir, "scores.json"))
  log(f"wrote {workdir}/scores.json, roc.png and bundle/")
  return all_scores


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  try:
    run()
  except (UserError, data.DataError, challenge.ChallengeError,
          dp.DPError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
