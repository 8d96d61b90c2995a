"""Tasks as code: a data pool, a model, MICO's split sizes and one recipe per scenario.

Scenarios follow MICO: `inf` (no DP), `hi` (epsilon = 10), `lo` (epsilon = 4).
"""

import dataclasses
from typing import Callable, Mapping

import flax.linen as nn

from mico_jax import data, models
from mico_jax.train import TrainConfig


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
# so membership leaks, and 128 models (64 per point IN on average).
DIGITS = Task(
    name="digits",
    load=data.load_digits,
    make_model=lambda num_classes: models.MLP(num_classes, (128,)),
    len_training=900,
    len_challenge=100,
    scenarios={
        "inf": TrainConfig(optimizer="adam", learning_rate=2e-3,
                           batch_size=32, epochs=60),
    },
    default_models=128,
)

TASKS: dict[str, Task] = {task.name: task for task in (DIGITS,)}
