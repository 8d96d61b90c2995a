"""One scenario end to end: challenge -> K models -> statistics -> attack scores.

The main job (`experiments/run.py`) adds flags and files around these steps;
benchmarks and tests call them directly.
"""

import dataclasses
import functools
import hashlib
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mico_jax import attacks as attacks_lib
from mico_jax import challenge as challenge_lib
from mico_jax import bitpack, checkpoint, dp, parallel, scoring, stats, train
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
  # phase ("dev", "final"; "all" pooled) -> attack -> MICO metrics
  metrics: dict[str, dict[str, dict[str, float]]]
  mechanism: dp.Mechanism | None = None  # DP-SGD's parameters, if DP
  epsilon_K: np.ndarray | None = None  # ε spent by each model, if DP
  observations: attacks_lib.Observations | None = None  # what attacks saw

  def accuracy(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-model accuracy on its training and its evaluation points."""
    correct = self.stats.correct_KxN
    keep, evaluation = self.challenge.keep_KxN, self.challenge.eval_mask_KxN
    return ((correct * keep).sum(1) / keep.sum(1),
            (correct * evaluation).sum(1) / evaluation.sum(1))


UNROLLED_DP_CHUNK = 8


@functools.cache
def make_trainer(model, config: train.TrainConfig, len_training: int,
                 unroll: bool = False) -> train.Trainer:
  """The trainer for one recipe: epochs (shuffled or in order), or DP-SGD.

  Cached: an equal trainer is the same jit key, so waves compile once.
  `unroll`: see `train.Trainer`; honoured on CPU only, it is set for models
  whose steps are costly (CNNs), whose DP-SGD rows then go in a head that
  nearly every batch fills and chunks of `UNROLLED_DP_CHUNK`: at MICO's
  expected batch of 64, 64-72 rows a step (chunks of 64 computed ~104; a
  head past the mean, `dp.DPGradient`'s default for cheap rows, 72 or more).
  """
  # Stepping from Python keeps XLA:CPU's convolutions out of loops; on
  # accelerators one compiled loop is the fast way.
  unroll = unroll and jax.default_backend() == "cpu"
  if config.dp is None:
    order = train.EpochShuffle if config.shuffle else train.Sequential
    sampler = order(len_training, config.batch_size)
    gradient_fn = train.mean_gradient
  else:
    mechanism = dp.calibrate(config.dp, len_training, config.batch_size,
                             config.epochs)
    sampler = dp.PoissonSampler(len_training, mechanism.sample_rate,
                                mechanism.capacity,
                                mechanism.steps // config.epochs)
    chunking = ({"chunk_size": UNROLLED_DP_CHUNK, "head_sds": -3} if unroll
                else {})
    gradient_fn = dp.DPGradient(
        mechanism.clip_norm, mechanism.noise_multiplier,
        mechanism.expected_batch_size, **chunking)
  return train.Trainer(
      model, train.make_optimizer(config, sampler.steps_per_epoch), sampler,
      gradient_fn, unroll)


def describe_training(model, config: train.TrainConfig, dataset: Dataset,
                      challenge: challenge_lib.Challenge,
                      training_seed: int | None = None) -> dict[str, object]:
  """What decides the trained models; saved state must match it to be reused.

  The secret training seed enters as a hash only: this description is saved.
  """
  seeds = np.ascontiguousarray(challenge.seeds_Kx3, np.uint64).tobytes()
  secret = None if training_seed is None else hashlib.sha256(
      str(training_seed).encode()).hexdigest()[:16]
  return {"dataset": dataset.name, "pool_size": len(dataset),
          "training_seed": secret,
          "len_training": int(challenge.train_KxT.shape[1]),
          "len_challenge": int(challenge.challenge_KxC.shape[1] // 2),
          "num_models": challenge.num_models,
          "seeds": hashlib.sha256(seeds).hexdigest()[:16],
          "model": repr(model), "config": repr(config)}


@functools.partial(jax.jit, static_argnums=(0, 3))
def init_state(trainer: train.Trainer, key_K: jax.Array, example_x: jax.Array,
               mesh: Mesh) -> train.TrainState:
  """`trainer.init` with the state sharded over the mesh's models axis.

  Jitted at module level, so waves with equal trainers compile it once.
  """
  state = trainer.init(key_K, example_x)
  return jax.lax.with_sharding_constraint(
      state, parallel.state_shardings(state, mesh))


def train_models(model, config: train.TrainConfig, dataset: Dataset,
                 challenge: challenge_lib.Challenge, log: Log | None = print,
                 mesh: Mesh | None = None, checkpoint_dir: str | None = None,
                 save_every: int = 0, unroll: bool = False,
                 save_seconds: float = 0,
                 training_seed: int | None = None):
  """Trains every model of the challenge together, sharded over the mesh.

  K is padded to a multiple of the mesh's models axis with copies of the last
  model, which are dropped at the end.

  Args:
    model: the flax module.
    config: the training recipe.
    dataset: the pool.
    challenge: the models' splits and seeds.
    log: progress messages, or None.
    mesh: devices to shard the models over; default `parallel.make_mesh(K)`.
    checkpoint_dir: if given, resume from the latest checkpoint there and save
      every `save_every` steps, every `save_seconds` (at the next epoch end
      or checkpoint step), at the end and when interrupted.
    save_every: steps between checkpoints; 0: none by steps.
    unroll: no loop in the compiled program (see `train.Trainer`); speed
      only.
    save_seconds: wall-clock seconds between checkpoints; 0: none by time.
    training_seed: the run's secret seed of the training randomness (see
      `train.model_keys`).

  Returns:
    Stacked params of the K models, as host arrays.
  """
  num_models = challenge.num_models
  mesh = mesh or parallel.make_mesh(num_models)
  padded = challenge.select(parallel.pad_indices(num_models, mesh))
  if log:
    log(parallel.describe(mesh, num_models))
  trainer = make_trainer(model, config, padded.train_KxT.shape[1], unroll)
  key_K = parallel.put_models(
      np.asarray(train.model_keys(padded.seeds_Kx3, training_seed)), mesh)
  example_x = jnp.asarray(dataset.x[0])
  abstract = jax.eval_shape(trainer.init, key_K, example_x)
  shardings = parallel.state_shardings(abstract, mesh)
  state, checkpoints, save = None, None, None
  if checkpoint_dir:
    description = describe_training(model, config, dataset, challenge,
                                    training_seed)
    # The state holds the padding copies, so it fits only this many models.
    description["models_with_padding"] = padded.num_models
    checkpoints = checkpoint.TrainCheckpoints(checkpoint_dir, description)
    state = checkpoints.restore(jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, shardings), log)
    if state is not None and log:
      log(f"resuming from step {int(state.step)} ({checkpoint_dir})")
    save = lambda s: checkpoints.save(s, int(s.step))
  if state is None:
    state = init_state(trainer, key_K, example_x, mesh)
  train_KxT = parallel.put_models(padded.train_KxT, mesh)
  # Binary features travel and are gathered as bits (see `bitpack`).
  x_N, y_N = parallel.put_replicated((bitpack.pack(dataset.x), dataset.y),
                                     mesh)
  try:
    state = train.train(trainer, state, train_KxT, x_N, y_N, config.epochs,
                        log=log, save=save, save_every=save_every,
                        save_seconds=save_seconds)
  finally:
    if checkpoints:
      checkpoints.close()  # an interrupted run's last save completes too
  if config.dp is not None:  # the ε reported is for the steps accounted
    dp.calibrate(config.dp, padded.train_KxT.shape[1], config.batch_size,
                 config.epochs).check_steps(int(state.step))
  return jax.tree.map(lambda a: a[:num_models], parallel.to_host(state.params))


def observe(model, params, dataset: Dataset, queries: Sequence[stats.Query],
            mesh: Mesh | None = None) -> stats.Stats:
  """The statistics pass for host params `[K, ...]`, sharded over the mesh."""
  num_models = jax.tree.leaves(params)[0].shape[0]
  mesh = mesh or parallel.make_mesh(num_models)
  rows = parallel.pad_indices(num_models, mesh)
  if len(rows) > num_models:  # copies only where padding is needed
    params = jax.tree.map(lambda a: a[rows], params)
  params = parallel.put_models(params, mesh)
  observed = stats.compute_stats(model.apply, params, dataset.x, dataset.y,
                                 queries, to_host=parallel.to_host)
  return stats.Stats(*(a[:num_models] for a in observed))


@dataclasses.dataclass(frozen=True)
class Execution:
  """How a scenario runs: never changes what it computes.

  Attributes:
    mesh: devices to shard the models over; None: `parallel.make_mesh` of
      the models trained at once.
    wave_size: models trained at once; more are trained in waves of this
      size, one after another (0: all at once).
    directory: where checkpoints (`checkpoints/models_<a>-<b>/`) and trained
      models with their statistics (`trained/models_<a>-<b>.npz`) go; a rerun
      reuses or resumes them. None keeps nothing.
    save_every: training steps between checkpoints (0: none by steps).
    save_minutes: wall-clock minutes between checkpoints, taken at the next
      epoch end (0: none by time). Checkpoints are also taken at the end of
      training and on KeyboardInterrupt.
    reuse_only: only reuse trained models and statistics; never train.
    unroll: no loop in the compiled training program (see
      `train.Trainer`): XLA's CPU backend runs convolutions far faster
      outside loops.
  """

  mesh: Mesh | None = None
  wave_size: int = 0
  directory: str | None = None
  save_every: int = 0
  save_minutes: float = 0
  reuse_only: bool = False
  unroll: bool = False


def train_and_observe(model, config: train.TrainConfig, dataset: Dataset,
                      challenge: challenge_lib.Challenge,
                      queries: Sequence[stats.Query], execution: Execution,
                      name: str, log: Log | None,
                      training_seed: int | None = None):
  """One wave: saved results if any, else (resumed) training and statistics."""
  description = describe_training(model, config, dataset, challenge,
                                  training_seed)
  description["queries"] = [repr(q) for q in queries]
  path = execution.directory and os.path.join(execution.directory, "trained",
                                              f"{name}.npz")
  if path:
    params_like = jax.eval_shape(model.init, jax.random.key(0),
                                 dataset.x[:1])
    saved = checkpoint.load_results(path, description, params_like)
    if saved:
      if log:
        log(f"reusing trained models and statistics from {path}")
      return saved
  if execution.reuse_only:
    raise checkpoint.CheckpointError(
        f"no trained models and statistics to reuse at {path}")
  params = train_models(
      model, config, dataset, challenge, log, execution.mesh,
      execution.directory and os.path.join(execution.directory,
                                           "checkpoints", name),
      execution.save_every, execution.unroll, execution.save_minutes * 60,
      training_seed)
  if log:
    log(f"statistics pass: {challenge.num_models} models x {len(dataset)}"
        f" points x {len(queries)} queries")
  start = time.perf_counter()
  observed = observe(model, params, dataset, queries, execution.mesh)
  if log:
    log(f"statistics pass done in {time.perf_counter() - start:.1f}s")
  if path and parallel.is_main_process():
    checkpoint.save_results(path, description, params, observed)
  return params, observed


def attack_scores(observations: attacks_lib.Observations,
                  challenge: challenge_lib.Challenge, names: Sequence[str]
                  ) -> dict[str, np.ndarray]:
  """Runs each named attack on every target; keeps its challenge points."""
  rows = np.arange(challenge.num_models)[:, None]
  return {name: np.asarray(attacks_lib.ATTACKS[name](observations))[
      rows, challenge.challenge_KxC] for name in names}


def train_in_waves(model, config: train.TrainConfig, dataset: Dataset,
                   challenge: challenge_lib.Challenge,
                   queries: Sequence[stats.Query], execution: Execution,
                   name: str, log: Log | None,
                   training_seed: int | None = None):
  """Every model of `challenge`, `execution.wave_size` at a time (0: all at
  once), by `train_and_observe`; each wave saved as `<name>_<first>-<last>`
  and reused. Returns the params and statistics of all models."""
  total = challenge.num_models
  wave = execution.wave_size or total
  parts = []
  for first in range(0, total, wave):
    rows = np.arange(first, min(first + wave, total))
    if log and wave < total:
      log(f"wave of {name} {rows[0]}-{rows[-1]} of {total}")
    parts.append(train_and_observe(
        model, config, dataset, challenge.select(rows), queries, execution,
        f"{name}_{rows[0]}-{rows[-1]}", log, training_seed))
  return jax.tree.map(lambda *a: np.concatenate(a), *parts)


def run_scenario(task: Task, config: train.TrainConfig, dataset: Dataset,
                 num_models: int, seed: int, attack_names: Sequence[str],
                 queries: Sequence[stats.Query], shadows: str = "all",
                 log: Log | None = print,
                 execution: Execution = Execution(),
                 training_seed: int | None = None) -> ScenarioResult:
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
    execution: devices, waves, checkpoints.
    training_seed: the run's secret seed of the training randomness (see
      `train.model_keys`); None derives it from the published seeds.
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
  params, observed = train_in_waves(model, config, dataset, challenge,
                                    queries, execution, "models", log,
                                    training_seed)
  if mechanism is not None:
    # Every model takes the same steps with the same σ and q.
    epsilon_K = np.full(num_models, mechanism.epsilon())
    if log:
      log(f"DP-SGD: each model spent epsilon = {epsilon_K[0]:.4f} at delta ="
          f" {mechanism.delta:g} (target {config.dp.epsilon})")
  shadow_K = None
  if shadows == "train":
    shadow_K = np.array([p == "train" for p in challenge.phases])
  observations = attacks_lib.Observations(
      observed.stat_KxNxA, observed.loss_KxNxA, challenge.keep_KxN, shadow_K,
      challenge.challenge_KxC)
  if log:
    log(f"attacks: {', '.join(attack_names)} on {num_models} targets")
  start = time.perf_counter()
  scores = attack_scores(observations, challenge, attack_names)
  if log:
    log(f"attacks done in {time.perf_counter() - start:.1f}s")
  metrics = scoring.score_phases(challenge.member_KxC, scores,
                                 challenge.phases)
  return ScenarioResult(challenge, params, observed, scores, metrics,
                        mechanism, epsilon_K, observations)
