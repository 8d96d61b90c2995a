"""One scenario end to end: challenge -> K models -> statistics -> attack scores.

The main job (`experiments/run.py`) adds flags and files around these steps;
benchmarks and tests call them directly.
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mico_jax import attacks as attacks_lib
from mico_jax import challenge as challenge_lib
from mico_jax import dp, scoring, stats, train
from mico_jax.data import Dataset
from mico_jax.tasks import Task

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class ScenarioResult:
  """Everything a scenario produced, as host arrays."""

  challenge: challenge_lib.Challenge
  params: object  # stacked parameters, leading axis K
  stats: stats.Stats
  scores_KxC: dict[str, np.ndarray]  # attack -> raw scores of challenge points
  metrics: dict[str, dict[str, float]]  # attack -> MICO metrics
  mechanism: dp.Mechanism | None = None  # DP-SGD's parameters, if DP
  epsilon_K: np.ndarray | None = None  # ε spent by each model, if DP

  def accuracy(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-model accuracy on its training and its evaluation points."""
    correct = self.stats.correct_KxN
    keep, evaluation = self.challenge.keep_KxN, self.challenge.eval_mask_KxN
    return ((correct * keep).sum(1) / keep.sum(1),
            (correct * evaluation).sum(1) / evaluation.sum(1))


def make_trainer(model, config: train.TrainConfig, len_training: int,
                 unroll: bool = False) -> train.Trainer:
  """The trainer for one recipe: shuffled epochs, or DP-SGD if `config.dp`."""
  if config.dp is None:
    sampler = train.EpochShuffle(len_training, config.batch_size)
    gradient_fn = train.mean_gradient
  else:
    mechanism = dp.calibrate(config.dp, len_training, config.batch_size,
                             config.epochs)
    sampler = dp.PoissonSampler(len_training, mechanism.sample_rate,
                                mechanism.capacity)
    gradient_fn = dp.DPGradient(mechanism.clip_norm,
                                mechanism.noise_multiplier,
                                mechanism.expected_batch_size)
  return train.Trainer(
      model, train.make_optimizer(config, sampler.steps_per_epoch), sampler,
      gradient_fn, unroll)


def train_models(model, config: train.TrainConfig, dataset: Dataset,
                 challenge: challenge_lib.Challenge, log: Log | None = print,
                 chunk_size: int | None = None, unroll: bool = False):
  """Trains every model of the challenge; returns stacked params.

  Args:
    model: flax module.
    config: the training recipe.
    dataset: the pool.
    challenge: the splits; one model per row.
    log: progress messages, or None.
    chunk_size: models trained together per compiled run (default: all). A
      model's result does not depend on its chunk; on CPU, CNNs train faster
      one at a time than vmapped (XLA lowers them to grouped convolutions).
    unroll: unroll each epoch's steps (see `train.Trainer`).
  """
  trainer = make_trainer(model, config, challenge.train_KxT.shape[1], unroll)
  keys_K = train.model_keys(challenge.seeds_Kx3)
  chunk_size = chunk_size or challenge.num_models
  parts = []
  for start in range(0, challenge.num_models, chunk_size):
    stop = min(start + chunk_size, challenge.num_models)
    if log and chunk_size < challenge.num_models:
      log(f"models {start}..{stop - 1} of {challenge.num_models}")
    state = trainer.init(keys_K[start:stop], jnp.asarray(dataset.x[0]))
    state = train.train(trainer, state, challenge.train_KxT[start:stop],
                        dataset.x, dataset.y, config.epochs, log=log)
    parts.append(state.params)
  return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *parts)


def attack_scores(observations: attacks_lib.Observations,
                  challenge: challenge_lib.Challenge, names: Sequence[str]
                  ) -> dict[str, np.ndarray]:
  """Runs each named attack on every target; keeps its challenge points."""
  rows = np.arange(challenge.num_models)[:, None]
  return {name: np.asarray(attacks_lib.ATTACKS[name](observations))[
      rows, challenge.challenge_KxC] for name in names}


def run_scenario(task: Task, config: train.TrainConfig, dataset: Dataset,
                 num_models: int, seed: int, attack_names: Sequence[str],
                 queries: Sequence[stats.Query], shadows: str = "all",
                 log: Log | None = print, chunk_size: int | None = None,
                 unroll: bool = False) -> ScenarioResult:
  """Builds the challenge, trains, computes statistics and runs the attacks.

  Args:
    task: the task (model, split sizes).
    config: the scenario's training recipe.
    dataset: the task's pool.
    num_models: K, all of them targets.
    seed: base seed for the challenge seeds.
    attack_names: keys of `attacks.ATTACKS`.
    queries: query augmentations for the statistics pass.
    shadows: "all" (every other model is a shadow) or "train" (only MICO's
      train-phase models, whose membership MICO reveals).
    log: progress messages, or None.
    chunk_size: models trained together (see `train_models`).
    unroll: unroll each epoch's training steps (see `train.Trainer`).
  """
  challenge = challenge_lib.make_challenge(
      len(dataset), task.len_training, task.len_challenge,
      challenge_lib.make_seeds(seed, num_models))
  model = task.make_model(dataset.num_classes)
  mechanism = epsilon_K = None
  if config.dp is not None:
    mechanism = dp.calibrate(config.dp, task.len_training, config.batch_size,
                             config.epochs)
    if log:
      log(f"DP-SGD: sample rate {mechanism.sample_rate:.4g} (expected batch"
          f" {mechanism.expected_batch_size:.1f}, capacity"
          f" {mechanism.capacity}), {mechanism.steps} steps, clip norm"
          f" {mechanism.clip_norm}, noise multiplier"
          f" {mechanism.noise_multiplier:.4f}")
  params = train_models(model, config, dataset, challenge, log, chunk_size,
                        unroll)
  if mechanism is not None:
    # Every model takes the same steps with the same σ and q.
    epsilon_K = np.full(num_models, mechanism.epsilon())
    if log:
      log(f"DP-SGD: each model spent epsilon = {epsilon_K[0]:.4f} at delta ="
          f" {mechanism.delta:g} (target {config.dp.epsilon})")
  if log:
    log(f"statistics pass: {num_models} models x {len(dataset)} points x"
        f" {len(queries)} queries")
  observed = stats.compute_stats(model.apply, params, dataset.x, dataset.y,
                                 queries)
  shadow_K = None
  if shadows == "train":
    shadow_K = np.array([p == "train" for p in challenge.phases])
  observations = attacks_lib.Observations(
      observed.stat_KxNxA, observed.loss_KxNxA, challenge.keep_KxN, shadow_K)
  scores = attack_scores(observations, challenge, attack_names)
  metrics = {name: scoring.score(challenge.member_KxC, s)
             for name, s in scores.items()}
  return ScenarioResult(challenge, params, observed, scores, metrics,
                        mechanism, epsilon_K)
