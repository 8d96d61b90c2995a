"""Why does a DP recipe stay at the majority class? Short controlled runs.

Trains K models of a task's architecture on seeded random halves of its pool
and prints each model's evaluation accuracy (on the pool's other half) beside
that half's majority share, so a model that learned nothing shows as
accuracy == majority. The DP path (Poisson batches padded to the accounted
capacity, masks, ghost-norm clipping, noise) runs with the accountant's σ for
the recipe's ε by default, or with `--sigma` overridden (0: clipping only) and
`--clip_norm` large (clipping off), so the DP code path can be compared with
the non-DP one (`--mode=plain`: shuffled batches of the same size, same
optimizer and steps). `--grad_stats` prints, at initialisation, per-example
gradient norms, the clipped mean's norm and the noise's norm per step.

  python -m experiments.dp_probe --task=sst2_tiny --data_dir=../shared/data \
      --models=2 --epochs=3 --sigma=0
"""

import dataclasses
import math
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from mico_jax import dp, train
from mico_jax.tasks import MICO_EPSILONS, TASKS, with_pretrained

_TASK = flags.DEFINE_enum("task", "sst2_tiny", sorted(TASKS), "Task.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data folder.")
_PRETRAINED_DIR = flags.DEFINE_string(
    "pretrained_dir", None, "Fine-tune this RoBERTa folder (sst2, sst2_tiny).")
_SCENARIO = flags.DEFINE_enum("scenario", "hi", sorted(MICO_EPSILONS),
                              "DP scenario whose recipe is the default.")
_MODE = flags.DEFINE_enum("mode", "dp", ["dp", "plain"],
                          "DP-SGD path, or plain minibatches of the same size.")
_MODELS = flags.DEFINE_integer("models", 2, "Models trained together.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Override the recipe's epochs.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Override (expected) batch.")
_LR = flags.DEFINE_float("lr", None, "Override the learning rate.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", None, ["adam", "sgd"],
                               "Override the optimizer.")
_MOMENTUM = flags.DEFINE_float("momentum", None, "Override SGD's momentum.")
_DECAY_EVERY = flags.DEFINE_integer("decay_every", None,
                                    "Override the lr decay's period (epochs).")
_DECAY_RATE = flags.DEFINE_float("decay_rate", None, "Override the lr decay.")
_CLIP = flags.DEFINE_float("clip_norm", None, "Override C.")
_SIGMA = flags.DEFINE_float(
    "sigma", None, "Override σ (not DP then); default: the accountant's σ for"
    " the scenario's ε over the recipe's steps.")
_GRAD_STATS = flags.DEFINE_bool("grad_stats", False,
                                "Print gradient and noise norms at init.")


def recipe() -> train.TrainConfig:
  """The scenario's recipe with the flags' overrides."""
  config = TASKS[_TASK.value].scenarios[_SCENARIO.value]
  overrides = {"epochs": _EPOCHS.value, "batch_size": _BATCH.value,
               "learning_rate": _LR.value, "optimizer": _OPTIMIZER.value,
               "momentum": _MOMENTUM.value, "decay_every": _DECAY_EVERY.value,
               "decay_rate": _DECAY_RATE.value}
  config = dataclasses.replace(
      config, **{k: v for k, v in overrides.items() if v is not None})
  if _CLIP.value is not None:
    config = dataclasses.replace(config, dp=dataclasses.replace(
        config.dp, clip_norm=_CLIP.value))
  return config


def grad_stats(model, params, x_N, y_N, train_T, mechanism, sigma) -> None:
  """Per-example norms, the clipped mean and the noise at `params`."""
  n_params = sum(v.size for v in jax.tree.leaves(params))
  batch = int(mechanism.expected_batch_size)
  idx = train_T[:batch]
  _, grads, norm_B = dp.clipped_grad_sum(
      model.apply, params, x_N[idx], y_N[idx], jnp.ones(batch, bool),
      mechanism.clip_norm)
  clipped_mean = math.sqrt(sum(float(jnp.sum(g ** 2))
                               for g in jax.tree.leaves(grads))) / batch
  noise_sd = sigma * mechanism.clip_norm / batch
  q = np.quantile(np.asarray(norm_B), [0.1, 0.5, 0.9])
  print(f"params {n_params}; per-example grad norm quantiles 10/50/90%"
        f" {q[0]:.3g} {q[1]:.3g} {q[2]:.3g} (C = {mechanism.clip_norm});"
        f" clipped mean norm {clipped_mean:.3g}; noise sd a coordinate"
        f" {noise_sd:.3g}, noise norm {noise_sd * math.sqrt(n_params):.3g}")
  for name, g in jax.tree_util.tree_leaves_with_path(grads):
    path = "/".join(str(getattr(k, "key", k)) for k in name)
    if "classifier" in path or "word_embeddings" in path or "Embed" in path:
      rms = float(jnp.sqrt(jnp.mean((g / batch) ** 2)))
      print(f"  {path}: clipped-mean rms a coordinate {rms:.3g}"
            f" vs noise {noise_sd:.3g}")


def main(argv):
  del argv
  task = TASKS[_TASK.value]
  if _PRETRAINED_DIR.value:
    task = with_pretrained(task, _PRETRAINED_DIR.value)
  config = recipe()
  dataset = task.load(_DATA_DIR.value)
  n, pool = task.len_training, len(dataset)
  rng = np.random.default_rng(0)
  orders = np.stack([rng.permutation(pool) for _ in range(_MODELS.value)])
  train_KxT = orders[:, :n].astype(np.int32)
  model = task.make_model(dataset.num_classes)
  mechanism = dp.calibrate(config.dp, n, config.batch_size, config.epochs)
  sigma = (mechanism.noise_multiplier if _SIGMA.value is None
           else _SIGMA.value)
  if _MODE.value == "dp":
    sampler = dp.PoissonSampler(n, mechanism.sample_rate, mechanism.capacity,
                                mechanism.steps // config.epochs)
    gradient_fn = dp.DPGradient(mechanism.clip_norm, sigma,
                                mechanism.expected_batch_size)
    print(f"DP path: q {mechanism.sample_rate:.4g}, steps {mechanism.steps},"
          f" capacity {mechanism.capacity}, C {mechanism.clip_norm},"
          f" σ {sigma:.4g} (accountant: {mechanism.noise_multiplier:.4g},"
          f" ε {MICO_EPSILONS[_SCENARIO.value]})")
  else:
    sampler = train.EpochShuffle(n, config.batch_size)
    gradient_fn = train.mean_gradient
    print(f"plain path: batch {config.batch_size},"
          f" steps {sampler.steps_per_epoch * config.epochs}")
  print(f"{config.optimizer} lr {config.learning_rate}"
        f" momentum {config.momentum}, {config.epochs} epochs")
  trainer = train.Trainer(
      model, train.make_optimizer(config, sampler.steps_per_epoch), sampler,
      gradient_fn)
  key_K = train.model_keys(np.arange(3 * _MODELS.value).reshape(-1, 3))
  state = trainer.init(key_K, jnp.asarray(dataset.x[0]))
  x_N, y_N = jnp.asarray(dataset.x), jnp.asarray(dataset.y)
  if _GRAD_STATS.value:
    grad_stats(model, jax.tree.map(lambda v: v[0], state.params), x_N, y_N,
               train_KxT[0], mechanism, sigma)
  start = time.perf_counter()
  state = train.train(trainer, state, train_KxT, x_N, y_N, config.epochs)
  apply = jax.jit(jax.vmap(model.apply, in_axes=(0, None)))
  predicted_KxN = np.concatenate([
      np.asarray(apply(state.params, x_N[i:i + 2000]).argmax(-1))
      for i in range(0, pool, 2000)], 1)
  correct_KxN = predicted_KxN == dataset.y[None]
  for k in range(_MODELS.value):
    held = orders[k, n:]
    share = max(dataset.y[held].mean(), 1 - dataset.y[held].mean())
    print(f"model {k}: train acc {correct_KxN[k, train_KxT[k]].mean():.3f},"
          f" eval acc {correct_KxN[k, held].mean():.3f}"
          f" (majority {share:.3f}; predicts class 1 for"
          f" {predicted_KxN[k, held].mean():.3f})")
  print(f"training {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
