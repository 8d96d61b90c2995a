r"""A MICO-layout release of a tabular task, trained by PyTorch as MICO trains.

The trainer and layout are `experiments/torch_mico.py`.

  python -m experiments.make_mico_release --task=location \
      --data_dir=../shared/data --out=/tmp/release --scenario=inf

A re-creation of MICO's `training/train_purchase100.py` (torch and, for DP,
opacus are needed; both optional extras of mico_jax):
  - seeds: three 63-bit seeds per model from a generator seeded with
    `--split_seed` and the model's index; splits by
    `torch.utils.data.random_split` with `torch.Generator().manual_seed(seed)`
    (challenge | rest, nonmember | member, training | evaluation);
  - MLP `nn.Sequential(Linear(d, 128), Tanh, Linear(128, classes))` named
    `mlp`, as MICO's `MLP`;
  - non-DP: `DataLoader(member + training, batch_size)` without shuffling,
    Adam, StepLR(step, gamma), cross-entropy;
  - DP (`hi`, `lo`): opacus's `make_private` with Poisson sampling at
    q = 1 / len(loader), C from the task, σ calibrated by mico_jax's PLD
    accountant (MICO: the PRV accountant; both to the target ε at δ = 1e-5)
    and opacus's ghost clipping (MICO: per-sample hooks; the same mechanism),
    so the state dict's keys carry `_module.`.
Writes `<out>/<task>/<task>_<s>/{train,dev,final}/model_<i>/` as MICO did
(train: three seeds, `solution.csv`, `model.pt`; dev/final: `seed_challenge`
and `model.pt`) and the hidden dev/final solutions in CodaLab's `ref/` layout,
`<out>/solutions/<task>/<task>_<s>/<phase>/model_<i>/solution.csv`.
"""

import dataclasses
import sys
import time

from absl import app
from absl import flags

from experiments.torch_mico import Recipe, make_scenario
from mico_jax import dp
from mico_jax.tasks import TASKS

_TASK = flags.DEFINE_string("task", "location", "A tabular MLP task.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "The task's data folder.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_SCENARIOS = flags.DEFINE_list("scenario", ["inf"], "Scenarios to make.")
_NUM_MODELS = flags.DEFINE_integer("num_models", 200, "Models per scenario.")
_SPLIT_SEED = flags.DEFINE_integer("split_seed", 0, "Seed of all seeds.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Override the epochs.")


def main(argv):
  del argv
  if _OUT.value is None:
    sys.exit("error: --out is required")
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  task = TASKS[_TASK.value]
  dataset = task.load(_DATA_DIR.value)
  hidden = task.make_model(dataset.num_classes).hidden[0]
  for scenario in _SCENARIOS.value:
    config = task.scenarios[scenario]
    recipe = Recipe(epochs=_EPOCHS.value or config.epochs,
                    batch_size=config.batch_size,
                    learning_rate=config.learning_rate,
                    step=config.decay_every, gamma=config.decay_rate)
    if config.dp is not None:
      mechanism = dp.calibrate(config.dp, task.len_training,
                               config.batch_size, recipe.epochs)
      recipe = dataclasses.replace(
          recipe, noise_multiplier=mechanism.noise_multiplier,
          clip_norm=config.dp.clip_norm)
      print(f"[{scenario}] DP-SGD: q = {mechanism.sample_rate:.4g},"
            f" {mechanism.steps} steps, sigma ="
            f" {mechanism.noise_multiplier:.4f}")
    start = time.perf_counter()
    make_scenario(_OUT.value, task.name, scenario, dataset.x,
                  dataset.y, dataset.num_classes, hidden, task.len_training,
                  task.len_challenge, _NUM_MODELS.value, recipe,
                  _SPLIT_SEED.value)
    print(f"[{scenario}] {_NUM_MODELS.value} models in"
          f" {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
