"""Binary pools held as bits: the same rows, the same training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mico_jax import bitpack, dp, models, pipeline, train


@pytest.mark.parametrize("shape,dtype", [((37, 70), np.float32),
                                         ((9, 64), np.float32),
                                         ((11, 3, 5), np.float32),
                                         ((13, 40), np.int32)])
def test_packed_rows_are_the_rows_bit_for_bit(shape, dtype):
  x = (np.random.default_rng(0).random(shape) < 0.3).astype(dtype)
  packed = bitpack.pack(x)
  assert isinstance(packed, bitpack.BinaryRows)
  assert packed.shape == x.shape and len(packed) == len(x)
  assert packed.words_NxW.shape == (len(x), -(-x[0].size // 32))
  idx = np.array([[4, 0, 8], [len(x) - 1, 4, 1]])
  for key in (0, -1, idx, idx[0], slice(2, 7)):
    got = np.asarray(packed[key])
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got.view(np.uint8), x[key].view(np.uint8))
  # On devices, under jit and vmap, as `train` and `dp` index it.
  on_device = jax.tree.map(jnp.asarray, packed)
  gathered = jax.jit(jax.vmap(lambda rows, i: rows[i], in_axes=(None, 0)))(
      on_device, jnp.asarray(idx))
  np.testing.assert_array_equal(np.asarray(gathered), x[idx])


@pytest.mark.parametrize("x", [
    np.array([[0, 1], [0.5, 1]], np.float32),
    np.array([[0, 1], [-0.0, 1]], np.float32),  # -0.0 would come back +0.0
    np.array([[0, 1], [np.nan, 1]], np.float32),
    np.array([[0, 2], [3, 1]], np.int32),  # token ids
    np.array([[1, 0], [0, 1]], np.complex64),
    np.array([0, 1, 1], np.float32),  # no feature axis
    np.zeros((0, 4), np.float32)])
def test_other_pools_stay_as_they_are(x):
  assert bitpack.pack(x) is x


@pytest.mark.parametrize("dp_config", [None, dp.DPConfig(10.0)])
def test_training_on_packed_rows_is_training_on_the_rows(dp_config):
  rng = np.random.default_rng(1)
  x_N = (rng.random((120, 45)) < 0.2).astype(np.float32)
  y_N = rng.integers(0, 4, 120).astype(np.int32)
  config = train.TrainConfig("adam", 0.01, batch_size=16, epochs=2,
                             dp=dp_config)
  trainer = pipeline.make_trainer(models.MLP(4, (8,)), config, 80)
  train_KxT = np.stack([rng.permutation(120)[:80] for _ in range(2)])
  start = trainer.init(train.model_keys(np.arange(6).reshape(2, 3)), x_N[0])
  packed = bitpack.pack(x_N)
  assert isinstance(packed, bitpack.BinaryRows)
  on_rows, on_bits = (
      train.train(trainer, start, train_KxT, x, y_N, 2, log=None)
      for x in (x_N, packed))
  jax.tree.map(np.testing.assert_array_equal, on_rows, on_bits)
