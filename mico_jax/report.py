"""Pictures and tables of attack results."""

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
