"""Attacks that need no shadow models."""

import jax


@jax.jit
def loss_attack(loss_KxNxA: jax.Array) -> jax.Array:
  """LOSS (Yeom et al., 2018): a low loss on the unaugmented query means member."""
  return -loss_KxNxA[..., 0]
