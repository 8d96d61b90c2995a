r"""The main job: MICO challenge -> K models trained together -> attacks -> MICO scores.

  python -m experiments.run --workdir=/tmp/mico_jax

writes, under --workdir:
  scores.json                 {scenario: {attack: {MICO metric: value}}}
  roc.png                     log-log ROC curves, one panel per scenario
  report.md                   per scenario: epsilon, the attack selection,
                              score tables for dev, final and pooled
  <scenario>/models.csv       each model's phase, train and evaluation accuracy
  <scenario>/run.json         the command, sizes, recipe, mean accuracies,
                              epsilon spent (DP) and seconds taken
  <scenario>/checkpoints/     orbax training states (every --checkpoint_every
                              steps and at the end); a rerun resumes from them
  <scenario>/trained/         final params and statistics (npz); a rerun
                              with the same configuration reuses them
  bundle/<scenario>/<phase>/model_<i>/  MICO's layout: seeds, solution.csv,
                              prediction.csv (scores of --submit_attack in
                              [0, 1]), epsilon (ε spent, DP scenarios only)
scores.json is written last: a run that stops early leaves none.

Models are sharded over all devices; with --coordinator_address (or
JAX_COORDINATOR_ADDRESS) the job is one of several processes of a
jax.distributed run, and only process 0 writes outputs and logs.
"""

import dataclasses
import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

from mico_jax import attacks, challenge, checkpoint, data, dp, parallel
from mico_jax import report, scoring, stats
from mico_jax.pipeline import Execution, run_scenario
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
_WAVE_SIZE = flags.DEFINE_integer(
    "wave_size", None, "Train at most this many models at once, in waves (for"
    " more models than memory holds); 0: all at once. Default: the task's"
    " (all at once, but one at a time for CNNs on CPU).", lower_bound=0)
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 0, "Training steps between checkpoints; 0: only at the"
    " end of training. Each distinct run of steps between an epoch end and a"
    " checkpoint compiles once, so a divisor or multiple of the steps per"
    " epoch is cheapest.", lower_bound=0)
_ATTACKS_ONLY = flags.DEFINE_bool(
    "attacks_only", False, "Rerun the attacks on the trained models and"
    " statistics saved by an earlier run; never train.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process"
    " run (default: $JAX_COORDINATOR_ADDRESS; unset: one process).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes of a multi-process run (default:"
    " $JAX_NUM_PROCESSES).", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in a multi-process run"
    " (default: $JAX_PROCESS_ID).", lower_bound=0)

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
  """The absolute workdir, checked writable, without a stale scores.json."""
  path = os.path.abspath(path)
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise UserError(f"--workdir {path} is not writable: {e.strerror}") from e
  # A stale scores.json would look like this run's result if we stopped early.
  stale = os.path.join(path, "scores.json")
  if parallel.is_main_process() and os.path.exists(stale):
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
  """Runs every requested scenario; returns the scores written to disk.

  In a multi-process run every process computes the scores; only process 0
  logs and writes.
  """
  _check_flags()
  main = parallel.is_main_process()
  if not main:
    log = lambda _: None
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
  all_scores, panels, sections = {}, {}, []
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
    wave_size = (task.wave_size if _WAVE_SIZE.value is None
                 else _WAVE_SIZE.value)
    execution = Execution(wave_size=wave_size, unroll=task.unroll,
                          directory=os.path.join(workdir, scenario),
                          save_every=_CHECKPOINT_EVERY.value,
                          reuse_only=_ATTACKS_ONLY.value)
    result = run_scenario(task, config, dataset, num_models, _SEED.value,
                          _ATTACKS.value, queries, _SHADOWS.value, log,
                          execution)
    all_scores[scenario] = result.metrics
    if not main:
      continue
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
    panels[scenario] = {name: (result.challenge.member_KxC, s)
                        for name, s in result.scores_KxC.items()}
    notes = [attacks.shadow_coverage(result.observations)]
    if "selected" in result.scores_KxC:
      notes += ["selected: " + line for line in attacks.select_lib.selection(
          result.observations).describe().splitlines()]
    sections.append(report.Section(
        scenario, result.challenge.phases, result.challenge.member_KxC,
        result.scores_KxC, None if result.epsilon_K is None else
        float(result.epsilon_K.max()), tuple(notes)))
    log(f"[{scenario}] MICO scores over {num_models} x"
        f" {2 * task.len_challenge} challenge points:\n" +
        "".join(f"  {note}\n" for note in notes) +
        scoring.score_table(result.metrics))
  if not main:
    return all_scores
  report.plot_roc(panels, os.path.join(workdir, "roc.png"),
                  title=f"{task.name}, {num_models} models")
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(report.markdown_report(
        sections, f"{task.name}, {num_models} models"))
  _write_json_atomically(all_scores, os.path.join(workdir, "scores.json"))
  log(f"wrote {workdir}/scores.json, report.md, roc.png and bundle/")
  return all_scores


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every step of every save at INFO.
    logging.set_verbosity(logging.WARNING)
  try:
    # Before any other JAX use: it decides which devices there are.
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                        _PROCESS_ID.value)
    run()
  except (UserError, data.DataError, challenge.ChallengeError,
          checkpoint.CheckpointError, parallel.ParallelError, dp.DPError,
          attacks.ObservationError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
