r"""DDP attacks against a reference budget: the same targets, 2 to R references.

  python -m experiments.ddp_budget --task=location --workdir=WORKDIR \
      --references=8 --budgets=2,4,8

Reuses the statistics a `python -m experiments.run --scenario=ddp
--ddp_references=R` run saved under `WORKDIR/ddp/trained/` (never trains;
same --seed, --num_models and sizes as that run). For each budget b, every
target keeps its first b references (whole complementary pairs for an even
b, so each challenge point stays IN for exactly b/2). Prints a Markdown table
of TPR@10%FPR, TPR@1%FPR and AUC over all targets pooled, per DDP attack and
budget (and, exploratory, the sum of the DDP and the plain calibrated_mid
scores), beside the run's plain attacks (scores.json), and writes the numbers
to `WORKDIR/ddp/ddp_budget.json`.

Also why: the spread of each target's statistic on its non-member challenge
points around their OUT mean, by its R references (twins but for the
challenge) and by the other targets as plain shadows, less the spread the
mean's own estimation adds (s^2 / count), averaged over all targets and
points. If the twins explain more of the target, this residual is smaller.
"""

import glob
import json
import os
import re
import sys

from absl import app
from absl import flags
import numpy as np

from mico_jax import challenge, ddp, scoring
from mico_jax.attacks import calibrated, shadows
from mico_jax.tasks import TASKS

_TASK = flags.DEFINE_enum("task", "location", sorted(TASKS), "MICO task.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The main job's --workdir.",
                               required=True)
_NUM_MODELS = flags.DEFINE_integer("num_models", None, "As the main job's.")
_SEED = flags.DEFINE_integer("seed", 0, "As the main job's.")
_REFERENCES = flags.DEFINE_integer("references", 8,
                                   "The run's --ddp_references.")
_BUDGETS = flags.DEFINE_list("budgets", ["2", "4", "8"], "Reference counts.")

_METRICS = (("TPR_FPR_1000", "TPR@10%"), ("TPR_FPR_100", "TPR@1%"),
            ("AUC", "AUC"))


def _stat(folder: str, prefix: str) -> np.ndarray:
  """`stat_KxNxA` of the saved waves `<prefix>_<a>-<b>.npz`, in order."""
  paths = glob.glob(os.path.join(folder, f"{prefix}_*.npz"))
  first = lambda p: int(re.search(r"_(\d+)-\d+\.npz$", p).group(1))
  if not paths:
    sys.exit(f"error: no {prefix}_*.npz under {folder}")
  stats = []
  for path in sorted(paths, key=first):
    with np.load(path) as f:
      stats.append(f["stat_KxNxA"])
  return np.concatenate(stats)


def _out_moments(out_stat_TxSxCxA, out_TxSxC):
  """Count, mean and ddof-1 variance over the OUT observations, per point."""
  w = out_TxSxC[..., None].astype(float)
  count = w.sum(1)
  mean = (w * out_stat_TxSxCxA).sum(1) / np.maximum(count, 1)
  var = (w * (out_stat_TxSxCxA - mean[:, None])**2).sum(1) / np.maximum(
      count - 1, 1)
  return count, mean, var


def main(argv):
  del argv
  task = TASKS[_TASK.value]
  folder = os.path.join(_WORKDIR.value, ddp.SCENARIO)
  target_stat = _stat(os.path.join(folder, "trained"), "models")
  ref_stat = _stat(os.path.join(folder, "trained"), "references")
  num_models = _NUM_MODELS.value or task.default_models
  targets = challenge.make_challenge(
      target_stat.shape[1], task.len_training, task.len_challenge,
      challenge.make_seeds(_SEED.value, num_models))
  refs = ddp.reference_challenge(targets, _REFERENCES.value, _SEED.value)
  if len(ref_stat) != refs.num_models or len(target_stat) != num_models:
    sys.exit(f"error: {len(target_stat)} targets and {len(ref_stat)}"
             f" references saved, expected {num_models} and"
             f" {refs.num_models}: other flags than the run's?")
  r = _REFERENCES.value
  table = {}
  # Exploratory: the references' and the plain shadows' calibrated scores
  # summed (each point's level, the mean of the two estimates).
  plain_mid = np.take_along_axis(np.asarray(calibrated.calibrated(
      target_stat, targets.keep_KxN, None, "mid")), targets.challenge_KxC, 1)
  for budget in map(int, _BUDGETS.value):
    rows = (np.arange(num_models)[:, None] * r + np.arange(budget)).ravel()
    scores = ddp.reference_scores(targets, target_stat, refs.select(rows),
                                  ref_stat[rows])
    scores["ddp_calibrated_mid + calibrated_mid"] = (
        scores["ddp_calibrated_mid"] + plain_mid)
    for name, s in scores.items():
      table.setdefault(name, {})[budget] = scoring.score(targets.member_KxC, s)
  # Why: residuals on the non-member challenge points (OUT for the target)
  # with 2 or more OUT references and shadows.
  idx, member = targets.challenge_KxC, targets.member_KxC
  stat_TxCxA = np.take_along_axis(target_stat, idx[..., None], 1)
  ref_TxRxCxA = np.take_along_axis(ref_stat.reshape(
      num_models, r, *ref_stat.shape[1:]), idx[:, None, :, None], 2)
  moments = shadows.loo_moments(target_stat, ~targets.keep_KxN)
  take = lambda a: np.take_along_axis(np.asarray(a), idx[..., None], 1)
  sides = {"references": _out_moments(
      ref_TxRxCxA, ~refs.member_KxC.reshape(num_models, r, -1)),
           "plain_shadows": (take(moments.count_KxNx1),
                             take(moments.mean_KxNxA),
                             take(moments.var_KxNxA))}
  points = ~member[..., None]
  for count, _, _ in sides.values():
    points = points & (count >= 2)
  residual = {name: float(((stat_TxCxA - mean)**2 - var / np.maximum(
      count, 1))[np.broadcast_to(points, stat_TxCxA.shape)].mean())
              for name, (count, mean, var) in sides.items()
              } if points.any() else None
  print("non-member residual variance around the OUT mean, less the mean's"
        " estimation error: " + (
            f"references {residual['references']:.4f}, plain shadows"
            f" {residual['plain_shadows']:.4f} ({int(points.sum())} points)"
            if residual else "no point with 2 or more OUT references"))
  # Noise: the TPR@10%FPR gain of the DDP calibrated score (largest
  # budget) over the plain one, resampling the targets (200 draws).
  gain = []
  rng = np.random.default_rng(0)
  for _ in range(200):
    rows = rng.integers(0, num_models, num_models)
    metric = lambda s: scoring.score(targets.member_KxC[rows],
                                     s[rows])["TPR_FPR_1000"]
    gain.append(metric(scores["ddp_calibrated_mid"]) - metric(plain_mid))
  low, high = np.percentile(gain, [2.5, 97.5])
  print(f"TPR@10%FPR gain of ddp_calibrated_mid (R={budget}) over plain"
        f" calibrated_mid, bootstrap over targets: {np.mean(gain):+.4f}"
        f" (95%: {low:+.4f} to {high:+.4f})")
  with open(os.path.join(_WORKDIR.value, "scores.json")) as f:
    plain = json.load(f)[ddp.SCENARIO]["all"]
  budgets = list(map(int, _BUDGETS.value))
  print("| attack | " + " | ".join(
      f"{label} R={b}" for b in budgets for _, label in _METRICS) + " |")
  print("|---|" + "---|" * (len(budgets) * len(_METRICS)))
  for name, per_budget in table.items():
    print(f"| {name} | " + " | ".join(
        f"{per_budget[b][key]:.4f}" for b in budgets for key, _ in _METRICS)
          + " |")
  for name, m in plain.items():
    if not name.startswith(ddp.ddp_attacks.PREFIX):
      print(f"| {name} (plain, {num_models - 1} shadows) | " + " | ".join(
          f"{m[key]:.4f}" for _ in budgets for key, _ in _METRICS) + " |")
  with open(os.path.join(folder, "ddp_budget.json"), "w") as f:
    json.dump({"budgets": budgets, "ddp": table, "plain": plain,
               "residual": residual,
               "gain_calibrated_mid": [float(low), float(high)]}, f,
              indent=1)


if __name__ == "__main__":
  app.run(main)
