"""K models trained together equal each trained alone; sampling and schedules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mico_jax import challenge, data, dp, models, pipeline, train

N, n, m = 400, 160, 20


@pytest.fixture(scope="module", name="setup")
def _setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, 12)).astype(np.float32)
  y = (x[:, :3].argmax(1)).astype(np.int32)
  chal = challenge.make_challenge(N, n, m, challenge.make_seeds(1, 3))
  return data.Dataset("toy", x, y, 3, "tabular"), chal


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_vmapped_training_equals_training_each_model_alone(setup, optimizer):
  dataset, chal = setup
  config = train.TrainConfig(optimizer=optimizer, learning_rate=0.05,
                             momentum=0.9, batch_size=32, epochs=3,
                             decay_every=1, decay_rate=0.5)
  model = models.MLP(3, (16,))
  together = pipeline.train_models(model, config, dataset, chal, log=None)
  for k in range(3):
    alone = pipeline.train_models(model, config, dataset, chal.select([k]),
                                  log=None)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a[k], b[0], rtol=1e-5,
                                                atol=1e-6), together, alone)
  # The models really differ from one another (their own seeds and data).
  leaf = jax.tree.leaves(together)[0]
  assert not np.allclose(leaf[0], leaf[1])


def test_unrolled_training_equals_looped_training(setup):
  dataset, chal = setup
  config = train.TrainConfig(learning_rate=0.01, batch_size=32, epochs=2)
  model = models.MLP(3, (16,))
  looped = pipeline.train_models(model, config, dataset, chal, log=None)
  unrolled = pipeline.train_models(model, config, dataset, chal, log=None,
                                   unroll=True)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      looped, unrolled)


def test_model_groups_equal_all_models_vmapped_together():
  # 4 DP-SGD CNNs (the conv layers take the patches path) stepped one at a
  # time (`lax.map`, no vmap), all four in one vmap, and in groups of two
  # stepped from Python (`unroll`): the same models.
  rng = np.random.default_rng(1)
  x_N = jnp.asarray(rng.normal(size=(40, 16, 16, 3)), jnp.float32)
  y_N = jnp.asarray(rng.integers(0, 3, 40), jnp.int32)
  config = train.TrainConfig("sgd", 0.5, batch_size=8, epochs=2,
                             dp=dp.DPConfig(10.0))
  base = pipeline.make_trainer(models.CNN(3, (4, 6, 6)), config, 30)
  keys = train.model_keys(np.arange(12).reshape(4, 3))
  train_KxT = jnp.asarray(np.stack([rng.permutation(40)[:30]
                                    for _ in range(4)]), jnp.int32)
  start = base.init(keys, x_N[0])  # the same for every grouping
  results = []
  for group, unroll in ((1, False), (4, False), (2, True)):
    trainer = dataclasses.replace(base, model_group=group, unroll=unroll)
    state, loss_K = trainer.run(start, train_KxT, x_N, y_N, 3)
    results.append((state.params, loss_K))
  for other in results[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-6),
                 results[0], other)
  # Stepped from Python, 3 steps as 1 + 2 are the 3 steps bit for bit.
  first, _ = trainer.run(start, train_KxT, x_N, y_N, 1)
  split, _ = trainer.run(first, train_KxT, x_N, y_N, 2)
  assert int(split.step) == 3
  jax.tree.map(np.testing.assert_array_equal, split.params, results[-1][0])


def test_training_reduces_loss_and_resumes_mid_run(setup):
  dataset, chal = setup
  x, y = dataset.x, dataset.y
  config = train.TrainConfig(learning_rate=0.01, batch_size=32, epochs=4)
  trainer = pipeline.make_trainer(models.MLP(3, (16,)), config, n)
  state = trainer.init(train.model_keys(chal.seeds_Kx3), jnp.asarray(x[0]))
  args = (jnp.asarray(chal.train_KxT), jnp.asarray(x), jnp.asarray(y))
  steps = trainer.sampler.steps_per_epoch
  first, loss_first = trainer.run(state, *args, steps)
  whole, loss_last = trainer.run(first, *args, 3 * steps)
  assert (np.asarray(loss_last) < np.asarray(loss_first)).all()
  # Running 4 epochs in two pieces or in one gives the same state.
  direct, _ = trainer.run(state, *args, 4 * steps)
  jax.tree.map(np.testing.assert_array_equal, whole, direct)
  # A 1-step run then the rest: the same state too.
  one, _ = trainer.run(state, *args, 1)
  rest, _ = trainer.run(one, *args, 4 * steps - 1)
  jax.tree.map(np.testing.assert_array_equal, rest, direct)
  assert int(whole.step) == 4 * steps


def test_epoch_shuffle_visits_every_point_once_per_epoch():
  sampler = train.EpochShuffle(num_points=10, batch_size=4)
  assert sampler.steps_per_epoch == 3
  key = jax.random.PRNGKey(0)
  state = sampler.init(key)
  seen = {0: [], 1: []}
  for step in range(6):
    state, positions, mask = sampler.sample(state, key, jnp.asarray(step))
    seen[step // 3] += np.asarray(positions)[np.asarray(mask)].tolist()
  assert sorted(seen[0]) == sorted(seen[1]) == list(range(10))
  assert seen[0] != seen[1]  # a new order each epoch


def test_sequential_batches_are_the_list_in_order_with_a_short_last_batch():
  # PyTorch's DataLoader(range(10), batch_size=4): [0-3], [4-7], [8, 9].
  sampler = train.Sequential(num_points=10, batch_size=4)
  assert sampler.steps_per_epoch == 3
  key = jax.random.PRNGKey(0)
  state = sampler.init(key)
  batches = []
  for step in range(6):
    state, positions, mask = sampler.sample(state, key, jnp.asarray(step))
    batches.append(np.asarray(positions)[np.asarray(mask)].tolist())
  assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] * 2
  assert np.asarray(positions).max() < 10  # padding stays in range


def test_unshuffled_recipe_trains_members_first_every_epoch(setup):
  # Through make_trainer, as MICO's non-DP recipes train: the first batch
  # of an epoch is the list's first points (the members), in every epoch.
  config = train.TrainConfig(learning_rate=0.01, batch_size=32, epochs=2,
                             shuffle=False)
  trainer = pipeline.make_trainer(models.MLP(3, (16,)), config, n)
  assert isinstance(trainer.sampler, train.Sequential)
  steps = trainer.sampler.steps_per_epoch
  for step in (0, steps):
    _, positions, mask = trainer.sampler.sample((), None, jnp.asarray(step))
    np.testing.assert_array_equal(positions, np.arange(32))
    assert np.asarray(mask).all()
  _, chal = setup
  members = chal.challenge_KxC[0][chal.member_KxC[0]]
  assert set(chal.train_KxT[0][:m]) == set(members)


def test_step_decay_matches_pytorch_steplr():
  config = train.TrainConfig(optimizer="sgd", learning_rate=1.0, epochs=20,
                             decay_every=5, decay_rate=0.9)
  opt = train.make_optimizer(config, steps_per_epoch=10)
  params = {"w": jnp.zeros(())}
  state = opt.init(params)
  lrs = []
  for _ in range(200):
    updates, state = opt.update({"w": jnp.ones(())}, state, params)
    lrs.append(-float(updates["w"]))
  expected = [0.9 ** (step // 10 // 5) for step in range(200)]
  np.testing.assert_allclose(lrs, expected, rtol=1e-6)


def test_bad_recipes_are_refused():
  with pytest.raises(ValueError, match="optimizer"):
    train.TrainConfig(optimizer="rmsprop")
  with pytest.raises(ValueError, match="positive"):
    train.TrainConfig(batch_size=0)
