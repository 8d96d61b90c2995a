r"""Attack cost at MICO Location's scale: every target in one batched call.

  python -m benchmarks.attacks [--models=200 --points=5010 --queries=1]

Random statistics with a planted membership signal for K models on N points
(A queries), each model with 200 challenge points, every model a shadow;
each attack of `attacks.ATTACKS` is timed after a warm-up call that
compiles, as the median of `--repeats` runs, against the issue's budget of
2 s a call. `selected` and `combined` reuse the candidates' cached scores
within one set of observations, so they are timed on fresh observations
(every candidate recomputed) and with the candidates already computed (as
in the main job, which runs them first).
"""

import argparse
import os
import time

import numpy as np

from mico_jax import attacks


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", type=int, default=200, help="K")
  parser.add_argument("--points", type=int, default=5010, help="N")
  parser.add_argument("--queries", type=int, default=1, help="A")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--budget", type=float, default=2.0, help="seconds")
  return parser.parse_args()


def _observations(k, n, a, rng):
  keep = rng.random((k, n)) < 0.5
  stat = (rng.normal(size=(1, n, 1)) * 2 + 0.5 * keep[..., None] +
          rng.normal(size=(k, n, a))).astype(np.float32)
  challenge = np.stack([rng.permutation(n)[:200] for _ in range(k)])
  return attacks.Observations(stat, np.log1p(np.exp(-stat)), keep, None,
                              challenge)


def _time(fn, inputs):
  times = []
  for x in inputs:
    start = time.perf_counter()
    np.asarray(fn(x))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  args = _parse()
  rng = np.random.default_rng(0)
  k, n, a = args.models, args.points, args.queries
  print(f"K={k} N={n} A={a}; {os.cpu_count()} CPUs; load average"
        f" {os.getloadavg()[0]:.1f} at start")
  # Distinct observations for every call, so the per-observations cache
  # misses; the first compiles.
  inputs = [_observations(k, n, a, rng) for _ in range(args.repeats + 1)]
  rows = []
  for name, attack in attacks.ATTACKS.items():
    if name in ("selected", "combined"):
      continue
    attack(inputs[0])
    rows.append((name, _time(attack, inputs[1:])))
  for name, fn in (("selected", attacks.select_lib.select),
                   ("combined", attacks.select_lib.combine)):
    rows.append((f"{name} (all candidates computed)",
                 _time(attacks.ATTACKS[name], [_observations(k, n, a, rng)])))
    # The main job has run the candidates already: only the choice is new.
    obs = _observations(k, n, a, rng)
    attacks.select_lib.score_candidates(obs)
    rows.append((f"{name} (candidates cached)",
                 _time(lambda o, fn=fn: fn(o).score_KxN, [obs])))
  width = max(len(r[0]) for r in rows)
  for name, seconds in rows:
    verdict = "ok" if seconds <= args.budget else "OVER"
    print(f"{name:<{width}}  {seconds:7.3f} s  {seconds / args.budget:5.2f}x"
          f" budget  {verdict}")
  print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
  main()
