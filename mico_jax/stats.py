"""The statistics pass: every model x every point x every query, in one vmapped sweep.

For logits z and label y the statistic is LiRA's logit-scaled confidence
`log p_y - log sum_{i != y} p_i = z_y - logsumexp_{i != y} z_i`, computed from
the logits directly so it stays finite when p_y rounds to 1.
"""

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mico_jax.data import Dataset


@dataclasses.dataclass(frozen=True)
class Query:
  """One query augmentation of an image: optional flip, then a shift in pixels."""

  flip: bool = False
  dy: int = 0
  dx: int = 0

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    if self.flip:
      x_BxHxWxC = x_BxHxWxC[:, :, ::-1]
    if not (self.dy or self.dx):
      return x_BxHxWxC
    # Shift with reflected borders, as LiRA's training crops do.
    pad = max(abs(self.dy), abs(self.dx))
    padded = jnp.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                     mode="reflect")
    _, h, w, _ = x_BxHxWxC.shape
    return padded[:, pad - self.dy:pad - self.dy + h,
                  pad - self.dx:pad - self.dx + w]


IDENTITY = Query()


def default_queries(dataset: Dataset, shift: int = 1) -> tuple[Query, ...]:
  """Identity first; for images also shifts by `shift` pixels (and flips)."""
  if dataset.kind != "image":
    return (IDENTITY,)
  shifts = [(0, 0)] + ([(shift, 0), (-shift, 0), (0, shift), (0, -shift)]
                       if shift else [])
  flips = (False, True) if dataset.hflip else (False,)
  return tuple(Query(f, dy, dx) for f in flips for dy, dx in shifts)


class Stats(NamedTuple):
  """Per-model, per-point, per-query observations (numpy, on the host)."""

  stat_KxNxA: np.ndarray  # logit-scaled confidence of the true label
  loss_KxNxA: np.ndarray  # cross-entropy
  correct_KxN: np.ndarray  # argmax == label, first query (identity)


def logit_scaled_confidence(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`z_y - logsumexp_{i != y} z_i` over the last axis."""
  true = jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool),
                     -jnp.inf, logits)
  return true - jax.nn.logsumexp(others, axis=-1)


@functools.partial(jax.jit, static_argnames=("apply_fn", "queries"))
def _stats_batch(apply_fn, queries, params_K, x_B, y_B):
  logits_AxKxBxC = jnp.stack([
      jax.vmap(apply_fn, in_axes=(0, None))(params_K, query(x_B))
      for query in queries])
  logits_KxBxAxC = logits_AxKxBxC.transpose(1, 2, 0, 3)
  stat = logit_scaled_confidence(logits_KxBxAxC, y_B[None, :, None])
  # Cross-entropy -log p_y = log(1 + exp(-stat)): exact, and unlike
  # logsumexp(z) - z_y it does not round to 0 for confident predictions.
  loss = jax.nn.softplus(-stat)
  correct = logits_KxBxAxC[:, :, 0].argmax(-1) == y_B[None]
  return stat, loss, correct


def compute_stats(apply_fn: Callable, params_K, x_N: np.ndarray,
                  y_N: np.ndarray, queries: Sequence[Query] = (IDENTITY,),
                  batch_size: int = 512,
                  to_host: Callable[[jax.Array], np.ndarray] = np.asarray
                  ) -> Stats:
  """Runs all K models on all N points under every query, batch by batch.

  The last batch is padded to `batch_size` so only one shape is compiled.
  `to_host` fetches each batch's results; models sharded over several hosts
  need a gathering one (`parallel.to_host`).
  """
  queries = tuple(queries)
  n = len(y_N)
  parts = []
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    x_B = np.concatenate([x_N[start:stop], np.repeat(x_N[:1], pad, 0)])
    y_B = np.concatenate([y_N[start:stop], np.repeat(y_N[:1], pad, 0)])
    out = _stats_batch(apply_fn, queries, params_K, jnp.asarray(x_B),
                       jnp.asarray(y_B))
    parts.append([to_host(o)[:, :stop - start] for o in out])
  stat, loss, correct = (np.concatenate(p, axis=1) for p in zip(*parts))
  return Stats(stat, loss, correct)
