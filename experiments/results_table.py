r"""Markdown tables of recorded main-job runs, from their JSON files alone.

  python -m experiments.results_table [experiments/results]

Every `scores.json` under the folder (a main job's `--workdir`, copied without
its bundle) gives one table row per scenario, phase and attack; the scenario's
`<scenario>/run.json` beside it gives the command, sizes and accuracies.
Phases are MICO's `dev` and `final`, scored apart, and `all` (every model
pooled; the only number of runs recorded before scores.json had phases).
Output: markdown on stdout.
"""

import glob
import json
import os
import sys

SCENARIO_ORDER = ("inf", "hi", "lo")
PHASES = ("dev", "final", "all")
# MICO's keys: TPR at FPR 10% and 1%, and AUC.
METRICS = (("TPR_FPR_1000", "TPR@10%FPR"), ("TPR_FPR_100", "TPR@1%FPR"),
           ("AUC", "AUC"))


def load_runs(root: str) -> list[dict]:
  """One record per (scores.json, scenario): run.json plus its `scores`."""
  runs = []
  for path in sorted(glob.glob(os.path.join(root, "**", "scores.json"),
                               recursive=True)):
    with open(path) as f:
      scores = json.load(f)
    for scenario, by_attack in scores.items():
      run_path = os.path.join(os.path.dirname(path), scenario, "run.json")
      if not os.path.exists(run_path):
        # A results folder copied without its run records: say so, go on.
        print(f"{os.path.relpath(path, root)}: no {scenario}/run.json beside"
              " it; its scores are left out", file=sys.stderr)
        continue
      with open(run_path) as f:
        run = json.load(f)
      # Older scores.json: {attack: metrics}, over all models pooled.
      if set(by_attack) - {"audit"} <= set(PHASES):
        run["scores"] = by_attack
      else:
        run["scores"] = {"all": {k: v for k, v in by_attack.items()
                                 if k != "audit"}}
        if "audit" in by_attack:
          run["scores"]["audit"] = by_attack["audit"]
      run["path"] = os.path.relpath(path, root)
      runs.append(run)
  order = {s: i for i, s in enumerate(SCENARIO_ORDER)}
  return sorted(runs, key=lambda r: (r["task"], order.get(r["scenario"], 9)))


def _epsilon(run: dict) -> str:
  return "∞" if run["epsilon"] is None else f"{run['epsilon']:.2f}"


def markdown(runs: list[dict]) -> str:
  """A setup table and a scores table per task."""
  lines = []
  for task in dict.fromkeys(r["task"] for r in runs):
    task_runs = [r for r in runs if r["task"] == task]
    lines += [f"### {task}", "",
              "| scenario | K | pool N | n | m | epochs | batch | train acc |"
              " eval acc | ε spent | time (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in task_runs:
      c = r["config"]
      lines.append(
          f"| {r['scenario']} | {r['num_models']} | {r['pool_size']} |"
          f" {r['len_training']} | {r['len_challenge']} | {c['epochs']} |"
          f" {c['batch_size']} | {r['train_accuracy']:.3f} |"
          f" {r['eval_accuracy']:.3f} | {_epsilon(r)} | {r['seconds']:.0f} |")
    lines += ["", "| scenario | phase | attack | " +
              " | ".join(name for _, name in METRICS) + " |",
              "|---|---|---|" + "---|" * len(METRICS)]
    for r in task_runs:
      for phase, by_attack in r["scores"].items():
        if phase == "audit":
          continue
        for attack, metrics in by_attack.items():
          lines.append(f"| {r['scenario']} | {phase} | {attack} | " +
                       " | ".join(f"{metrics[key]:.3f}" for key, _ in METRICS)
                       + " |")
    audited = [r for r in task_runs if "audit" in r["scores"]]
    if audited:
      lines += ["", "| scenario | accountant's ε | audited ε >= (natural) |"
                " GDP estimate (natural) | audited ε >= (canaries) |"
                " GDP estimate (canaries) |", "|---|---|---|---|---|---|"]
      for r in audited:
        a = r["scores"]["audit"]
        cells = [f"{a[kind][key]:.2f}" if kind in a else "–"
                 for kind in ("natural", "canaries")
                 for key in ("epsilon_lower_bound", "epsilon_gdp")]
        lines.append(f"| {r['scenario']} | {a['epsilon']:.2f} | " +
                     " | ".join(cells) + " |")
    lines += ["", "Commands:", ""]
    commands: dict[tuple[str, str], list[str]] = {}
    for r in task_runs:
      commands.setdefault((r["path"], r["command"]), []).append(r["scenario"])
    for (path, command), scenarios in commands.items():
      lines.append(f"- {', '.join(scenarios)} (`{path}`): `{command}`")
    lines.append("")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  root = argv[1] if len(argv) > 1 else os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results")
  runs = load_runs(root)
  if not runs:
    sys.exit(f"error: no scores.json under {root}")
  print(markdown(runs))


if __name__ == "__main__":
  main(sys.argv)
