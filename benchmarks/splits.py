r"""MICO's splits for many models: `challenge.make_challenge` against the budget.

  python -m benchmarks.splits            # 200 models, Purchase-100's pool

Times the splits of K models (three MICO `random_split`s each) on a pool of N
points, against the issue's budget (200 models, N = 197,324, <= 10 s on 2
cores). Fisher–Yates is sequential in its step i, so the loop over i is
vectorised across models; for comparison, the same steps as a jitted
`lax.fori_loop` over i (scatter into a `[N, R]` array) are timed on the first
`--jax_steps` steps and extrapolated to the N steps of one loop (its CPU
time: XLA may use both cores).
"""

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mico_jax import challenge


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", type=int, default=200, help="K")
  parser.add_argument("--pool_size", type=int, default=197_324, help="N")
  parser.add_argument("--len_training", type=int, default=150_000, help="n")
  parser.add_argument("--jax_steps", type=int, default=256,
                      help="Fisher-Yates steps timed for the JAX variant")
  return parser.parse_args()


@functools.partial(jax.jit, donate_argnums=0)
def _jax_steps(perm_NxR, where_SxR):
  """Fisher–Yates steps 0..S-1 for R permutations, `where` = swap partners.

  One scatter a step (the gather-then-two-updates form made XLA copy the
  whole array every step).
  """
  cols_R = jnp.arange(perm_NxR.shape[1])
  cols_2R = jnp.concatenate([cols_R, cols_R])
  def step(i, perm_NxR):
    where_R = where_SxR[i]
    rows_2R = jnp.concatenate([jnp.full_like(where_R, i), where_R])
    values_2R = jnp.concatenate([perm_NxR[where_R, cols_R], perm_NxR[i]])
    return perm_NxR.at[rows_2R, cols_2R].set(values_2R)
  return jax.lax.fori_loop(0, where_SxR.shape[0], step, perm_NxR)


def main():
  args = _parse()
  big, num = args.pool_size, args.models
  print(f"K = {num} models, N = {big}, n = {args.len_training}, m = 100;"
        f" load average {os.getloadavg()[0]:.1f}")
  seeds = challenge.make_seeds(0, num)
  start, start_cpu = time.perf_counter(), time.process_time()
  chal = challenge.make_challenge(big, args.len_training, 100, seeds)
  numpy_s = time.perf_counter() - start
  cpu_s = time.process_time() - start_cpu
  # One thread: on an idle machine wall time is the CPU time; under load the
  # CPU time is the steadier figure.
  print(f"make_challenge (numpy, vectorised over models): {numpy_s:.2f} s"
        f" wall, {cpu_s:.2f} s CPU ({cpu_s / 10:.2f}x the 10 s budget)")
  assert chal.train_KxT.shape == (num, args.len_training)

  # The JAX alternative on the first steps: R = 2K permutations of ~N.
  steps, rows = args.jax_steps, 2 * num
  rng = np.random.default_rng(0)
  where_SxR = (np.arange(steps)[:, None]
               + rng.integers(0, big - steps, (steps, rows))).astype(np.int32)
  perm_NxR = jnp.tile(jnp.arange(big, dtype=jnp.int32)[:, None], (1, rows))
  perm_NxR = _jax_steps(perm_NxR, where_SxR[:2])  # compile
  perm_NxR.block_until_ready()
  start = time.process_time()
  _jax_steps(perm_NxR, where_SxR).block_until_ready()
  jax_s = (time.process_time() - start) / steps * big
  print(f"lax.fori_loop variant: {jax_s:.2f} s CPU extrapolated from {steps}"
        f" steps (numpy / JAX CPU time {cpu_s / jax_s:.3f})")


if __name__ == "__main__":
  main()
