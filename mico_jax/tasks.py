"""Tasks as code: a data pool, a model, MICO's split sizes and one recipe per scenario.

Scenarios follow MICO: `inf` (no DP), `hi` (epsilon = 10), `lo` (epsilon = 4).
"""

import dataclasses
from typing import Callable, Mapping

import dataclasses

import flax.linen as nn

from mico_jax import data, models
from mico_jax.dp import DPConfig
from mico_jax.train import TrainConfig

# MICO's privacy targets per DP scenario; δ = 1e-5 throughout.
MICO_EPSILONS = {"hi": 10.0, "lo": 4.0}
MICO_DELTA = 1e-5


def mico_scenarios(inf: TrainConfig, dp_base: TrainConfig,
                   clip_norm: float = 2.6, delta: float = MICO_DELTA
                   ) -> dict[str, TrainConfig]:
  """MICO's three scenarios: `inf` as given, `hi` and `lo` as DP-SGD.

  Args:
    inf: the non-private recipe.
    dp_base: the DP recipe without privacy (batch size = expected batch).
    clip_norm: C.
    delta: δ.
  """
  return {"inf": inf, **{
      name: dataclasses.replace(dp_base, dp=DPConfig(eps, delta, clip_norm))
      for name, eps in MICO_EPSILONS.items()}}


# MICO's recipes (its training/*.sh), as data for the tasks that use them.
# PyTorch's StepLR with step 1 is `decay_every=1`.
MICO_RECIPES: dict[str, dict[str, TrainConfig]] = {
    # Purchase-100 MLP 600-128-100: Adam 1e-3, gamma 0.9 every 5 epochs.
    "purchase100": mico_scenarios(
        inf=TrainConfig("adam", 1e-3, batch_size=512, epochs=30,
                        decay_every=5, decay_rate=0.9),
        dp_base=TrainConfig("adam", 1e-3, batch_size=512, epochs=30,
                            decay_every=5, decay_rate=0.9)),
    # CIFAR-10 CNN: SGD; non-DP batch 32 lr 0.005, DP batch 512 lr 0.5.
    "cifar10": mico_scenarios(
        inf=TrainConfig("sgd", 0.005, batch_size=32, epochs=50,
                        decay_every=1, decay_rate=0.96),
        dp_base=TrainConfig("sgd", 0.5, batch_size=512, epochs=50,
                            decay_every=1, decay_rate=0.96)),
}


@dataclasses.dataclass(frozen=True)
class Task:
  """What the main job needs to build, train and attack one MICO track.

  Attributes:
    name: the task's flag value.
    load: returns the pool (`Dataset`); may read files, so called lazily.
    make_model: number of classes -> flax module.
    len_training: n, each model's training-set size.
    len_challenge: m, members (and non-members) per model's challenge.
    scenarios: recipe per scenario name.
    default_models: models per scenario when the user does not say.
  """

  name: str
  load: Callable[[], data.Dataset]
  make_model: Callable[[int], nn.Module]
  len_training: int
  len_challenge: int
  scenarios: Mapping[str, TrainConfig]
  default_models: int = 200


# The embedded default: 1,797 8x8 digits, an MLP that overfits its 900 points
# so membership leaks, and 128 models (64 per point IN on average). DP-SGD with
# MICO's C = 2.6 learns digits best with plain SGD at a large rate and a
# quarter of the data per step (q = 1/4, 160 steps): ~92% evaluation accuracy
# at epsilon = 4.
DIGITS = Task(
    name="digits",
    load=data.load_digits,
    make_model=lambda num_classes: models.MLP(num_classes, (128,)),
    len_training=900,
    len_challenge=100,
    scenarios=mico_scenarios(
        inf=TrainConfig(optimizer="adam", learning_rate=2e-3, batch_size=32,
                        epochs=60),
        dp_base=TrainConfig(optimizer="sgd", learning_rate=0.5,
                            batch_size=225, epochs=40)),
    default_models=128,
)

TASKS: dict[str, Task] = {task.name: task for task in (DIGITS,)}
