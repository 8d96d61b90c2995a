r"""DP-SGD step cost for K models on Purchase-100-shaped data.

  python -m benchmarks.dp_step

Trains MICO's Purchase-100 MLP (600-128-100, tanh, Adam) on random binary
features for K models at once and times jitted training steps (after a
warm-up run that compiles): plain minibatch SGD, DP-SGD with ghost norms, and
DP-SGD with naive `vmap(grad)` per-example gradients. Prints the DP / non-DP
cost ratio, the ghost / naive speed-up and the achieved FLOP/s against a JAX
matmul's, measured in the same run, and where the DP cost goes: DP-SGD
without its noise, and a non-DP step on a batch as large as the capacity
(what computing the padding would cost; DP-SGD skips most of it). The naive
path keeps per-example gradients of the head of each batch in memory (~160 MB
a model here), so it runs on fewer models and is compared per model, with the
ghost path timed on as many.
"""

import argparse
import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from mico_jax import dp, models, parallel, pipeline, train
from benchmarks.vs_reference import matmul_peak, sharded_runner


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", type=int, default=64, help="K")
  parser.add_argument("--naive_models", type=int, default=4,
                      help="K for the naive vmap(grad) path (memory-bound)")
  parser.add_argument("--len_training", type=int, default=150_000, help="n")
  parser.add_argument("--features", type=int, default=600)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=512)
  parser.add_argument("--epsilon", type=float, default=10.0)
  parser.add_argument("--steps", type=int, default=8,
                      help="steps per timed run")
  parser.add_argument("--cpu_devices", type=int, default=None,
                      help="CPU devices (default: one a core); the K models"
                      " are sharded over the most of them that divide K")
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed runs of each kind; the fastest counts")
  return parser.parse_args()


def _without_noise(gradient: dp.DPGradient) -> train.GradientFn:
  """DP-SGD's gradient less its noise: what clipping alone costs."""

  def gradient_fn(apply_fn, params, x_N, y_N, idx_B, mask_B, key):
    del key
    loss_sum, grads = dp.chunked_clipped_grad_sum(
        apply_fn, params, x_N, y_N, idx_B, mask_B, gradient.clip_norm,
        gradient.chunk_size, gradient.head_size)
    return (loss_sum / jnp.maximum(mask_B.sum(), 1),
            jax.tree.map(lambda g: g / gradient.expected_batch_size, grads))

  return gradient_fn


def _expected_rows(mech: dp.Mechanism, head: int, chunk: int) -> float:
  """Rows a DP step computes on average: the head, then whole chunks up
  to the batch's last row (batch sizes Binomial(n, q), capped at the
  capacity)."""
  sizes = np.arange(mech.capacity + 1)
  pmf = stats.binom.pmf(sizes, mech.dataset_size, mech.sample_rate)
  head = min(head, mech.capacity)
  chunk = min(chunk, mech.capacity - head)
  chunks = np.ceil(np.maximum(sizes - head, 0) / chunk) if chunk else 0
  return float(np.sum(pmf * (head + chunk * chunks)) / pmf.sum())


def _seconds_per_step(runs: dict[str, Callable[[], object]], args
                     ) -> dict[str, float]:
  """Fastest time per step of each run, interleaved so that load from other
  processes on the machine hits every run alike."""
  best = dict.fromkeys(runs, float("inf"))
  for _ in range(args.repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(run())
      best[name] = min(best[name], time.perf_counter() - start)
  return {name: secs / args.steps for name, secs in best.items()}


def main():
  args = _parse()
  parallel.initialize(cpu_devices=args.cpu_devices)
  n, d, c, h = args.len_training, args.features, args.classes, args.hidden
  rng = np.random.default_rng(0)
  x_N = (rng.random((n, d)) < 0.1).astype(np.float32)  # sparse, binary
  y_N = rng.integers(0, c, n).astype(np.int32)
  prepare = lambda trainer, num_models: sharded_runner(
      trainer, num_models, n, x_N, y_N, args.steps)
  model = models.MLP(c, (h,))
  config = train.TrainConfig("adam", 1e-3, batch_size=args.batch_size,
                             epochs=30, decay_every=5, decay_rate=0.9)
  dp_config = dp.DPConfig(args.epsilon, 1e-5, 2.6)
  mech = dp.calibrate(dp_config, n, args.batch_size, config.epochs)
  plain = pipeline.make_trainer(model, config, n)
  # The same work as DP's padded batch, without clipping or noise.
  padded = pipeline.make_trainer(
      model, dataclasses.replace(config, batch_size=mech.capacity), n)
  ghost = pipeline.make_trainer(
      model, dataclasses.replace(config, dp=dp_config), n)
  naive = train.Trainer(ghost.model, ghost.optimizer, ghost.sampler,
                        dp.DPGradient(mech.clip_norm, mech.noise_multiplier,
                                      mech.expected_batch_size, "naive"))
  noiseless = train.Trainer(ghost.model, ghost.optimizer, ghost.sampler,
                            _without_noise(ghost.gradient_fn))

  k, k_naive = args.models, args.naive_models
  runs = {
      "plain": prepare(plain, k),
      "padded": prepare(padded, k),
      "ghost": prepare(ghost, k),
      "noiseless": prepare(noiseless, k),
      "ghost_small": prepare(ghost, k_naive),
      "naive": prepare(naive, k_naive),
  }
  peak = matmul_peak(args.repeats)
  secs = _seconds_per_step(runs, args)
  t_plain, t_padded, t_ghost, t_noiseless, t_ghost_small, t_naive = (
      secs[name] for name in runs)

  # Useful work: forward + backward of the expected batch (no input gradient).
  forward = 2 * (d * h + h * c)
  flops_per_example = forward + forward + 2 * h * c
  useful = flops_per_example * args.batch_size

  print(f"MICO Purchase-100 MLP {d}-{h}-{c}, n = {n}, expected batch"
        f" {args.batch_size}; DP: eps = {args.epsilon}, delta = 1e-5, C = 2.6,"
        f" q = 1/{round(1 / mech.sample_rate)}, sigma ="
        f" {mech.noise_multiplier:.4f}, capacity {mech.capacity}; rows computed:"
        f" {ghost.gradient_fn.head_size}, then chunks of"
        f" {ghost.gradient_fn.chunk_size} up to the batch's last row,"
        f" {_expected_rows(mech, ghost.gradient_fn.head_size, ghost.gradient_fn.chunk_size):.1f}"
        f" on average")
  print(f"devices: {jax.devices()}; JAX f32 matmul peak"
        f" {peak / 1e9:.1f} GFLOP/s")
  print(f"\n{'step':<34}{'K':>4}{'ms/step':>10}{'ms/model':>10}"
        f"{'GFLOP/s':>9}{'of peak':>9}")
  for name, num, sec in (
      ("non-DP (shuffled batches)", k, t_plain),
      (f"non-DP, batch {mech.capacity} (= capacity)", k, t_padded),
      ("DP-SGD, ghost norms", k, t_ghost),
      ("DP-SGD, ghost norms, no noise", k, t_noiseless),
      ("DP-SGD, ghost norms", k_naive, t_ghost_small),
      ("DP-SGD, naive vmap(grad)", k_naive, t_naive)):
    rate = useful * num / sec
    print(f"{name:<34}{num:>4}{sec * 1e3:>10.1f}{sec / num * 1e3:>10.2f}"
          f"{rate / 1e9:>9.1f}{rate / peak:>9.1%}")
  ratio = t_ghost / t_plain
  speedup = (t_naive / k_naive) / (t_ghost_small / k_naive)
  print(f"\nDP / non-DP step cost (K = {k}): {ratio:.2f}  (target <= 1.5:"
        f" {'met' if ratio <= 1.5 else 'NOT met'})")
  print(f"ghost / naive DP speed-up (K = {k_naive}): {speedup:.1f}x  (target"
        f" >= 10x: {'met' if speedup >= 10 else 'NOT met'})")
  print(f"Of the DP / non-DP ratio, clipping (and the rows beyond the mean"
        f" batch) accounts for {t_noiseless / t_plain:.2f}x, the noise for the"
        f" other {t_ghost / t_noiseless:.2f}x. Computing the whole capacity"
        f" would cost {t_padded / t_plain:.2f}x a non-DP step.")
  print(f"GFLOP/s count the useful work: {flops_per_example} FLOPs per"
        f" example x {args.batch_size} expected examples per model-step.")


if __name__ == "__main__":
  main()
