r"""MICO's CodaLab scoring program: `python -m mico_jax.score_codalab IN OUT`.

Reads the layout of MICO's `scoring/score.py`:

  IN/ref/<task>/<scenario>/<phase>/model_<i>/solution.csv   (one phase per
      scenario, dev or final; one task)
  IN/res/<task>/<scenario>/<phase>/model_<i>/prediction.csv (the same
      scenarios; every phase the submission holds)

scores each scenario over all its models' challenge points concatenated
(`scoring.score`) and writes OUT/scores.txt as MICO does — for the scenarios
in sorted order, `scenario<j>_<metric>: <value>` lines (AUC, MIA, accuracy,
then TPR_FPR_10 ... TPR_FPR_2000), then `average_TPR_FPR_1000` (the ranking:
TPR at 10% FPR averaged over scenarios) — and OUT/scores.html, the same as a
table. Both csv forms are read (`challenge.read_values`).

Unlike MICO's scorer (asserts), bad input is one line on stderr naming the
file, exit status 1, and nothing written: predictions missing, unreadable,
NaN, outside [0, 1] or of another length than the solutions.
"""

import html
import os
import sys
from typing import Sequence

import numpy as np

from mico_jax import challenge, scoring

# MICO's order in scores.txt (its set {"AUC", "MIA", "accuracy"} iterates in
# a hash-dependent order; this is one of them, fixed).
_SUMMARY = ("AUC", "MIA", "accuracy")
_TPR = tuple(k for k in scoring.METRIC_KEYS if k.startswith("TPR_FPR_"))


class ScoringError(ValueError):
  """Input the scorer refuses; the message names the file."""


def _only_dir(path: str, what: str) -> str:
  entries = sorted(e for e in os.listdir(path)
                   if os.path.isdir(os.path.join(path, e)))
  if len(entries) != 1:
    raise ScoringError(f"{path}: expected one {what} folder, found {entries}")
  return entries[0]


def _models(folder: str) -> list[str]:
  models = [e for e in os.listdir(folder)
            if e.startswith("model_") and e[6:].isdigit()]
  if not models:
    raise ScoringError(f"{folder}: no model_<i> folders")
  return sorted(models, key=lambda e: int(e[6:]))


def read_scenario(ref: str, res: str, scenario: str
                  ) -> tuple[str, np.ndarray, np.ndarray]:
  """One scenario's phase, solutions and predictions (all models concatenated).

  Raises:
    ScoringError: a missing or bad file, named.
  """
  phase = _only_dir(os.path.join(ref, scenario), "phase")
  if phase not in ("dev", "final"):
    raise ScoringError(f"{os.path.join(ref, scenario)}: phase must be dev or"
                       f" final, got {phase!r}")
  solutions, predictions = [], []
  for model in _models(os.path.join(ref, scenario, phase)):
    solution_path = os.path.join(ref, scenario, phase, model, "solution.csv")
    prediction_path = os.path.join(res, scenario, phase, model,
                                   "prediction.csv")
    if not os.path.isfile(prediction_path):
      raise ScoringError(f"{prediction_path}: missing")
    try:
      solution = challenge.read_values(solution_path)
      prediction = challenge.read_values(prediction_path)
    except challenge.ChallengeError as e:
      raise ScoringError(str(e)) from None
    if prediction.shape != solution.shape:
      raise ScoringError(f"{prediction_path}: {prediction.size} predictions"
                         f" for {solution.size} challenge points")
    if np.isnan(prediction).any():
      raise ScoringError(f"{prediction_path}: NaN predictions")
    if ((prediction < 0) | (prediction > 1)).any():
      raise ScoringError(f"{prediction_path}: predictions outside [0, 1]")
    solutions.append(solution)
    predictions.append(prediction)
  return phase, np.concatenate(solutions), np.concatenate(predictions)


def score_submission(in_dir: str) -> dict[str, dict[str, object]]:
  """`{scenario: {"phase": ..., metric: value}}`, scenarios sorted.

  Raises:
    ScoringError: the layout or a file is wrong (named).
  """
  ref, res = os.path.join(in_dir, "ref"), os.path.join(in_dir, "res")
  for path in (ref, res):
    if not os.path.isdir(path):
      raise ScoringError(f"{path}: missing")
  task = _only_dir(ref, "task")
  ref, res = os.path.join(ref, task), os.path.join(res, task)
  if not os.path.isdir(res):
    raise ScoringError(f"{res}: missing (predictions for task {task})")
  scenarios = sorted(e for e in os.listdir(ref)
                     if os.path.isdir(os.path.join(ref, e)))
  if not scenarios:
    raise ScoringError(f"{ref}: no scenario folders")
  found = sorted(e for e in os.listdir(res)
                 if os.path.isdir(os.path.join(res, e)))
  if found != scenarios:
    raise ScoringError(f"{res}: scenarios {found}, expected {scenarios}")
  results = {}
  for scenario in scenarios:
    phase, solutions, predictions = read_scenario(ref, res, scenario)
    try:
      metrics = scoring.score(solutions, predictions)
    except ValueError as e:
      raise ScoringError(f"{os.path.join(ref, scenario, phase)}: {e}") from None
    results[scenario] = {"phase": phase, **metrics}
  return results


def scores_txt(results: dict[str, dict[str, object]]) -> str:
  """MICO's scores.txt for `score_submission`'s results."""
  lines = []
  for j, metrics in enumerate(results.values(), start=1):
    lines += [f"scenario{j}_{key}: {metrics[key]!r}" for key in _SUMMARY + _TPR]
  average = float(np.mean([m["TPR_FPR_1000"] for m in results.values()]))
  lines.append(f"average_TPR_FPR_1000: {average!r}")
  return "\n".join(lines) + "\n"


def scores_html(results: dict[str, dict[str, object]]) -> str:
  """A readable page: one row per scenario, one column per metric."""
  keys = _TPR + _SUMMARY
  head = "".join(f"<th>{html.escape(k)}</th>" for k in
                 ("scenario", "phase") + keys)
  rows = []
  for j, (scenario, metrics) in enumerate(results.items(), start=1):
    cells = [f"scenario{j}: {scenario}", str(metrics["phase"])]
    cells += [f"{metrics[k]:.4f}" for k in keys]
    rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                + "</tr>")
  average = np.mean([m["TPR_FPR_1000"] for m in results.values()])
  return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
          "<title>MICO scores</title><style>td, th {padding: 2px 8px;"
          " text-align: right}</style></head><body>\n<h1>MICO scores</h1>\n"
          f"<p>Ranking score (TPR at FPR 0.1, averaged over scenarios):"
          f" <b>{average:.4f}</b></p>\n<table>\n<tr>{head}</tr>\n"
          + "\n".join(rows) + "\n</table>\n</body></html>\n")


def _write(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def main(argv: Sequence[str]) -> int:
  if len(argv) != 2:
    print("usage: python -m mico_jax.score_codalab <input dir holding ref/ and"
          " res/> <output dir>", file=sys.stderr)
    return 2
  in_dir, out_dir = argv
  try:
    results = score_submission(in_dir)
  except (ScoringError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  os.makedirs(out_dir, exist_ok=True)
  _write(os.path.join(out_dir, "scores.html"), scores_html(results))
  _write(os.path.join(out_dir, "scores.txt"), scores_txt(results))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
