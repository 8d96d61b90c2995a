r"""MICO's splits for many models: `challenge.make_challenge` against the budget.

  python -m benchmarks.splits            # 200 models, Purchase-100's pool

Times the splits of K models (three MICO `random_split`s each) on a pool of N
points, against the issue's budget (200 models, N = 197,324, <= 10 s on 2
cores). Fisher–Yates is sequential in its step i, so the loop over i is
vectorised across models; for comparison, the same steps as a jitted
`lax.fori_loop` over i (scatter into a `[N, R]` array) are timed on the first
`--jax_steps` steps and extrapolated per step.
"""

import argparse
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
  parser.add_argument("--jax_steps", type=int, default=4096,
                      help="Fisher-Yates steps timed for the JAX variant")
  return parser.parse_args()


@jax.jit
def _jax_steps(perm_NxR, where_SxR):
  """Fisher–Yates steps 0..S-1 for R permutations, `where` = swap partners."""
  cols_R = jnp.arange(perm_NxR.shape[1])
  def step(i, perm_NxR):
    row_R = perm_NxR[i]
    perm_NxR = perm_NxR.at[i].set(perm_NxR[where_SxR[i], cols_R])
    return perm_NxR.at[where_SxR[i], cols_R].set(row_R)
  return jax.lax.fori_loop(0, where_SxR.shape[0], step, perm_NxR)


def main():
  args = _parse()
  big, num = args.pool_size, args.models
  print(f"K = {num} models, N = {big}, n = {args.len_training}, m = 100;"
        f" load average {os.getloadavg()[0]:.1f}")
  seeds = challenge.make_seeds(0, num)
  start = time.perf_counter()
  chal = challenge.make_challenge(big, args.len_training, 100, seeds)
  numpy_s = time.perf_counter() - start
  print(f"make_challenge (numpy, vectorised over models): {numpy_s:.2f} s"
        f" ({numpy_s / 10:.2f}x the 10 s budget)")
  assert chal.train_KxT.shape == (num, args.len_training)

  # The JAX alternative on the first steps: R = 2K permutations of ~N.
  steps, rows = args.jax_steps, 2 * num
  rng = np.random.default_rng(0)
  where_SxR = (np.arange(steps)[:, None]
               + rng.integers(0, big - steps, (steps, rows))).astype(np.int32)
  perm_NxR = jnp.broadcast_to(jnp.arange(big, dtype=jnp.int32)[:, None],
                              (big, rows))
  _jax_steps(perm_NxR, where_SxR[:2]).block_until_ready()  # compile
  start = time.perf_counter()
  _jax_steps(perm_NxR, where_SxR).block_until_ready()
  jax_s = (time.perf_counter() - start) / steps * (2 * big)
  print(f"lax.fori_loop variant: {jax_s:.2f} s extrapolated from {steps}"
        f" steps (numpy / JAX time {numpy_s / jax_s:.2f})")


if __name__ == "__main__":
  main()
