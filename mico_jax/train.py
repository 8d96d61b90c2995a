"""K models trained together: one stacked pytree, `vmap` over models, `scan` over steps.

Every leaf of `TrainState` except `step` has a leading models axis K. A model's
randomness (init, data order, noise) comes only from its own key, so training
K models together gives each the parameters it would get alone.

Each model samples its batches from its own training list `train_KxT` (indices
into the pool): a `Sampler` turns (sampler state, key, step) into positions in
that list plus a mask, so batch shapes stay static and nothing recompiles.
"""

import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mico_jax.dp import DPConfig
from mico_jax.models import cross_entropy

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A training recipe.

  The learning rate decays by `decay_rate` every `decay_every` epochs
  (PyTorch's StepLR; `decay_every=1` is ExponentialLR); 0 keeps it constant.
  Without DP, batches are `batch_size` consecutive points of a fresh
  permutation each epoch (`shuffle`, `EpochShuffle`) or of the training list
  in its own order (`Sequential`: MICO's non-DP `DataLoader` without shuffle,
  members first). With `dp` set, training is DP-SGD: Poisson batches of
  expected size `batch_size` (see `mico_jax.dp`); `shuffle` is then unused.
  """

  optimizer: str = "adam"
  learning_rate: float = 1e-3
  momentum: float = 0.0
  batch_size: int = 64
  epochs: int = 30
  decay_every: int = 0
  decay_rate: float = 1.0
  dp: DPConfig | None = None
  shuffle: bool = True

  def __post_init__(self):
    if self.optimizer not in ("adam", "sgd"):
      raise ValueError(f"optimizer must be 'adam' or 'sgd', got"
                       f" {self.optimizer!r}")
    if self.batch_size < 1 or self.epochs < 1 or self.learning_rate <= 0:
      raise ValueError("batch_size, epochs and learning_rate must be positive")


def make_optimizer(config: TrainConfig, steps_per_epoch: int
                  ) -> optax.GradientTransformation:
  """optax optimizer with MICO's step-decay schedule."""
  learning_rate = config.learning_rate
  if config.decay_every:
    learning_rate = optax.exponential_decay(
        config.learning_rate, config.decay_every * steps_per_epoch,
        config.decay_rate, staircase=True)
  if config.optimizer == "adam":
    return optax.adam(learning_rate)
  return optax.sgd(learning_rate, momentum=config.momentum or None)


class Sampler(Protocol):
  """Chooses each step's batch from one model's training list (vmapped)."""

  steps_per_epoch: int

  def init(self, key: jax.Array) -> PyTree:
    """The sampler's state for one model (its data-order state)."""

  def sample(self, state: PyTree, key: jax.Array, step: jax.Array
            ) -> tuple[PyTree, jax.Array, jax.Array]:
    """Returns (state, positions `[B]` into the training list, mask `[B]`)."""


@dataclasses.dataclass(frozen=True)
class EpochShuffle:
  """A fresh permutation every epoch, cut into batches; the last may be short."""

  num_points: int
  batch_size: int

  @property
  def steps_per_epoch(self) -> int:
    return math.ceil(self.num_points / self.batch_size)

  def _order(self, key: jax.Array, epoch: jax.Array) -> jax.Array:
    order = jax.random.permutation(jax.random.fold_in(key, epoch),
                                   self.num_points)
    padding = self.steps_per_epoch * self.batch_size - self.num_points
    return jnp.pad(order, (0, padding), constant_values=-1)

  def init(self, key: jax.Array) -> jax.Array:
    return self._order(key, 0)

  def sample(self, state, key, step):
    epoch, position = jnp.divmod(step, self.steps_per_epoch)
    # `step` is shared by all models, so under vmap this stays a real branch.
    state = jax.lax.cond(position == 0, lambda: self._order(key, epoch),
                         lambda: state)
    batch = jax.lax.dynamic_slice(state, (position * self.batch_size,),
                                  (self.batch_size,))
    return state, jnp.maximum(batch, 0), batch >= 0


@dataclasses.dataclass(frozen=True)
class Sequential:
  """The training list in its own order every epoch, cut into batches.

  PyTorch's `DataLoader(dataset, batch_size)` without shuffling and with
  `drop_last=False`: the last batch of each epoch is short (masked). MICO's
  non-DP training iterates `ConcatDataset([member, training])` this way, so
  the members come first in every epoch.
  """

  num_points: int
  batch_size: int

  @property
  def steps_per_epoch(self) -> int:
    return math.ceil(self.num_points / self.batch_size)

  def init(self, key: jax.Array) -> tuple[()]:
    del key  # deterministic
    return ()

  def sample(self, state, key, step):
    del key
    position = step % self.steps_per_epoch
    batch = position * self.batch_size + jnp.arange(self.batch_size)
    return state, jnp.minimum(batch, self.num_points - 1), batch < self.num_points


class TrainState(NamedTuple):
  """Everything training needs to continue, stacked over K models."""

  params: PyTree
  opt_state: PyTree
  sampler_state: PyTree
  key_K: jax.Array  # raw uint32 keys [K, 2]
  step: jax.Array  # scalar, shared by all models


GradientFn = Callable[..., tuple[jax.Array, PyTree]]


def mean_gradient(apply_fn: Callable, params: PyTree, x_N: jax.Array,
                  y_N: jax.Array, idx_B: jax.Array, mask_B: jax.Array,
                  key: jax.Array) -> tuple[jax.Array, PyTree]:
  """(mean loss, its gradient) over the unmasked examples of one model."""
  del key  # deterministic

  def loss_fn(p):
    losses_B = cross_entropy(apply_fn(p, x_N[idx_B]), y_N[idx_B])
    return (jnp.sum(jnp.where(mask_B, losses_B, 0)) /
            jnp.maximum(mask_B.sum(), 1))

  return jax.value_and_grad(loss_fn)(params)


_STREAMS = ("init", "sampler", "gradient")


def _stream(key: jax.Array, name: str) -> jax.Array:
  """Independent randomness for each use of a model's key."""
  return jax.random.fold_in(key, _STREAMS.index(name))


def model_keys(seeds_Kx3: np.ndarray,
               training_seed: int | None = None) -> jax.Array:
  """One raw PRNG key per model: its init, data order, DP noise and sampling.

  Args:
    seeds_Kx3: each model's three challenge seeds.
    training_seed: the run's secret seed, mixed with each model's seeds (so a
      model's key is still its own, whatever other models train with it). The
      challenge seeds alone are published in the bundle: with None, the keys
      derive from them only, and anyone holding the bundle can regenerate the
      DP noise (fine for tests and benchmarks, not for a privacy claim).
  """
  if training_seed is None:
    sequences = [np.random.SeedSequence([int(s) for s in seeds])
                 for seeds in seeds_Kx3]
  else:
    sequences = [np.random.SeedSequence(
        training_seed, spawn_key=tuple(int(s) for s in seeds))
                 for seeds in seeds_Kx3]
  words = [s.generate_state(2) for s in sequences]
  return jnp.asarray(np.stack(words), jnp.uint32)


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Trains a stack of models of one architecture with one recipe.

  Attributes:
    model: flax module mapping `[B, ...]` to logits.
    optimizer: optax transformation applied to each model's gradient.
    sampler: batch sampler over each model's training list.
    gradient_fn: `(apply, params, x_N, y_N, idx_B, mask_B, key) -> (loss,
      grads)` for the batch `x_N[idx_B]` (it gathers the rows itself, so it
      can skip masked ones; `x_N` may be `bitpack.BinaryRows`); plain mean
      gradient by default, DP-SGD's clipped noisy sum otherwise.
    unroll: no loop in the compiled program: `run` steps each group of
      models from Python, one jitted step at a time (one compilation), where
      otherwise it is one program that loops over steps (`scan`) and groups
      (`lax.map`). XLA:CPU runs convolutions (their gradients above all)
      inside loops on a kernel up to ~40x slower. Speed only: the same
      models either way.
    model_group: models stepped together by `vmap`; the groups run one after
      another. None: all K on accelerators; on CPU one model per
      device (so a sharded models axis stays sharded). XLA:CPU runs a
      convolution vmapped over models ~10x slower than one model's, and
      inside a loop slower still; one model at a time, its convolutions
      (and everything else) run at full speed, so K models cost K times one.
      Must divide K (else all K together).
  """

  model: nn.Module
  optimizer: optax.GradientTransformation
  sampler: Sampler
  gradient_fn: GradientFn = mean_gradient
  unroll: bool = False
  model_group: int | None = None

  def init(self, key_K: jax.Array, example_x: jax.Array) -> TrainState:
    """Initial state for K models; `example_x` is one input `[...]`."""

    def init_one(key):
      params = self.model.init(_stream(key, "init"), example_x[None])
      return (params, self.optimizer.init(params),
              self.sampler.init(_stream(key, "sampler")))

    params, opt_state, sampler_state = jax.jit(jax.vmap(init_one))(key_K)
    return TrainState(params, opt_state, sampler_state, key_K,
                      jnp.zeros((), jnp.int32))

  def _one_step(self, params, opt_state, sampler_state, key, train_T, step,
                x_N, y_N):
    sampler_state, positions, mask = self.sampler.sample(
        sampler_state, _stream(key, "sampler"), step)
    loss, grads = self.gradient_fn(
        self.model.apply, params, x_N, y_N, train_T[positions], mask,
        jax.random.fold_in(_stream(key, "gradient"), step))
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, sampler_state, loss

  def _group_size(self, num_models: int) -> int:
    group = self.model_group
    if group is None:
      group = (math.gcd(num_models, jax.device_count())
               if jax.default_backend() == "cpu" else num_models)
    return group if num_models % group == 0 else num_models

  def _step_group(self, models_G, step, x_N, y_N,
                  sharding: NamedSharding | None = None):
    """One step of a group of models (leaves lead with the group's models).

    `sharding`: the group's models split over devices (`_models_sharding`);
    each device then steps its own share (`shard_map`), so that nothing in
    the step crosses devices. Under one `vmap` of the whole group, a loop
    whose length depends on the model (DP-SGD's chunks) runs until every
    model of the group is done, its condition an all-reduce over the devices
    at each iteration. Each share is still vmapped, even a share of one: as
    the partitioned `vmap` did, which XLA:CPU compiled faster than one
    unvmapped model for the MLP (benchmarks/RESULTS.md).
    """
    def vmapped(models, step, x_N, y_N):
      return jax.vmap(self._one_step, in_axes=(0, 0, 0, 0, 0, None, None, None)
                      )(*models, step, x_N, y_N)

    if sharding is not None:
      return jax.shard_map(
          vmapped, mesh=sharding.mesh,
          in_specs=(sharding.spec, PartitionSpec(), PartitionSpec(),
                    PartitionSpec()),
          out_specs=sharding.spec, check_vma=False)(models_G, step, x_N, y_N)
    if models_G[-1].shape[0] > 1:
      return vmapped(models_G, step, x_N, y_N)
    # One model: no vmap at all (a vmapped convolution is slow on CPU).
    one = self._one_step(*jax.tree.map(lambda v: v[0], models_G), step, x_N,
                         y_N)
    return jax.tree.map(lambda v: v[None], one)

  def run(self, state: TrainState, train_KxT: jax.Array, x_N: jax.Array,
          y_N: jax.Array, num_steps: int) -> tuple[TrainState, jax.Array]:
    """Advances all K models by `num_steps`; returns (state, mean loss [K])."""
    num_models = train_KxT.shape[0]
    group = self._group_size(num_models)
    if not self.unroll:
      return self._run_compiled(state, train_KxT, x_N, y_N, num_steps,
                                _models_sharding(train_KxT, group))
    models = (state.params, state.opt_state, state.sampler_state, state.key_K,
              train_KxT)
    # All K in one group: no split or merge, which would copy the state
    # (two calls, a few % of a short run).
    one_group = group == num_models
    split = [models] if one_group else _take_groups(models, group)
    groups, loss_sums = [], []
    for params, opt_state, sampler_state, key_G, train_GxT in split:
      loss_sum_G = jnp.zeros(group, jnp.float32)
      sharding = _models_sharding(train_GxT, group)
      for offset in range(num_steps):
        params, opt_state, sampler_state, loss_sum_G = self._jitted_step(
            (params, opt_state, sampler_state, key_G, train_GxT), loss_sum_G,
            state.step, offset, x_N, y_N, sharding)
      groups.append((params, opt_state, sampler_state))
      loss_sums.append(loss_sum_G)
    if one_group:
      (params, opt_state, sampler_state), loss_K = groups[0], loss_sums[0]
    else:
      (params, opt_state, sampler_state), loss_K = _merge_groups(groups,
                                                                 loss_sums)
    return (TrainState(params, opt_state, sampler_state, state.key_K,
                       state.step + num_steps), loss_K / num_steps)

  @jax.jit(static_argnames=("self", "sharding"))
  def _jitted_step(self, models_G, loss_sum_G, step0, offset, x_N, y_N,
                   sharding=None):
    """One step of a group; the group's losses added to `loss_sum_G` (so
    a run holds one running sum, not every step's losses)."""
    *state_G, loss_G = self._step_group(models_G, step0 + offset, x_N, y_N,
                                        sharding)
    return (*state_G, loss_sum_G + loss_G)

  @jax.jit(static_argnames=("self", "num_steps", "sharding"))
  def _run_compiled(self, state: TrainState, train_KxT: jax.Array,
                    x_N: jax.Array, y_N: jax.Array, num_steps: int,
                    sharding: NamedSharding | None = None
                    ) -> tuple[TrainState, jax.Array]:
    """`run` as one program: `scan` over steps, `lax.map` over groups
    (`sharding`: of each group's models, see `_step_group`)."""
    num_models = train_KxT.shape[0]
    group = self._group_size(num_models)

    def run_group(models):
      """`num_steps` steps of one group: leaves lead with its models."""
      params, opt_state, sampler_state, key_G, train_GxT = models

      def body(carry, _):
        params, opt_state, sampler_state, step = carry
        params, opt_state, sampler_state, loss_G = self._step_group(
            (params, opt_state, sampler_state, key_G, train_GxT), step, x_N,
            y_N, sharding)
        return (params, opt_state, sampler_state, step + 1), loss_G

      (params, opt_state, sampler_state, _), loss_SxG = jax.lax.scan(
          body, (params, opt_state, sampler_state, state.step),
          length=num_steps)
      return (params, opt_state, sampler_state), loss_SxG.mean(0)

    models = (state.params, state.opt_state, state.sampler_state, state.key_K,
              train_KxT)
    if group == num_models:
      (params, opt_state, sampler_state), loss_K = run_group(models)
    else:
      (params, opt_state, sampler_state), loss_K = jax.tree.map(
          _merge_group_axis, jax.lax.map(
              run_group, jax.tree.map(
                  lambda v: _split_groups(v, group), models)))
    return (TrainState(params, opt_state, sampler_state, state.key_K,
                       state.step + num_steps), loss_K)


def _models_sharding(models: jax.Array, group: int
                     ) -> NamedSharding | None:
  """How a stack of models is split over its leading axis, where D > 1
  devices hold it in blocks and D divides the group size G (then every
  group of `_split_groups` holds G/D models of each device, in device
  order, and is split the same way); else None."""
  sharding = getattr(models, "sharding", None)
  if not isinstance(sharding, NamedSharding) or not sharding.spec:
    return None
  axis = sharding.spec[0]
  if not isinstance(axis, str) or any(sharding.spec[1:]):
    return None
  devices = sharding.mesh.shape[axis]
  if devices == 1 or group % devices:
    return None
  return NamedSharding(sharding.mesh, PartitionSpec(axis))


def _split_groups(v: jax.Array, group: int) -> jax.Array:
  """`[K, ...]` -> `[K/G, G, ...]`: group j holds models j, j + K/G, ..."""
  return jnp.swapaxes(v.reshape(group, v.shape[0] // group, *v.shape[1:]),
                      0, 1)


def _merge_group_axis(v: jax.Array) -> jax.Array:
  """`[K/G, G, ...]` -> `[K, ...]`: the inverse of `_split_groups`."""
  return jnp.swapaxes(v, 0, 1).reshape(-1, *v.shape[2:])


@functools.partial(jax.jit, static_argnames=("group",))
def _take_groups(models: PyTree, group: int) -> list[PyTree]:
  """The K/G groups of the K models, in one call: group j holds models j,
  j + K/G, ... (one of each device when K is sharded over G devices in
  blocks)."""
  split = jax.tree.map(lambda v: _split_groups(v, group), models)
  num_groups = jax.tree.leaves(models)[0].shape[0] // group
  return [jax.tree.map(lambda v: v[j], split) for j in range(num_groups)]


@jax.jit
def _merge_groups(groups: list, values: list) -> tuple[PyTree, jax.Array]:
  """The groups' states, and their per-model `values` (`[G]` each), stacked
  back into K models."""
  return jax.tree.map(lambda *v: _merge_group_axis(jnp.stack(v)),
                      *groups), _merge_group_axis(jnp.stack(values))


def train(trainer: Trainer, state: TrainState, train_KxT: np.ndarray,
          x_N: np.ndarray, y_N: np.ndarray, epochs: int,
          log: Callable[[str], None] | None = print,
          save: Callable[[TrainState], None] | None = None,
          save_every: int = 0, save_seconds: float = 0) -> TrainState:
  """Runs the remaining steps of `epochs` epochs, logging each epoch.

  Each jitted scan runs to the end of the epoch or to the next multiple of
  `save_every` steps, whichever comes first, so the state at a checkpoint is
  the one an uninterrupted run passes through, and few scan lengths compile.
  The clock is read between scans: a save by time lands on a scan boundary
  too, so resuming from it stays bit-exact. On KeyboardInterrupt the last
  finished scan's state is saved before the interrupt goes on.

  Args:
    trainer: the trainer.
    state: where to start; `state.step` may be anywhere (a resumed run).
    train_KxT: each model's training list (host or already placed on devices).
    x_N: the pool's inputs: an array or `bitpack.BinaryRows`.
    y_N: the pool's labels.
    epochs: total epochs, counting those already done.
    log: progress messages, or None.
    save: called with the state every `save_every` steps, at the first scan
      boundary `save_seconds` after the last save, at the end and when
      interrupted.
    save_every: steps between saves; 0: none by steps.
    save_seconds: wall-clock seconds between saves; 0: none by time.
  """
  train_KxT, x_N, y_N = jax.tree.map(jnp.asarray, (train_KxT, x_N, y_N))
  per_epoch = trainer.sampler.steps_per_epoch
  total = epochs * per_epoch
  step = int(state.step)
  loss_sum_K, counted = 0.0, 0
  start = last_save = time.perf_counter()
  saved_step = step
  try:
    while step < total:
      stop = (step // per_epoch + 1) * per_epoch
      if save_every:
        stop = min(stop, (step // save_every + 1) * save_every)
      state, loss_K = trainer.run(state, train_KxT, x_N, y_N, stop - step)
      loss_sum_K, counted = loss_sum_K + loss_K * (stop - step), counted + (
          stop - step)
      step = stop
      if save and (step == total or (save_every and step % save_every == 0) or
                   (save_seconds and
                    time.perf_counter() - last_save >= save_seconds)):
        save(state)
        last_save, saved_step = time.perf_counter(), step
      if step % per_epoch == 0:
        if log:
          # Reduced on the devices: the losses may live on other hosts.
          loss_K = loss_sum_K / counted
          mean, low, high = np.asarray(
              jnp.stack([loss_K.mean(), loss_K.min(), loss_K.max()]))
          log(f"epoch {step // per_epoch}/{epochs}  loss {mean:.4f}"
              f" (min {low:.4f}, max {high:.4f})"
              f"  {time.perf_counter() - start:.1f}s")
        loss_sum_K, counted = 0.0, 0
  except KeyboardInterrupt:
    # `state` is a scan boundary that an uninterrupted run passes through.
    if save and int(state.step) > saved_step:
      if log:
        log(f"interrupted: saving the state at step {int(state.step)}")
      save(state)
    raise
  return state
