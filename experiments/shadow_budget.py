r"""Attacks against a shadow budget: the same targets, 4 to 128 shadows.

  python -m experiments.shadow_budget --task=location --data_dir=../shared/data \
      --workdir=WORKDIR --scenario=inf

Reuses the models and statistics a main-job run saved under
`WORKDIR/<scenario>/trained/` (never trains). The targets are fixed, MICO's
`final` phase (the last 50 models of 200); the shadows are the first S of the
other models, for each S of --budgets. Each attack sees only those shadows'
membership, selection included (it validates on them). With --whitebox,
the white-box statistics (`mico_jax/whitebox.py`, saved to
`WORKDIR/<scenario>/whitebox.npz`) add LiRA on each of them and a selection
whose candidates and combination include those. Prints a Markdown
table of TPR@10%FPR (TPR@1%FPR) per attack and budget, and writes the
numbers to `WORKDIR/<scenario>/shadow_budget.json`.
"""

import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

from mico_jax import attacks, checkpoint, data, scoring, stats, whitebox
from mico_jax.attacks import lira, select
from mico_jax.pipeline import Execution, run_scenario
from mico_jax.tasks import TASKS

_TASK = flags.DEFINE_enum("task", "location", sorted(TASKS), "MICO task.")
_SCENARIO = flags.DEFINE_string("scenario", "inf", "Scenario.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The main job's --workdir.",
                               required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "As the main job's.")
_NUM_MODELS = flags.DEFINE_integer("num_models", None, "As the main job's.")
_SEED = flags.DEFINE_integer("seed", 0, "As the main job's.")
_BUDGETS = flags.DEFINE_list("budgets", ["4", "8", "16", "32", "64", "128"],
                             "Shadow counts.")
_ATTACKS = flags.DEFINE_list(
    "attacks", ["lira_online", "lira_online_eb", "lira_online_fixed_var",
                "lira_online_reference", "lira_offline_reference",
                "rmia_online", "rmia_offline", "calibrated_mid", "combined",
                "selected"], "Attacks to compare.")
_WHITEBOX = flags.DEFINE_bool("whitebox", False, "Add white-box statistics.")
_WHITEBOX_LR = flags.DEFINE_float("whitebox_lr", 0.5,
                                  "SGD step of the one-step loss change.")


def _whitebox_stats(result, task, dataset, path):
  if os.path.exists(path):
    with np.load(path) as f:
      return whitebox.WhiteboxStats(*(f[k] for k in
                                      whitebox.WhiteboxStats._fields))
  model = task.make_model(dataset.num_classes)
  out = whitebox.compute_whitebox(model.apply, result.params, dataset.x,
                                  dataset.y, _WHITEBOX_LR.value)
  np.savez(path, **out._asdict())
  return out


def _whitebox_scores(obs, wb):
  """LiRA (plain and shrunk variance) on each white-box statistic."""
  scores = {}
  for stat_name, stat in (("grad", wb.neg_log_grad_norm_KxNx1),
                          ("drop", wb.neg_loss_drop_KxNx1)):
    for name, prior_df in (("lira_online", 0.0), ("lira_online_eb",
                                                  attacks.EB_PRIOR_DF)):
      scores[f"{name}@{stat_name}"] = np.asarray(lira.lira_online(
          stat, obs.keep_KxN, obs.shadow_K, prior_df=prior_df))
  return scores


def main(argv):
  del argv
  task = TASKS[_TASK.value]
  num_models = _NUM_MODELS.value or task.default_models
  dataset = task.load(_DATA_DIR.value)
  try:
    result = run_scenario(
        task, task.scenarios[_SCENARIO.value], dataset, num_models,
        _SEED.value, ["loss"], stats.default_queries(dataset), log=None,
        execution=Execution(directory=os.path.join(_WORKDIR.value,
                                                   _SCENARIO.value),
                            reuse_only=True))
  except (checkpoint.CheckpointError, data.DataError) as e:
    sys.exit(f"error: {e}")
  obs, ch = result.observations, result.challenge
  wb = (_whitebox_stats(result, task, dataset, os.path.join(
      _WORKDIR.value, _SCENARIO.value, "whitebox.npz"))
        if _WHITEBOX.value else None)
  names = list(_ATTACKS.value)
  targets = np.flatnonzero(np.asarray(ch.phases) == "final")
  others = np.flatnonzero(np.asarray(ch.phases) != "final")
  table = {}
  for budget in map(int, _BUDGETS.value):
    if budget > len(others):
      print(f"skipping {budget} shadows: only {len(others)} non-targets")
      continue
    shadow = np.zeros(num_models, bool)
    shadow[others[:budget]] = True
    obs_s = obs._replace(shadow_K=shadow)
    scores = {name: np.asarray(attacks.ATTACKS[name](obs_s))
              for name in _ATTACKS.value}
    if wb is not None:
      extra = _whitebox_scores(obs_s, wb)
      sel = select.select(obs_s, {**select.score_candidates(obs_s), **extra},
                          features=select.COMBINED_FEATURES + tuple(extra))
      scores.update(extra, **{"selected+whitebox": sel.score_KxN})
      print(f"{budget} shadows, with white-box: " +
            sel.choices[0]._asdict().__repr__())
    names = list(scores)
    row = {name: scoring.score(
        ch.member_KxC[targets],
        score[targets[:, None], ch.challenge_KxC[targets]])
           for name, score in scores.items()}
    table[budget] = row
    chosen = attacks.select_lib.selection(obs_s).choices[0]
    print(f"{budget} shadows: selected {chosen.attack} (validation"
          f" {chosen.validation:.4f}); " + ", ".join(
              f"{n} {m['TPR_FPR_1000']:.4f}" for n, m in row.items()),
          flush=True)
    row["selected"]["choice"] = chosen.attack
  print("\n| shadows | " + " | ".join(names) + " |")
  print("|---" * (len(names) + 1) + "|")
  for budget, row in table.items():
    print(f"| {budget} | " + " | ".join(
        f"{row[n]['TPR_FPR_1000']:.4f} ({row[n]['TPR_FPR_100']:.4f})"
        for n in names) + " |")
  with open(os.path.join(_WORKDIR.value, _SCENARIO.value,
                         "shadow_budget.json"), "w") as f:
    json.dump({str(b): r for b, r in table.items()}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
