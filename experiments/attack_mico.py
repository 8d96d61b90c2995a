r"""Attack a MICO release: its models, fresh shadows to its recipe, a zip.

  python -m experiments.attack_mico --task=purchase100 \
      --mico_dir=DIR --data_dir=DATA --workdir=W [--fresh_shadows=256]

`DIR` holds `<task>_inf`, `<task>_hi`, `<task>_lo` (any subset; `<task>_ddp`
too), each with `{train,dev,final}/model_<i>/` as MICO released them. Every
model of every scenario is a target: one batched pass gives its statistics on
the pool, every attack scores its challenge points. Shadows (`--shadows`):
`provided` = the revealed `train` models (a train model scored as a target is
left out of its own shadows), `fresh` = `--fresh_shadows` models trained here
to the task's MICO recipe, each with every challenge point of every target IN
with probability 1/2 and exactly n training points, or `both`. For
`<task>_ddp`, whose models all reveal `seed_training`, the `ddp_*` attacks
score each target also by `--ddp_references` reference models trained (to the
`lo` recipe) on its revealed training set plus half of its challenge points
(`mico_jax.ddp`), beside the plain attacks. Targets are read
`--models_per_read` at a time (`mico_io.observe_release`): only their
statistics are kept, so MICO's SST-2 scenarios (200 RoBERTa-base models,
~100 GB of weights) import in a few GB of memory.

Writes, under --workdir:
  submission.zip       MICO's layout: <task>/<task>_<s>/{dev,final}/model_<i>/
                       prediction.csv (scores of --submit_attack in [0, 1])
  predictions/         the same files, unzipped
  scores.json          {scenario: {phase: {attack: {MICO metric: value}}}} for
                       every phase whose solutions are known (train: local
                       validation; dev/final with --solutions_dir)
  roc.png, report.md   ROC curves; tables, shadows used and the recipe check
  <s>/targets/         the targets' statistics, a file per group of
                       --models_per_read models (reused while model files,
                       data, queries and code match)
  <s>/trained/         fresh shadows' params and statistics (reused)
The recipe check sets fresh shadows' train/eval accuracy and mean IN - OUT
statistic gap beside the targets' and warns when they differ beyond noise.
Everything is validated and computed first; the files are written at the end,
each atomically.
"""

import dataclasses
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from mico_jax import attacks, challenge, checkpoint, data, ddp, dp, mico_io
from mico_jax import parallel, pipeline, pretrained, report, scoring, stats
from mico_jax import tasks
from mico_jax.tasks import TASKS

_TASK = flags.DEFINE_enum("task", None, sorted(TASKS), "MICO task.")
_MICO_DIR = flags.DEFINE_string(
    "mico_dir", None, "Folder holding <task>_inf, <task>_hi, <task>_lo (any"
    " subset), as MICO released them.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder with the task's data files (see"
    " experiments.run --helpfull).")
_PRETRAINED_DIR = flags.DEFINE_string(
    "pretrained_dir", None, "Task sst2: the RoBERTa folder MICO fine-tuned"
    " from (roberta-base): its tokenizer encodes the pool, its config must"
    " be the release's and fresh shadows start from its weights.")
_SOLUTIONS_DIR = flags.DEFINE_string(
    "solutions_dir", None, "Optional folder laid out as --mico_dir with"
    " solution.csv of dev/final models (CodaLab's ref/<task>), to score them.")
_FRESH = flags.DEFINE_integer(
    "fresh_shadows", 256, "Shadow models to train to the task's recipe per"
    " scenario; 0: only the provided train models.", lower_bound=0)
_SHADOWS = flags.DEFINE_enum(
    "shadows", None, ["provided", "fresh", "both"], "Which shadows the"
    " attacks use; default: fresh if --fresh_shadows > 0, else provided.")
_SCENARIOS = flags.DEFINE_list(
    "scenario", None, "Scenarios to attack (default: every one found).")
_EPOCHS = flags.DEFINE_integer(
    "epochs", None, "Override the recipe's epochs for fresh shadows (a"
    " deliberate mismatch: the recipe check will flag it).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the fresh shadows.")
_ATTACKS = flags.DEFINE_list("attacks", list(attacks.ATTACKS),
                             "Attacks to run.")
_SUBMIT = flags.DEFINE_string(
    "submit_attack", "lira_online", "Attack whose scores are submitted.")
_DDP_REFERENCES = flags.DEFINE_integer(
    "ddp_references", 8, "<task>_ddp: reference models per target on its"
    " revealed training set (see experiments.run --helpfull).", lower_bound=2)
_PER_READ = flags.DEFINE_integer(
    "models_per_read", 0, "Targets read and observed at once (their weights"
    " and a statistics batch's activations held together); 0: as many as"
    f" fit in {mico_io.READ_BUDGET_BYTES / 2**30:g} GiB of weights (4"
    f" roberta-base models), at most {mico_io.MAX_MODELS_PER_READ}.",
    lower_bound=0)
_WAVE_SIZE = flags.DEFINE_integer(
    "wave_size", None, "Fresh shadows trained at once (default: the task's).",
    lower_bound=0)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "CPU devices to shard the fresh shadows over, as"
    " experiments.run's flag (default: one a core).", lower_bound=1)

# Differences larger than this many standard errors are flagged.
_NOISE_SE = 3.0


class UserError(Exception):
  """A problem with the flags, reported in one line."""


def fresh_challenge(release: mico_io.ScenarioRelease, num_models: int,
                    len_training: int, seed: int) -> challenge.Challenge:
  """Splits of fresh shadows: each target challenge point IN for half of them.

  Each shadow trains on exactly n points (so its steps per epoch match the
  recipe): a random half of the union U of every target's challenge points
  (fewer if n is smaller), first, then random other points; the rest of the
  pool is its evaluation set. MICO puts each model's m member challenges
  first in its (unshuffled) order; a shadow's IN points of U come first too,
  but are more than m.
  """
  pool = release.challenge.pool_size
  union = np.unique(release.challenge.challenge_KxC)
  others = np.setdiff1d(np.arange(pool), union)
  take = min(len(union) // 2, len_training)
  take = max(take, len_training - len(others))
  seeds_Kx3 = challenge.make_seeds(seed, num_models)
  train, evaluation = [], []
  for seeds in seeds_Kx3:
    rng = np.random.default_rng([int(s) for s in seeds])
    chosen = np.concatenate([rng.permutation(union)[:take],
                             rng.permutation(others)[:len_training - take]])
    train.append(chosen)
    evaluation.append(np.setdiff1d(np.arange(pool), chosen))
  empty = np.zeros((num_models, 0), np.int64)
  return challenge.Challenge(pool, seeds_Kx3, empty, empty.astype(bool),
                             np.stack(train), np.stack(evaluation),
                             ("train",) * num_models)


def _accuracy(correct_KxN, mask_KxN):
  return (correct_KxN * mask_KxN).sum(1) / np.maximum(mask_KxN.sum(1), 1)


def _compare(name, target_values, shadow_values):
  """A line setting shadows beside targets; a warning beyond noise."""
  t, s = np.asarray(target_values), np.asarray(shadow_values)
  if not t.size or not s.size:
    return f"{name}: not comparable (no targets with known splits)", False
  se = np.sqrt(sum(v.var(ddof=1) / v.size for v in (t, s) if v.size > 1))
  differs = abs(t.mean() - s.mean()) > _NOISE_SE * se + 1e-9
  line = (f"{name}: targets {t.mean():.4f} (n={t.size}), fresh shadows"
          f" {s.mean():.4f} (n={s.size}), difference"
          f" {s.mean() - t.mean():+.4f} ± {se:.4f} (1 s.e.)")
  if differs:
    line = "WARNING: " + line + " — beyond noise: the recipe may differ"
  return line, differs


def recipe_check(release, target_stats, shadow_challenge, shadow_stats):
  """Lines comparing the fresh shadows with the targets (see `_compare`)."""
  known = release.training_known_K
  lines = []
  chal = release.challenge
  rows = np.flatnonzero(release.membership_known_K)
  stat_t = target_stats.stat_KxNxA[..., 0]
  gap_t = [stat_t[k, chal.challenge_KxC[k][chal.member_KxC[k]]].mean() -
           stat_t[k, chal.challenge_KxC[k][~chal.member_KxC[k]]].mean()
           for k in rows]
  union = np.unique(chal.challenge_KxC)
  keep_s = shadow_challenge.keep_KxN[:, union]
  stat_s = shadow_stats.stat_KxNxA[:, union, 0]
  gap_s = ((stat_s * keep_s).sum(1) / keep_s.sum(1) -
           (stat_s * ~keep_s).sum(1) / (~keep_s).sum(1))
  for name, t, s in (
      ("train accuracy", _accuracy(target_stats.correct_KxN,
                                   chal.keep_KxN)[known],
       _accuracy(shadow_stats.correct_KxN, shadow_challenge.keep_KxN)),
      ("eval accuracy", _accuracy(target_stats.correct_KxN,
                                  chal.eval_mask_KxN)[known],
       _accuracy(shadow_stats.correct_KxN, shadow_challenge.eval_mask_KxN)),
      ("mean IN - OUT statistic", gap_t, gap_s)):
    lines.append(_compare(name, t, s))
  return lines


def ddp_scores(task, release, model, dataset, queries, target_stats, workdir,
               log):
  """DDP: every target scored by references on its revealed training set.

  Returns `{ddp_<attack>: score_KxC}` and a line describing the references.
  """
  hidden = [f for f in release.folders
            if not os.path.exists(os.path.join(f, "seed_training"))]
  if hidden:
    raise UserError(f"{hidden[0]}: no seed_training: the DDP attacks need"
                    " every model's training set revealed")
  config = task.scenarios[ddp.RECIPE]
  if _EPOCHS.value:
    config = dataclasses.replace(config, epochs=_EPOCHS.value)
  execution = pipeline.Execution(
      wave_size=task.wave_size if _WAVE_SIZE.value is None
      else _WAVE_SIZE.value, directory=os.path.join(workdir, release.scenario),
      unroll=task.unroll)
  return ddp.attack(release.challenge, target_stats.stat_KxNxA, model, config,
                    dataset, queries, _DDP_REFERENCES.value, _SEED.value,
                    execution, log)


@dataclasses.dataclass
class ScenarioOutcome:
  release: mico_io.ScenarioRelease
  scores_KxC: dict[str, np.ndarray]
  metrics: dict[str, dict[str, dict[str, float]]]  # phase -> attack -> MICO
  shadows: str
  check: list[tuple[str, bool]]


def attack_scenario(task, scenario, folder, dataset, queries, workdir,
                    log) -> ScenarioOutcome:
  """Imports one scenario, trains fresh shadows, runs every attack."""
  solutions = _SOLUTIONS_DIR.value and os.path.join(
      _SOLUTIONS_DIR.value, os.path.basename(folder))
  release = mico_io.read_scenario(folder, scenario, len(dataset),
                                  task.len_training, task.len_challenge,
                                  solutions)
  model = task.make_model(dataset.num_classes)
  log(f"[{release.name}] statistics of {len(release.folders)} targets on"
      f" {len(dataset)} points x {len(queries)} queries")
  target_stats = mico_io.observe_release(
      release, model, dataset, queries, models_per_read=_PER_READ.value,
      cache_dir=os.path.join(workdir, scenario, "targets"), log=log)
  ddp_only, ddp_note = (ddp_scores(task, release, model, dataset, queries,
                                   target_stats, workdir, log)
                        if scenario == ddp.SCENARIO else ({}, None))
  num_targets = release.challenge.num_models
  mode = _SHADOWS.value or ("fresh" if _FRESH.value else "provided")
  stat, loss, keep = (target_stats.stat_KxNxA, target_stats.loss_KxNxA,
                      release.keep_KxN)
  provided_K = np.array([p == "train" for p in release.phases]
                        ) & release.training_known_K
  shadow_K = provided_K if mode in ("provided", "both") else np.zeros(
      num_targets, bool)
  check = []
  if _FRESH.value and mode != "provided":
    config = task.scenarios["lo" if scenario == "ddp" else scenario]
    if _EPOCHS.value:
      config = dataclasses.replace(config, epochs=_EPOCHS.value)
    shadow_challenge = fresh_challenge(release, _FRESH.value,
                                       task.len_training, _SEED.value)
    log(f"[{release.name}] {_FRESH.value} fresh shadows, {config.epochs}"
        f" epochs, batch {config.batch_size}, {config.optimizer} lr"
        f" {config.learning_rate}" + (f", DP-SGD to epsilon"
                                      f" {config.dp.epsilon}" if config.dp
                                      else ""))
    execution = pipeline.Execution(
        wave_size=task.wave_size if _WAVE_SIZE.value is None
        else _WAVE_SIZE.value, directory=os.path.join(workdir, scenario),
        unroll=task.unroll)
    shadow_stats = pipeline.train_in_waves(
        model, config, dataset, shadow_challenge, queries, execution,
        "shadows", log)[1]
    check = recipe_check(release, target_stats, shadow_challenge,
                         shadow_stats)
    for line, _ in check:
      log(f"[{release.name}] recipe check: {line}")
    stat = np.concatenate([stat, shadow_stats.stat_KxNxA])
    loss = np.concatenate([loss, shadow_stats.loss_KxNxA])
    keep = np.concatenate([keep, shadow_challenge.keep_KxN])
    shadow_K = np.concatenate([shadow_K, np.ones(_FRESH.value, bool)])
  if not shadow_K.any():
    raise UserError(f"{folder}: no shadow models (no train models with"
                    " revealed splits, and --fresh_shadows=0)")
  observations = attacks.Observations(stat, loss, keep, shadow_K)
  scores = pipeline.attack_scores(observations, release.challenge,
                                  _ATTACKS.value)
  scores.update(ddp_only)
  metrics = {}
  for phase in challenge.PHASES:
    rows = np.flatnonzero((np.array(release.phases) == phase) &
                          release.membership_known_K)
    member = release.challenge.member_KxC[rows]
    if rows.size and member.any() and not member.all():
      metrics[phase] = {name: scoring.score(member, s[rows])
                        for name, s in scores.items()}
  shadows = {"provided": f"{provided_K.sum()} provided train models",
             "fresh": f"{_FRESH.value} fresh shadows",
             "both": f"{provided_K.sum()} provided + {_FRESH.value} fresh"}
  return ScenarioOutcome(release, scores, metrics, shadows[mode] + (
      f"; {ddp_note}" if ddp_note else ""), check)


def write_report(path, task, outcomes, seconds):
  lines = [f"# {task.name}: attack on a MICO release", "",
           f"Command: `python -m experiments.attack_mico "
           f"{' '.join(sys.argv[1:])}` ({seconds:.0f} s)", ""]
  for scenario, out in outcomes.items():
    counts = ", ".join(f"{p}: {out.release.phases.count(p)}"
                       for p in challenge.PHASES)
    lines += [f"## {out.release.name}", "",
              f"{out.release.challenge.num_models} targets ({counts});"
              f" shadows: {out.shadows}.", ""]
    if out.check:
      lines += ["Recipe check:", ""] + [f"- {line}" for line, _ in out.check]
      lines.append("")
    if not out.metrics:
      lines += ["No phase with known solutions: nothing scored.", ""]
    else:
      lines += ["| phase | attack | TPR@10%FPR | TPR@1%FPR | TPR@0.1%FPR"
                " | AUC |", "|---|---|---|---|---|---|"]
      for phase, per_attack in out.metrics.items():
        for attack, m in per_attack.items():
          lines.append(f"| {phase} | {attack} | {m['TPR_FPR_1000']:.3f} |"
                       f" {m['TPR_FPR_100']:.3f} | {m['TPR_FPR_10']:.3f} |"
                       f" {m['AUC']:.3f} |")
      lines.append("")
  mico_io.atomic_write(path, lambda f: f.write("\n".join(lines)))


def run(log=print) -> dict:
  """Attacks every scenario found; writes the outputs; returns scores."""
  for name, flag in (("task", _TASK), ("mico_dir", _MICO_DIR),
                     ("workdir", _WORKDIR)):
    if flag.value is None:
      raise UserError(f"--{name} is required")
  if _SUBMIT.value not in _ATTACKS.value:
    raise UserError(f"--submit_attack={_SUBMIT.value} is not among --attacks")
  unknown = set(_ATTACKS.value) - set(attacks.ATTACKS)
  if unknown:
    raise UserError(f"--attacks: unknown {sorted(unknown)}; known"
                    f" {sorted(attacks.ATTACKS)}")
  if _SHADOWS.value in ("fresh", "both") and not _FRESH.value:
    raise UserError(f"--shadows={_SHADOWS.value} needs --fresh_shadows > 0")
  start = time.perf_counter()
  task = TASKS[_TASK.value]
  if _PRETRAINED_DIR.value:
    task = tasks.with_pretrained(task, _PRETRAINED_DIR.value)
  workdir = os.path.abspath(_WORKDIR.value)
  found = mico_io.find_scenarios(_MICO_DIR.value, task.name)
  if _SCENARIOS.value:
    if missing := [s for s in _SCENARIOS.value if s not in found]:
      raise UserError(f"--scenario: {missing[0]} not found in"
                      f" {_MICO_DIR.value} (found {sorted(found)})")
    found = {s: found[s] for s in _SCENARIOS.value}
  os.makedirs(workdir, exist_ok=True)
  # Stale results would look like this run's if it stopped early.
  for name in ("scores.json", "submission.zip", "report.md"):
    if os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))
  log(f"loading {task.name}")
  dataset = task.load(_DATA_DIR.value)
  data.require_mico_order(dataset)
  queries = stats.default_queries(dataset)
  outcomes = {s: attack_scenario(task, s, folder, dataset, queries, workdir,
                                 log) for s, folder in found.items()}
  # Outputs, each written atomically, once everything is computed.
  predictions = {}
  for scenario, out in outcomes.items():
    unit = scoring.to_unit_interval(out.scores_KxC[_SUBMIT.value])
    for k, (phase, index) in enumerate(zip(out.release.phases,
                                           out.release.indices)):
      if phase in mico_io.SUBMITTED_PHASES:
        predictions[mico_io.entry_name(task.name, scenario, phase,
                                       index)] = unit[k]
  length = 2 * task.len_challenge
  zip_path = os.path.join(workdir, "submission.zip")
  if predictions:
    mico_io.write_submission(zip_path, predictions, length,
                             os.path.join(workdir, "predictions"))
    # Validation: read back what a scorer will read.
    mico_io.check_submission_covers(
        mico_io.read_submission(zip_path, length), list(predictions),
        zip_path)
    log(f"wrote {zip_path}: {len(predictions)} prediction files, validated")
  else:
    log("no dev/final models: no submission written")
  all_scores = {s: out.metrics for s, out in outcomes.items()}
  panels = {}
  for scenario, out in outcomes.items():
    for phase in out.metrics:
      rows = np.array(out.release.phases) == phase
      panels[f"{scenario} {phase}"] = {
          name: (out.release.challenge.member_KxC[rows], s[rows])
          for name, s in out.scores_KxC.items()}
      log(f"[{out.release.name}] {phase}:\n" +
          scoring.score_table(out.metrics[phase]))
  if panels:
    report.plot_roc(panels, os.path.join(workdir, "roc.png"),
                    title=task.name)
  write_report(os.path.join(workdir, "report.md"), task, outcomes,
               time.perf_counter() - start)
  mico_io.write_json(all_scores, os.path.join(workdir, "scores.json"))
  log(f"wrote {workdir}/scores.json, report.md" + (", roc.png"
                                                   if panels else ""))
  return all_scores


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    parallel.initialize(cpu_devices=_CPU_DEVICES.value)
    run()
  except (UserError, mico_io.MicoIOError, data.DataError,
          challenge.ChallengeError, checkpoint.CheckpointError,
          dp.DPError, pretrained.FolderError, parallel.ParallelError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
