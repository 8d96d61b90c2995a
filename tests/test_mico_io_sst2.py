"""MICO's SST-2 RoBERTa folders read by `mico_io` as the `sst2` task's model.

Torch-free except the PyTorch comparison, which skips without torch and
transformers. The fixture's logits were computed by PyTorch
(tests/fixtures/make_tiny_roberta.py).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mico_jax import data, mico_io, pipeline, pretrained, stats, tasks

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_roberta")
# A small pool: N, n, m.
_SIZES = (40, 20, 5)


def _expected():
  with open(os.path.join(FIXTURE, "expected.json")) as f:
    expected = json.load(f)
  return np.asarray(expected["tokens"], np.int32), np.asarray(
      expected["logits"])


def _task_model():
  # What `attack_mico --task=sst2 --pretrained_dir=FIXTURE` attacks with.
  return tasks.with_pretrained(tasks.TASKS["sst2"], FIXTURE).make_model(2)


def _model_folder(root, phase, index, seeds):
  folder = root / phase / f"model_{index}"
  folder.mkdir(parents=True)
  for name, seed in zip(("seed_challenge", "seed_training",
                         "seed_membership"), seeds):
    (folder / name).write_text(f"{seed}\n")
  return folder


def _perturbed_fixture(folder, seed):
  """The fixture's weights moved at random, saved as safetensors."""
  config, params = pretrained.load_roberta_folder(FIXTURE)
  rng = np.random.default_rng(seed)
  moved = jax.tree.map(
      lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32),
      params)
  pretrained.save_roberta_folder(str(folder), config, moved)


def _read(root, model, tokens):
  release = mico_io.read_scenario(str(root), "inf", *_SIZES)
  params = mico_io.load_params(release, model, tokens)
  return release, params


def test_sst2_release_reads_as_load_roberta_folder_and_pytorch(tmp_path):
  tokens, torch_logits = _expected()
  root = tmp_path / "sst2" / "sst2_inf"
  train = _model_folder(root, "train", 0, (11, 12, 13))
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(FIXTURE, name), train)
  _perturbed_fixture(_model_folder(root, "dev", 1, (21,)), seed=0)
  model = _task_model()
  release, params_K = _read(root, model, tokens)
  assert release.phases == ("train", "dev")
  apply = jax.jit(model.apply)
  logits_K = [np.asarray(apply(jax.tree.map(lambda a, k=k: a[k], params_K),
                               jnp.asarray(tokens))) for k in range(2)]
  for k, folder in enumerate(release.folders):
    _, reference = pretrained.load_roberta_folder(folder)
    np.testing.assert_array_equal(logits_K[k],
                                  np.asarray(apply(reference, tokens)))
  np.testing.assert_allclose(logits_K[0], torch_logits, atol=1e-4, rtol=0)
  assert not np.allclose(logits_K[1], torch_logits, atol=1e-2)


def test_pytorch_model_bin_matches_transformers_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tokens, _ = _expected()
  net = transformers.RobertaForSequenceClassification.from_pretrained(
      FIXTURE).eval()
  torch.manual_seed(0)
  with torch.no_grad():
    for p in net.parameters():
      p.add_(0.3 * torch.randn_like(p))
  root = tmp_path / "sst2" / "sst2_hi"
  folder = _model_folder(root, "train", 0, (1, 2, 3))
  # As MICO's Trainer.save_model wrote it: config.json + pytorch_model.bin.
  net.config.save_pretrained(folder)
  torch.save(net.state_dict(), folder / "pytorch_model.bin")
  model = _task_model()
  _, params_K = _read(root, model, tokens)
  ids = torch.tensor(tokens, dtype=torch.long)
  with torch.no_grad():
    expected = net(ids, attention_mask=(ids != 1).long()).logits.numpy()
  ours = model.apply(jax.tree.map(lambda a: a[0], params_K), tokens)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)


def _folder_with(tmp_path, config=None, weights=True):
  folder = tmp_path / "model_0"
  folder.mkdir(parents=True)
  if config is not None:
    (folder / "config.json").write_text(json.dumps(config))
  if weights:
    shutil.copy(os.path.join(FIXTURE, "model.safetensors"), folder)
  return str(folder)


def _read_one(folder):
  model = _task_model()
  like = jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, 4), jnp.int32))
  return mico_io.read_weights(folder, model, like)


def test_bad_sst2_folders_are_one_clear_line(tmp_path):
  with open(os.path.join(FIXTURE, "config.json")) as f:
    config = json.load(f)
  with pytest.raises(mico_io.MicoIOError,
                     match="config.json: num_hidden_layers = 3, the task's"
                           " model has 2"):
    _read_one(_folder_with(tmp_path / "a", dict(config, num_hidden_layers=3)))
  with pytest.raises(mico_io.MicoIOError, match="vocab_size = 50265"):
    _read_one(_folder_with(tmp_path / "b", dict(config, vocab_size=50265)))
  with pytest.raises(mico_io.MicoIOError, match="model_0: no config.json"):
    _read_one(_folder_with(tmp_path / "c"))
  with pytest.raises(mico_io.MicoIOError,
                     match="no model.safetensors or pytorch_model.bin"):
    _read_one(_folder_with(tmp_path / "d", config, weights=False))
  truncated = _folder_with(tmp_path / "e", config)
  path = os.path.join(truncated, "model.safetensors")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(mico_io.MicoIOError,
                     match="model.safetensors: not a readable"):
    _read_one(truncated)
  # A checkpoint lacking a parameter names its PyTorch name.
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  headless = _folder_with(tmp_path / "f", config)
  state = load_file(os.path.join(FIXTURE, "model.safetensors"))
  del state["classifier.out_proj.bias"]
  save_file(state, os.path.join(headless, "model.safetensors"))
  with pytest.raises(mico_io.MicoIOError,
                     match="missing key classifier.out_proj.bias"):
    _read_one(headless)


def test_params_tree_matches_the_task_model(tmp_path):
  # The importer's tree is the model's: stacking and caching rely on it.
  model = _task_model()
  like = jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, 4), jnp.int32))
  read = _read_one(_folder_with(
      tmp_path, json.load(open(os.path.join(FIXTURE, "config.json")))))
  assert (set(traverse_util.flatten_dict(read, sep="/")) ==
          set(traverse_util.flatten_dict(like, sep="/")))


def _pool(size, seed=0):
  """Random RoBERTa inputs for the fixture: <s>, tokens, </s>, padding."""
  rng = np.random.default_rng(seed)
  tokens = np.ones((size, 8), np.int32)
  tokens[:, 0] = 0
  for row, length in enumerate(rng.integers(3, 9, size)):
    tokens[row, 1:length - 1] = rng.integers(3, 24, length - 2)
    tokens[row, length - 1] = 2
  return data.Dataset("pool", tokens, rng.integers(0, 2, size).astype(
      np.int32), 2, "text")


def test_release_read_in_groups_equals_all_at_once_and_is_reused(
    tmp_path, monkeypatch):
  root = tmp_path / "sst2" / "sst2_inf"
  for index in range(5):
    _perturbed_fixture(_model_folder(root, "train", index, (
        index + 1, index + 11, index + 21)), seed=index)
  release = mico_io.read_scenario(str(root), "inf", *_SIZES)
  dataset, model = _pool(_SIZES[0]), _task_model()
  queries = stats.default_queries(dataset)
  whole = pipeline.observe(model, mico_io.load_params(release, model,
                                                      dataset.x),
                           dataset, queries)
  read = []
  reader = mico_io.read_weights
  monkeypatch.setattr(mico_io, "read_weights",
                      lambda folder, *a: read.append(folder) or reader(
                          folder, *a))

  def observe(lines):
    return mico_io.observe_release(
        release, model, dataset, queries, models_per_read=2,
        cache_dir=str(tmp_path / "targets"), log=lines.append)

  lines = []
  # Groups 0-1, 2-3 and 4 (padded with a copy of 4): one model read once.
  for ours, theirs in zip(observe(lines), whole):
    np.testing.assert_array_equal(ours, theirs)
  assert read == list(release.folders)
  assert sorted(os.listdir(tmp_path / "targets")) == [
      "targets_0-1.npz", "targets_2-3.npz", "targets_4-4.npz"]
  assert sum("read in" in line for line in lines) == 3
  # A changed model file: only its group is read again.
  os.utime(os.path.join(release.folders[3], "model.safetensors"),
           ns=(0, 0))
  read.clear()
  lines = []
  for ours, theirs in zip(observe(lines), whole):
    np.testing.assert_array_equal(ours, theirs)
  assert read == list(release.folders[2:4])
  assert sum("statistics from" in line for line in lines) == 2
  # A folder lacking a file stops the import before any model is read.
  os.remove(os.path.join(release.folders[4], "config.json"))
  read.clear()
  with pytest.raises(mico_io.MicoIOError, match="model_4: no config.json"):
    mico_io.observe_release(release, model, dataset, queries,
                            models_per_read=2, log=None)
  assert not read


def test_default_models_per_read_from_the_budget():
  model = _task_model()
  x = np.zeros((1, 8), np.int32)
  like = jax.eval_shape(model.init, jax.random.key(0), x)
  size = sum(a.size * 4 for a in jax.tree.leaves(like))
  assert mico_io.default_models_per_read(model, x, 200, 3 * size + 1) == 3
  assert mico_io.default_models_per_read(model, x, 200, size - 1) == 1
  assert mico_io.default_models_per_read(model, x, 200, 10**12) == 16
  assert mico_io.default_models_per_read(model, x, 5, 10**12) == 5
