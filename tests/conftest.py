"""Shared test setup: loud broadcasting, and the repo root importable."""

import jax

# Silent rank promotion hides shape bugs across the K, N and A axes.
jax.config.update("jax_numpy_rank_promotion", "raise")
