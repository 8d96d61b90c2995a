"""Pictures and tables of attack results, and the per-run report."""

from typing import NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from mico_jax import scoring

Curves = dict[str, tuple[np.ndarray, np.ndarray]]


def plot_roc(panels: dict[str, Curves], path: str, title: str = "") -> None:
  """ROC curves on log-log axes, one panel per scenario, saved as a PNG.

  Args:
    panels: scenario -> attack -> (solutions, scores) over all its targets.
    path: where to write the PNG.
    title: figure title.
  """
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5),
                           squeeze=False)
  for ax, (scenario, curves) in zip(axes[0], panels.items()):
    floor = 1.0
    for name, (solutions, scores) in curves.items():
      fpr, tpr, _ = scoring.roc_curve(solutions, scores)
      metrics = scoring.score(solutions, scores)
      floor = min(floor, 0.5 / max((np.asarray(solutions) == 0).sum(), 1))
      ax.plot(fpr, tpr, label=f"{name} (TPR@10% {metrics['TPR_FPR_1000']:.3f},"
              f" AUC {metrics['AUC']:.3f})")
    ax.plot([floor, 1], [floor, 1], "k:", lw=1, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1),
           xlabel="false positive rate", ylabel="true positive rate",
           title=f"{title} — {scenario}" if title else scenario)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(True, which="major", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


class Section(NamedTuple):
  """One scenario of a run, as the report shows it."""

  scenario: str
  phases: tuple[str, ...]  # MICO phase of each model
  member_KxC: np.ndarray  # solutions
  scores_KxC: dict[str, np.ndarray]  # attack -> scores of challenge points
  epsilon: float | None = None  # ε each model spent (DP), else None
  notes: tuple[str, ...] = ()  # e.g. the selection and shadow coverage


REPORT_COLUMNS = (("TPR_FPR_10", "TPR@0.1%"), ("TPR_FPR_100", "TPR@1%"),
                  ("TPR_FPR_1000", "TPR@10%"), ("AUC", "AUC"))


def phase_scores(section: Section) -> dict[str, dict[str, dict[str, float]]]:
  """`{group: {attack: metrics}}` for dev, final (where present) and all."""
  phases = np.asarray(section.phases)
  groups = {p: phases == p for p in ("dev", "final") if (phases == p).any()}
  groups["pooled"] = np.ones(len(phases), bool)
  return {g: {name: scoring.score(section.member_KxC[rows], s[rows])
              for name, s in section.scores_KxC.items()}
          for g, rows in groups.items()}


def markdown_report(sections: Sequence[Section], title: str,
                    roc_png: str | None = "roc.png") -> str:
  """The run's report: per scenario, ε, notes, and a table per phase group.

  Scores are MICO's over all challenge points of the group's models
  (`pooled`: every model of the scenario, the main job's targets).
  """
  lines = [f"# {title}", ""]
  if roc_png:
    lines += [f"![ROC curves]({roc_png})", ""]
  for section in sections:
    eps = ("no DP" if section.epsilon is None
           else f"DP-SGD, each model spent epsilon = {section.epsilon:.3f}")
    lines += [f"## {section.scenario} ({eps})", ""]
    lines += [f"- {note}" for note in section.notes]
    for group, table in phase_scores(section).items():
      n = int(sum((np.asarray(section.phases) == group)
                  if group != "pooled" else [True] * len(section.phases)))
      lines += ["", f"### {group} ({n} models)", "",
                "| attack | " + " | ".join(c for _, c in REPORT_COLUMNS) +
                " |", "|---" * (len(REPORT_COLUMNS) + 1) + "|"]
      best = {k: max(m[k] for m in table.values()) for k, _ in REPORT_COLUMNS}
      for name, metrics in table.items():
        cells = [(f"**{metrics[k]:.4f}**" if metrics[k] == best[k]
                  else f"{metrics[k]:.4f}") for k, _ in REPORT_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)
