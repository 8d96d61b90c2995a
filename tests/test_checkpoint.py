"""Checkpoints: exact round trips; damaged or foreign ones are never loaded."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mico_jax import challenge, checkpoint, models, pipeline, stats, train

DESCRIPTION = {"model": "MLP(16)", "seeds": "abc", "num_models": 3}


def _state(offset):
  return {"params_KxD": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7
                        + offset,
          "key_K": jnp.full((3, 2), 5 + offset, jnp.uint32),
          "step": jnp.int32(offset)}


def _abstract(state):
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      state)


@pytest.fixture(name="saved")
def _saved(tmp_path):
  """Checkpoints at steps 3 and 6 in a fresh folder."""
  directory = str(tmp_path / "ckpt")
  checkpoints = checkpoint.TrainCheckpoints(directory, DESCRIPTION)
  checkpoints.save(_state(3), 3)
  checkpoints.save(_state(6), 6)
  checkpoints.close()
  return directory


def _restore(directory, logs=None):
  checkpoints = checkpoint.TrainCheckpoints(directory, DESCRIPTION)
  state = checkpoints.restore(_abstract(_state(0)),
                              log=None if logs is None else logs.append)
  checkpoints.close()
  return state


def test_restores_the_latest_state_exactly(saved):
  jax.tree.map(np.testing.assert_array_equal, _restore(saved), _state(6))


def test_empty_folder_restores_nothing(tmp_path):
  assert _restore(str(tmp_path / "none")) is None


def test_unfinished_save_is_ignored(saved):
  # What a run killed mid-save leaves: orbax renames only complete steps.
  shutil.copytree(os.path.join(saved, "6"),
                  os.path.join(saved, "9.orbax-checkpoint-tmp-1234"))
  assert int(_restore(saved)["step"]) == 6


def _truncate_data(step_dir):
  for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                        recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _flip_data(step_dir):
  for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                        recursive=True):
    data = bytearray(open(path, "rb").read())
    data[-8:] = bytes(255 - b for b in data[-8:])
    open(path, "wb").write(bytes(data))


def _delete_state_file(step_dir):
  os.remove(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                      recursive=True)[0])


def _older_state(step_dir):
  # Well-formed files holding the wrong values: only the checksums tell.
  older = os.path.join(os.path.dirname(step_dir), "3", "state")
  shutil.rmtree(os.path.join(step_dir, "state"))
  shutil.copytree(older, os.path.join(step_dir, "state"))


def _delete_metadata(step_dir):
  shutil.rmtree(os.path.join(step_dir, "meta"))


@pytest.mark.parametrize("damage", [_truncate_data, _flip_data,
                                    _delete_state_file, _older_state,
                                    _delete_metadata])
def test_damaged_latest_falls_back_to_previous_and_says_so(saved, damage):
  damage(os.path.join(saved, "6"))
  logs = []
  state = _restore(saved, logs)
  jax.tree.map(np.testing.assert_array_equal, state, _state(3))
  assert len(logs) == 1 and "damaged" in logs[0]
  assert os.path.join(saved, "6") in logs[0]


def test_all_damaged_is_an_error_naming_the_folder(saved):
  _truncate_data(os.path.join(saved, "6"))
  _delete_metadata(os.path.join(saved, "3"))
  with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint"
                     ) as e:
    _restore(saved)
  assert saved in str(e.value)


def test_checkpoint_of_another_configuration_is_refused(saved):
  checkpoints = checkpoint.TrainCheckpoints(
      saved, {**DESCRIPTION, "num_models": 4})
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"different configuration .*num_models \(3 there,"
                     r" 4 here\)"):
    checkpoints.restore(_abstract(_state(0)), log=None)


def test_checksums_see_changed_and_swapped_values():
  tree = {"a": jnp.arange(6, dtype=jnp.float32), "b": jnp.arange(3)}
  base = np.asarray(checkpoint.checksums(tree))
  swapped = {**tree, "a": tree["a"][::-1]}
  nudged = {**tree, "a": tree["a"].at[2].add(1e-6)}
  assert (np.asarray(checkpoint.checksums(swapped)) != base).any()
  assert (np.asarray(checkpoint.checksums(nudged)) != base).any()


def _results():
  params = {"dense": {"kernel": np.arange(6.0, dtype=np.float32).reshape(
      3, 2), "bias": np.ones((3, 1), np.float32)}}
  rng = np.random.default_rng(0)
  observed = stats.Stats(rng.normal(size=(3, 5, 2)).astype(np.float32),
                         rng.random((3, 5, 2)).astype(np.float32),
                         rng.random((3, 5)) > 0.5)
  return params, observed


def test_results_round_trip_and_refuse_other_configurations(tmp_path):
  path = str(tmp_path / "trained" / "models_0-2.npz")
  params, observed = _results()
  assert checkpoint.load_results(path, DESCRIPTION, params) is None
  checkpoint.save_results(path, DESCRIPTION, params, observed)
  loaded_params, loaded = checkpoint.load_results(path, DESCRIPTION, params)
  jax.tree.map(np.testing.assert_array_equal, loaded_params, params)
  jax.tree.map(np.testing.assert_array_equal, tuple(loaded), tuple(observed))
  with pytest.raises(checkpoint.CheckpointError, match="seeds"):
    checkpoint.load_results(path, {**DESCRIPTION, "seeds": "xyz"}, params)


def test_damaged_results_are_refused(tmp_path):
  path = str(tmp_path / "models_0-2.npz")
  params, observed = _results()
  checkpoint.save_results(path, DESCRIPTION, params, observed)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(checkpoint.CheckpointError, match="damaged"):
    checkpoint.load_results(path, DESCRIPTION, params)


def test_saved_state_of_another_code_version_is_refused(saved, tmp_path,
                                                        monkeypatch):
  path = str(tmp_path / "models_0-2.npz")
  params, observed = _results()
  checkpoint.save_results(path, DESCRIPTION, params, observed)
  monkeypatch.setattr(checkpoint, "code_version", lambda: "0.0.1 sources new")
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"differs in: code_version \(.* there, 0.0.1"
                     r" sources new here\)"):
    checkpoint.load_results(path, DESCRIPTION, params)
  with pytest.raises(checkpoint.CheckpointError, match="code_version"):
    _restore(saved)


def test_code_version_hashes_the_sources(tmp_path, monkeypatch):
  version = checkpoint.code_version()
  assert version.split(" sources ")[1].isalnum()
  # Another copy of the package with one source changed has another hash.
  package = os.path.dirname(checkpoint.__file__)
  copy = tmp_path / "mico_jax"
  shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
  with open(copy / "report.py", "a") as f:
    f.write("# changed\n")
  monkeypatch.setattr(checkpoint, "__file__", str(copy / "checkpoint.py"))
  checkpoint.code_version.cache_clear()
  try:
    assert checkpoint.code_version() != version
  finally:
    monkeypatch.undo()
    checkpoint.code_version.cache_clear()
  assert checkpoint.code_version() == version


def _toy_training(epochs):
  """A small trainer and state (3 models, 8 steps an epoch) and its data."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(120, 6)).astype(np.float32)
  y = x[:, :3].argmax(1).astype(np.int32)
  chal = challenge.make_challenge(120, 64, 8, challenge.make_seeds(0, 3))
  trainer = pipeline.make_trainer(models.MLP(3, (8,)),
                                  train.TrainConfig(batch_size=8,
                                                    epochs=epochs), 64)
  state = trainer.init(train.model_keys(chal.seeds_Kx3), jnp.asarray(x[0]))
  return trainer, state, (chal.train_KxT, x, y)


def test_saves_by_time_at_epoch_ends_and_resumes_bit_exactly():
  trainer, state, data_ = _toy_training(3)
  saved = []
  final = train.train(trainer, state, *data_, 3, log=None, save=saved.append,
                      save_seconds=1e-9)
  # Every scan boundary is past the interval: each epoch's end, once.
  assert [int(s.step) for s in saved] == [8, 16, 24]
  resumed = train.train(trainer, saved[0], *data_, 3, log=None)
  jax.tree.map(np.testing.assert_array_equal, resumed, final)


def test_interrupted_training_saves_its_last_epoch_end():
  trainer, state, data_ = _toy_training(3)
  saved = []

  def interrupt_in_epoch_two(message):
    if message.startswith("epoch 2/"):
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    train.train(trainer, state, *data_, 3, log=interrupt_in_epoch_two,
                save=saved.append)
  assert [int(s.step) for s in saved] == [16]
  final = train.train(trainer, state, *data_, 3, log=None)
  resumed = train.train(trainer, saved[0], *data_, 3, log=None)
  jax.tree.map(np.testing.assert_array_equal, resumed, final)
