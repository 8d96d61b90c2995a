r"""The main job: MICO challenge -> K models trained together -> attacks -> MICO scores.

  python -m experiments.run --workdir=/tmp/mico_jax

writes, under --workdir:
  scores.json                 {scenario: {phase: {attack: {MICO metric:
                              value}}}}: phase dev and final scored apart as
                              MICO does, and all (every model pooled)
  roc.png                     log-log ROC curves, one panel per scenario
  report.md                   per scenario: epsilon, the attack selection,
                              score tables for dev, final and pooled
  <scenario>/models.csv       each model's phase, train and evaluation accuracy
  <scenario>/run.json         the command, sizes, recipe, mean accuracies,
                              epsilon spent (DP) and seconds taken
  <scenario>/checkpoints/     orbax training states (every
                              --checkpoint_minutes, --checkpoint_every steps,
                              at the end and on Ctrl-C); a rerun resumes
  <scenario>/trained/         final params and statistics (npz; ddp: the
                              reference models' too); a rerun with the same
                              configuration reuses them
  <scenario>/training_seed    the secret seed of the training randomness
                              (init, data order, DP noise and sampling):
                              private, never in bundle/; a rerun reuses it
  bundle/<scenario>/<phase>/model_<i>/  MICO's layout: seeds, solution.csv,
                              prediction.csv (scores of --submit_attack in
                              [0, 1]), epsilon (ε spent, DP scenarios only)
  manifest.json, .lock, run.log   the configuration and code version of the
                              folder's run, its lock, and the log (with
                              everything libraries print on stderr)
Every flag is checked before any work (`_validate`; what needs the data,
right after loading it, in `_check_dataset`): to add a flag, define it and
check it there. One run at a time uses a workdir (`mico_jax.workdir`); a run
of another configuration or code version is refused before anything changes.
Outputs are written aside (`folder.output(name)`) and replace the previous
run's together at the end, scores.json last: a run that stops early leaves
the earlier results as they were, never a mix. Every fault ends with one line
on stderr and exit status 1 (130 on Ctrl-C, 143 on SIGTERM, after
checkpointing the training); the details go to run.log.

Models are sharded over all devices; with --coordinator_address (or
JAX_COORDINATOR_ADDRESS) the job is one of several processes of a
jax.distributed run, and only process 0 writes outputs and logs.
"""

import dataclasses
import os
import re
import secrets
import signal
import sys
import time
import traceback
from typing import Callable, TextIO

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from mico_jax import attacks, audit, challenge, checkpoint, data, ddp, dp
from mico_jax import parallel, report, scoring, stats, workdir
from mico_jax.attacks.shadows import MIN_SHADOWS_FOR_VARIANCE
from mico_jax.pipeline import Execution, run_scenario
from mico_jax.pretrained import FolderError
from mico_jax.tasks import TASKS, Task, with_pretrained
from mico_jax.train import TrainConfig

_TASK = flags.DEFINE_enum("task", "digits", sorted(TASKS), "MICO task to run.")
_SCENARIOS = flags.DEFINE_list(
    "scenario", ["inf"], "Scenarios to run, comma-separated: inf (no DP),"
    " hi (epsilon 10), lo (epsilon 4), where the task defines them; ddp (the"
    " DP-distinguisher track: lo, with per-target reference models, see"
    " --ddp_references) where it defines lo.")
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
_PRETRAINED_DIR = flags.DEFINE_string(
    "pretrained_dir", None, "Tasks sst2, sst2_tiny: the RoBERTa to fine-tune, a"
    " Hugging Face folder (config.json, model.safetensors or pytorch_model.bin,"
    " vocab.json + merges.txt or tokenizer.json); nothing is downloaded.")
_SEED = flags.DEFINE_integer("seed", 0, "Base seed of every challenge seed.")
_TRAINING_SEED = flags.DEFINE_integer(
    "training_seed", None, "Seed of the training randomness (init, data order,"
    " DP noise and sampling), for reproducible research. Default: a fresh"
    " secret from OS entropy per scenario, kept in <workdir>/<scenario>/"
    "training_seed (never in the bundle, which publishes the challenge"
    " seeds) and reused by a rerun.", lower_bound=0)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Output folder.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Override the recipe's epochs.",
                               lower_bound=1)
# The published attacks by default (quick); the whole suite, with the
# engine's selected and combined attacks, on request.
_ATTACKS = flags.DEFINE_list(
    "attacks", ["loss", "lira_offline", "lira_online", "lira_online_reference",
                "rmia_online"],
    f"Attacks to run, of: {', '.join(attacks.ATTACKS)}.")
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
_CANARIES = flags.DEFINE_integer(
    "canaries", 0, "Relabel this many pool points (chosen by --seed) with a"
    " wrong label: canaries, worst-case trials for the DP audit, which reports"
    " them apart from the natural challenge points.", lower_bound=0)
_DDP_REFERENCES = flags.DEFINE_integer(
    "ddp_references", 8, "Scenario ddp: reference models per target, each"
    " trained on the target's revealed training set plus half of its"
    " challenge points (complementary pairs: each challenge point IN for half"
    " of them); all targets' references train together.", lower_bound=2)
_QUERY_SHIFT = flags.DEFINE_integer(
    "query_shift", 1, "Pixels of the shifted image queries (0: none).",
    lower_bound=0)
_WAVE_SIZE = flags.DEFINE_integer(
    "wave_size", None, "Train at most this many models at once, in waves (for"
    " more models than memory holds); 0: all at once. Default: the task's"
    " (all at once, but one at a time for CNNs on CPU).", lower_bound=0)
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 0, "Training steps between checkpoints; 0: none by"
    " steps (see --checkpoint_minutes). Each distinct run of steps between an"
    " epoch end and a checkpoint compiles once, so a divisor or multiple of"
    " the steps per epoch is cheapest.", lower_bound=0)
_CHECKPOINT_MINUTES = flags.DEFINE_float(
    "checkpoint_minutes", 10, "Wall-clock minutes between checkpoints, taken"
    " at the next epoch end; 0: none by time. Training is also checkpointed"
    " at its end and on Ctrl-C or SIGTERM.", lower_bound=0)
_ATTACKS_ONLY = flags.DEFINE_bool(
    "attacks_only", False, "Rerun the attacks on the trained models and"
    " statistics saved by an earlier run; never train.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "CPU devices to shard the models over (on CPU): they"
    " share the machine's cores and run side by side, which fills the cores"
    " better than one device (default: one a core, or as XLA_FLAGS' host"
    " platform device count says).", lower_bound=1)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process"
    " run (default: $JAX_COORDINATOR_ADDRESS; unset: one process).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes of a multi-process run (default:"
    " $JAX_NUM_PROCESSES).", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in a multi-process run"
    " (default: $JAX_PROCESS_ID).", lower_bound=0)


class UserError(Exception):
  """A problem with the user's flags or files, reported in one line."""


# Errors that name their problem in one line; anything else is a bug or a
# fault of the system, reported with a pointer to the log.
_ONE_LINE_ERRORS = (UserError, data.DataError, challenge.ChallengeError,
                    checkpoint.CheckpointError, parallel.ParallelError,
                    dp.DPError, workdir.WorkdirError, FolderError,
                    attacks.ObservationError)
_DP_FLAGS = ("epsilon", "delta", "clip_norm")
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Plan:
  """A run, fully decided and checked before any work.

  Attributes:
    task: the task, with this run's training and challenge sizes.
    num_models: models per scenario.
    configs: scenario -> its recipe, flags applied (privacy calibrated).
    wave_size: models trained at once (0: all).
    warnings: things worth saying that do not stop the run.
  """

  task: Task
  num_models: int
  configs: dict[str, TrainConfig]
  wave_size: int
  warnings: tuple[str, ...]


def _present(name: str) -> bool:
  return flags.FLAGS[name].present


def _refuse_duplicates(flag: str, values: list[str]) -> None:
  repeated = sorted({v for v in values if values.count(v) > 1})
  if repeated:
    raise UserError(f"--{flag} names {', '.join(repeated)} more than once")


def _validate(log: Log = print) -> Plan:
  """Checks every flag and every scenario's recipe; reads and writes nothing.

  A flag the run would ignore is an error, so that no one believes it took
  effect (a warning where that is harmless). Checks that need the data are
  in `_check_dataset`.

  Raises:
    UserError, challenge.ChallengeError, dp.DPError: what is wrong.
  """
  task = TASKS[_TASK.value]
  if _PRETRAINED_DIR.value is not None:
    task = with_pretrained(task, _PRETRAINED_DIR.value)
  scenarios = _SCENARIOS.value
  known = sorted(task.scenarios) + ([ddp.SCENARIO] if ddp.RECIPE in
                                    task.scenarios else [])
  unknown = [s for s in scenarios if s not in known]
  if unknown or not scenarios:
    raise UserError(f"--scenario: task {task.name} has scenarios {known},"
                    f" got {scenarios}")
  _refuse_duplicates("scenario", scenarios)
  if _present("ddp_references") and ddp.SCENARIO not in scenarios:
    raise UserError(f"--ddp_references: only --scenario={ddp.SCENARIO} trains"
                    " reference models")
  unknown = [a for a in _ATTACKS.value if a not in attacks.ATTACKS]
  if unknown or not _ATTACKS.value:
    raise UserError(f"--attacks must name some of {sorted(attacks.ATTACKS)},"
                    f" got {_ATTACKS.value}")
  _refuse_duplicates("attacks", _ATTACKS.value)
  if _SUBMIT.value not in _ATTACKS.value:
    raise UserError(f"--submit_attack={_SUBMIT.value} is not among --attacks")
  if task.embedded and _DATA_DIR.value is not None:
    raise UserError(f"--data_dir: task {task.name} uses data shipped with the"
                    " code and reads no files; drop --data_dir or pick a task"
                    " that reads it")
  if _DATA_DIR.value is not None and not os.path.isdir(_DATA_DIR.value):
    raise UserError(f"--data_dir {_DATA_DIR.value} is not a folder")
  warnings = []
  if _ATTACKS_ONLY.value:
    # Harmless: the training command rerun with --attacks_only added.
    ignored = [f"--{name}" for name in ("checkpoint_every",
                                        "checkpoint_minutes")
               if _present(name)]
    if ignored:
      warnings.append(f"{', '.join(ignored)} ignored: --attacks_only never"
                      " trains")
  if not (_COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    ignored = [f"--{name}" for name in ("num_processes", "process_id")
               if _present(name)]
    if ignored:
      raise UserError(f"{', '.join(ignored)} without --coordinator_address"
                      " (or $JAX_COORDINATOR_ADDRESS): a one-process run")
  task = dataclasses.replace(
      task, len_training=_LEN_TRAINING.value or task.len_training,
      len_challenge=_LEN_CHALLENGE.value or task.len_challenge)
  # The task's documented pool size; `_check_dataset` checks the real one.
  challenge.check_sizes(task.pool_size, task.len_training, task.len_challenge)
  num_models = _NUM_MODELS.value or task.default_models
  configs = {s: _scenario_config(task, s, log) for s in scenarios}
  overrides = [f"--{name}" for name in _DP_FLAGS if _present(name)]
  if overrides and all(c.dp is None for c in configs.values()):
    with_dp = [s for s, c in task.scenarios.items() if c.dp is not None]
    raise UserError(f"{', '.join(overrides)}: only DP scenarios"
                    f" ({', '.join(with_dp)}) have privacy to set, but"
                    f" --scenario={','.join(scenarios)} has none")
  warnings += _shadow_warnings(num_models)
  return Plan(task, num_models, configs,
              task.wave_size if _WAVE_SIZE.value is None else _WAVE_SIZE.value,
              tuple(warnings))


def _scenario_config(task: Task, scenario: str, log: Log) -> TrainConfig:
  """The scenario's recipe with the flags applied; DP calibrated (cached)."""
  config = task.scenarios[ddp.RECIPE if scenario == ddp.SCENARIO
                          else scenario]
  if _EPOCHS.value:
    config = dataclasses.replace(config, epochs=_EPOCHS.value)
  if config.dp is None:
    return config
  overrides = {name: flags.FLAGS[name].value for name in _DP_FLAGS
               if flags.FLAGS[name].value is not None}
  try:
    config = dataclasses.replace(
        config, dp=dataclasses.replace(config.dp, **overrides))
    log(f"[{scenario}] calibrating DP-SGD's noise to epsilon"
        f" {config.dp.epsilon}")
    dp.calibrate(config.dp, task.len_training, config.batch_size,
                 config.epochs)
  except dp.DPError as e:
    raise dp.DPError(f"scenario {scenario}: {e}") from e
  return config


def _shadow_warnings(num_models: int) -> list[str]:
  """A warning if there are too few shadow models for the attacks."""
  phases = challenge.mico_phases(num_models)
  shadows = (num_models - 1 if _SHADOWS.value == "all" else
             max(phases.count("train") - 1, 0))
  needed = 2 * MIN_SHADOWS_FOR_VARIANCE
  if shadows < needed and set(_ATTACKS.value) - {"loss"}:
    return [f"--num_models={num_models} leaves {shadows} shadow model(s) for"
            f" some targets (--shadows={_SHADOWS.value}): LiRA needs at least"
            f" {MIN_SHADOWS_FOR_VARIANCE} IN and {MIN_SHADOWS_FOR_VARIANCE}"
            " OUT shadows per point, and is unreliable with few"]
  return []


def _check_dataset(dataset: data.Dataset, plan: Plan) -> None:
  """The checks that need the loaded data (before any training)."""
  challenge.check_sizes(len(dataset), plan.task.len_training,
                        plan.task.len_challenge)
  if _CANARIES.value > len(dataset):
    raise UserError(f"--canaries={_CANARIES.value} exceeds the pool's"
                    f" {len(dataset)} points")
  if dataset.kind != "image":
    if _present("query_shift"):
      raise UserError(f"--query_shift: task {plan.task.name} has"
                      f" {dataset.kind} data, which gets no shifted queries")
  elif _QUERY_SHIFT.value >= min(dataset.x.shape[1:3]):
    raise UserError(
        f"--query_shift={_QUERY_SHIFT.value} is not smaller than the"
        f" {dataset.x.shape[1]}x{dataset.x.shape[2]} images of"
        f" {plan.task.name}: a shifted image would be blank")


def _identity(plan: Plan) -> dict[str, object]:
  """What decides the trained models and statistics, as the manifest says."""
  identity = {
      "task": plan.task.name, "num_models": plan.num_models,
      "seed": _SEED.value, "len_training": plan.task.len_training,
      "len_challenge": plan.task.len_challenge,
      "query_shift": _QUERY_SHIFT.value, "scenarios": list(plan.configs),
      "canaries": _CANARIES.value, "training_seed": _TRAINING_SEED.value,
      "pretrained_dir": (_PRETRAINED_DIR.value and
                         os.path.abspath(_PRETRAINED_DIR.value)),
      "data_dir": _DATA_DIR.value and os.path.abspath(_DATA_DIR.value)}
  if ddp.SCENARIO in plan.configs:
    identity["ddp_references"] = _DDP_REFERENCES.value
  for scenario, config in plan.configs.items():
    identity.update(_flatten(scenario, dataclasses.asdict(config)))
  return identity


def _flatten(prefix: str, tree: dict) -> dict[str, object]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(f"{prefix}.{key}", value))
    else:
      flat[f"{prefix}.{key}"] = value
  return flat


def _training_seed(directory: str) -> int:
  """--training_seed, or the scenario's secret: reused, else fresh entropy.

  Every process of a multi-process run gets process 0's.
  """
  path = os.path.join(directory, "training_seed")
  if _TRAINING_SEED.value is not None:
    return _TRAINING_SEED.value
  if os.path.exists(path):
    with open(path) as f:
      return int(f.read())
  words = np.frombuffer(secrets.token_bytes(16), np.uint32)
  if jax.process_count() > 1:
    words = multihost_utils.broadcast_one_to_all(words)
  seed = int.from_bytes(np.asarray(words, np.uint32).tobytes(), "little")
  if parallel.is_main_process():
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
              "w") as f:
      f.write(f"{seed}\n")
    os.replace(tmp, path)
  return seed


def _audit(result, canary_N, log) -> dict:
  """Empirical ε lower bounds beside the accountant's, on natural challenge
  points and on canaries (see `mico_jax.audit`)."""
  chal, delta = result.challenge, result.mechanism.delta
  canary_KxC = (np.zeros(chal.challenge_KxC.shape, bool) if canary_N is None
                else canary_N[chal.challenge_KxC])
  report = {"epsilon": float(result.epsilon_K.max()), "delta": delta}
  for name, include in (("natural", ~canary_KxC), ("canaries", canary_KxC)):
    if include.any():
      report[name] = audit.audit_attacks(result.scores_KxC, chal.member_KxC,
                                         delta, include_KxC=include)
      log(f"audit on {name} ({int(include.sum())} trials): epsilon >="
          f" {report[name]['epsilon_lower_bound']:.3f} at delta {delta:g}"
          " with 95% confidence (GDP estimate"
          f" {report[name]['epsilon_gdp']:.3f}); accountant's epsilon"
          f" {report['epsilon']:.3f}")
  return report


def _ddp_references(result, plan, config, dataset, queries, execution, root,
                    log):
  """Trains each target's references and adds the DDP attacks' scores.

  Returns the result with the `ddp_*` scores and metrics beside the plain
  attacks', and a note for the report.
  """
  start = time.perf_counter()
  scores, note = ddp.attack(
      result.challenge, result.stats.stat_KxNxA,
      plan.task.make_model(dataset.num_classes), config, dataset, queries,
      _DDP_REFERENCES.value, _SEED.value, execution, log,
      _training_seed(os.path.join(root, ddp.SCENARIO)))
  log(f"[{ddp.SCENARIO}] references and DDP attacks done in"
      f" {time.perf_counter() - start:.1f}s")
  scores = {**result.scores_KxC, **scores}
  metrics = scoring.score_phases(result.challenge.member_KxC, scores,
                                 result.challenge.phases)
  return dataclasses.replace(result, scores_KxC=scores, metrics=metrics), note


def _write_models_csv(path, result):
  train_acc, eval_acc = result.accuracy()
  with open(path, "w") as f:
    f.write("model,phase,train_accuracy,eval_accuracy\n")
    for k, phase in enumerate(result.challenge.phases):
      f.write(f"{k},{phase},{train_acc[k]:.6f},{eval_acc[k]:.6f}\n")
  return train_acc, eval_acc


def run(plan: Plan, folder: workdir.Workdir | None, log: Log = print) -> dict:
  """Runs every scenario of the plan; returns the scores.

  Args:
    plan: what to run (`_validate`'s).
    folder: the entered workdir; None in processes other than process 0,
      which compute but write nothing.
    log: progress messages.
  """
  task, num_models = plan.task, plan.num_models
  root = folder.path if folder else os.path.abspath(_WORKDIR.value)
  log(f"loading {task.name}" + (f" from {_DATA_DIR.value}" if _DATA_DIR.value
                                else "" if task.embedded else " from TFDS"))
  start = time.perf_counter()
  dataset = task.load(_DATA_DIR.value)
  log(f"loaded {len(dataset)} points in {time.perf_counter() - start:.1f}s")
  _check_dataset(dataset, plan)
  canary_N = None
  if _CANARIES.value:
    dataset, canary_N = audit.mislabel(dataset, _CANARIES.value, _SEED.value)
  queries = stats.default_queries(dataset, _QUERY_SHIFT.value)
  all_scores, panels, sections = {}, {}, []
  for scenario, config in plan.configs.items():
    if _ATTACKS_ONLY.value:
      log(f"[{scenario}] attacks only: on the {num_models} models an earlier"
          " run trained")
    else:
      log(f"[{scenario}] training {num_models} models together on"
          f" {task.len_training} of {len(dataset)} {task.name} points"
          f" ({config.epochs} epochs, batch {config.batch_size},"
          f" {config.optimizer} lr {config.learning_rate}"
          + (f"; DP-SGD to epsilon {config.dp.epsilon}, delta"
             f" {config.dp.delta:g}, clip norm {config.dp.clip_norm}"
             if config.dp else "") + ")")
    start = time.perf_counter()
    execution = Execution(wave_size=plan.wave_size, unroll=task.unroll,
                          directory=os.path.join(root, scenario),
                          save_every=_CHECKPOINT_EVERY.value,
                          save_minutes=_CHECKPOINT_MINUTES.value,
                          reuse_only=_ATTACKS_ONLY.value)
    result = run_scenario(task, config, dataset, num_models, _SEED.value,
                          _ATTACKS.value, queries, _SHADOWS.value, log,
                          execution,
                          _training_seed(os.path.join(root, scenario)))
    notes = [attacks.shadow_coverage(result.observations)]
    if scenario == ddp.SCENARIO:
      result, note = _ddp_references(result, plan, config, dataset, queries,
                                     execution, root, log)
      notes.append(note)
    all_scores[scenario] = dict(result.metrics)
    if result.mechanism is not None:
      all_scores[scenario]["audit"] = _audit(result, canary_N, log)
    if folder is None:
      continue
    train_acc, eval_acc = _write_models_csv(
        folder.output(f"{scenario}/models.csv"), result)
    log(f"[{scenario}] accuracy: train {train_acc.mean():.4f}, evaluation"
        f" {eval_acc.mean():.4f} (mean of {num_models} models;"
        f" {time.perf_counter() - start:.1f}s)")
    workdir.write_json({
        "command": " ".join(["python -m experiments.run", *sys.argv[1:]]),
        "task": task.name, "scenario": scenario, "num_models": num_models,
        "pool_size": len(dataset), "len_training": task.len_training,
        "len_challenge": task.len_challenge, "num_queries": len(queries),
        "config": dataclasses.asdict(config),
        "train_accuracy": float(train_acc.mean()),
        "eval_accuracy": float(eval_acc.mean()),
        "epsilon": (None if result.epsilon_K is None else
                    float(result.epsilon_K.max())),
        "audit": all_scores[scenario].get("audit"),
        "seconds": round(time.perf_counter() - start, 1),
    }, folder.output(f"{scenario}/run.json"))
    predictions = scoring.to_unit_interval(result.scores_KxC[_SUBMIT.value])
    challenge.write_bundle(folder.output("bundle"), scenario,
                           result.challenge, predictions, result.epsilon_K)
    panels[scenario] = {name: (result.challenge.member_KxC, s)
                        for name, s in result.scores_KxC.items()}
    if "selected" in result.scores_KxC:
      notes += ["selected: " + line for line in attacks.select_lib.selection(
          result.observations).describe().splitlines()]
    sections.append(report.Section(
        scenario, result.challenge.phases, result.challenge.member_KxC,
        result.scores_KxC, None if result.epsilon_K is None else
        float(result.epsilon_K.max()), tuple(notes)))
    for phase, by_attack in result.metrics.items():
      models = (num_models if phase == "all" else
                result.challenge.phases.count(phase))
      log(f"[{scenario}] MICO scores, {phase}"
          f"{' phases pooled' if phase == 'all' else ' phase'}, over"
          f" {models} x {2 * task.len_challenge} challenge points:\n" +
          "".join(f"  {note}\n" for note in notes) +
          scoring.score_table(by_attack))
  if folder is None:
    return all_scores
  report.plot_roc(panels, folder.output("roc.png"),
                  title=f"{task.name}, {num_models} models")
  workdir.write_json(all_scores, folder.output("scores.json"))
  with open(folder.output("report.md"), "w") as f:
    f.write(report.markdown_report(
        sections, f"{task.name}, {num_models} models"))
  folder.publish()
  log(f"wrote {root}/scores.json, report.md, roc.png and bundle/")
  return all_scores


class _Terminal:
  """The user's terminal and the run's log file.

  Once `divert` is called, file descriptor 2 goes to the log: what libraries
  print on stderr (absl and orbax logs, tracebacks of background threads, XLA)
  lands there, and only this run's own lines reach the terminal.
  """

  def __init__(self):
    self.err: TextIO = sys.stderr
    self.log_file: TextIO | None = None
    self.log_path: str | None = None

  def divert(self, path: str) -> None:
    sys.stderr.flush()
    self.err = os.fdopen(os.dup(2), "w", buffering=1)
    self.log_file = open(path, "a", buffering=1)
    self.log_path = path
    os.dup2(self.log_file.fileno(), 2)
    self.log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: python"
                        f" -m experiments.run {' '.join(sys.argv[1:])}\n")

  def progress(self, message: str) -> None:
    print(message, flush=True)
    self.to_log(message + "\n")

  def say(self, message: str) -> None:
    """One line for the user on stderr (and in the log)."""
    print(message, file=self.err, flush=True)
    self.to_log(message + "\n")

  def to_log(self, text: str) -> None:
    """Best effort: a full disk must not hide the user's error line."""
    if self.log_file:
      try:
        self.log_file.write(text)
      except OSError:
        pass


# TensorStore (under orbax) reports a failed write as text with the errno.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def _system_error(e: BaseException) -> str:
  """One line for a fault outside our checks: an OS error if one caused it."""
  cause = e
  while cause is not None and not isinstance(cause, OSError):
    cause = cause.__cause__ or cause.__context__
  if isinstance(cause, OSError) and cause.strerror:
    where = f"{cause.filename}: " if cause.filename else ""
    return f"{where}{cause.strerror}"
  text = str(e).strip()
  code = _OS_ERROR_CODE.search(text)
  if code:
    path = _QUOTED_PATH.search(text)
    return (f"{path.group(1) + ': ' if path else ''}"
            f"{os.strerror(int(code.group(1)))}")
  return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _on_sigterm(signum, frame):
  del signum, frame
  raise KeyboardInterrupt("SIGTERM")


def main(argv):
  terminal = _Terminal()
  if len(argv) > 1:
    terminal.say(f"error: unexpected arguments {argv[1:]}")
    sys.exit(1)
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every step of every save at INFO.
    logging.set_verbosity(logging.WARNING)
  # A preempting scheduler sends SIGTERM: checkpoint as for Ctrl-C.
  signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    plan = _validate(terminal.progress)
    # Before any other JAX use: it decides which devices there are.
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                        _PROCESS_ID.value, _CPU_DEVICES.value)
    if not parallel.is_main_process():
      run(plan, None, log=lambda _: None)
      return
    with workdir.Workdir(_WORKDIR.value, _identity(plan),
                         checkpoint.code_version(),
                         must_exist=_ATTACKS_ONLY.value) as folder:
      terminal.divert(os.path.join(folder.path, workdir.LOG))
      for warning in plan.warnings:
        terminal.say(f"warning: {warning}")
      for note in folder.notes:
        terminal.progress(note)
      run(plan, folder, terminal.progress)
  except KeyboardInterrupt as e:
    terminal.say(f"error: interrupted{f' ({e})' if str(e) else ''}; rerun the"
                 " same command to continue (training resumes from its last"
                 " checkpoint)")
    sys.exit(128 + (signal.SIGTERM if str(e) == "SIGTERM" else signal.SIGINT))
  except _ONE_LINE_ERRORS as e:
    terminal.say(f"error: {e}")
    sys.exit(1)
  except Exception as e:  # pylint: disable=broad-except
    where = ""
    if terminal.log_path:
      terminal.to_log(traceback.format_exc())
      where = f" (details in {terminal.log_path})"
    terminal.say(f"error: {_system_error(e)}{where}")
    sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with its errors in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
