"""The flax RoBERTa equals Hugging Face's; folders, caches and tokenizers load
offline."""

import json
import os
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mico_jax import pretrained, roberta

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_roberta")


def _logits(config, params, tokens, dtype=jnp.float32):
  model = roberta.RobertaClassifier(config, dtype=dtype)
  return np.asarray(jax.jit(model.apply)(params, jnp.asarray(tokens)))


def test_safetensors_fixture_matches_pytorch_logits_without_torch(
    monkeypatch):
  # The fixture's logits came from PyTorch (tests/fixtures/
  # make_tiny_roberta.py); reading safetensors must not need torch.
  monkeypatch.setitem(sys.modules, "torch", None)
  config, params = pretrained.load_roberta_folder(FIXTURE)
  with open(os.path.join(FIXTURE, "expected.json")) as f:
    expected = json.load(f)
  np.testing.assert_allclose(_logits(config, params, expected["tokens"]),
                             expected["logits"], atol=1e-4, rtol=0)
  # bfloat16 compute, float32 parameters: close, not equal.
  np.testing.assert_allclose(
      _logits(config, params, expected["tokens"], jnp.bfloat16),
      expected["logits"], atol=0.1)


def test_random_transformers_model_matches_from_both_file_formats(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(1)
  config = transformers.RobertaConfig(
      vocab_size=50, hidden_size=16, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=24, max_position_embeddings=16,
      num_labels=3)
  model = transformers.RobertaForSequenceClassification(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.5)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 50, (4, 10))
  tokens[:, 0] = 0
  for row, length in enumerate([10, 7, 3, 5]):
    tokens[row, length - 1] = 2
    tokens[row, length:] = 1
  ids = torch.tensor(tokens)
  with torch.no_grad():
    expected = model(ids, attention_mask=(ids != 1).long()).logits.numpy()

  model.save_pretrained(tmp_path / "st")  # model.safetensors
  (tmp_path / "bin").mkdir()
  config.save_pretrained(tmp_path / "bin")
  torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  cache = tmp_path / "cache"
  for folder in ("st", "bin"):
    ours_config, params = pretrained.load_roberta_folder(
        str(tmp_path / folder), cache_dir=str(cache))
    assert ours_config.num_labels == 3
    np.testing.assert_allclose(_logits(ours_config, params, tokens), expected,
                               atol=1e-4, rtol=0)
  # The converted bin is cached: a second load needs no torch.
  assert len(os.listdir(cache)) == 1
  sys.modules["torch"], saved = None, sys.modules["torch"]
  try:
    _, again = pretrained.load_roberta_folder(str(tmp_path / "bin"),
                                              cache_dir=str(cache))
  finally:
    sys.modules["torch"] = saved
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_missing_files_are_named(tmp_path):
  with pytest.raises(pretrained.FolderError, match="config.json"):
    pretrained.load_roberta_folder(str(tmp_path))
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(pretrained.FolderError,
                     match="model.safetensors or pytorch_model.bin"):
    pretrained.load_roberta_folder(str(tmp_path))
  with pytest.raises(pretrained.FolderError, match="vocab.json"):
    pretrained.load_tokenizer(str(tmp_path), 8)


def test_pretrained_init_keeps_weights_and_draws_a_head_per_model(tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  state = load_file(os.path.join(FIXTURE, "model.safetensors"))
  # roberta-base has no classification head: each model draws its own.
  save_file({k: v for k, v in state.items() if not k.startswith("classifier")},
            str(tmp_path / "model.safetensors"))
  with open(os.path.join(FIXTURE, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  model = pretrained.pretrained_classifier(str(tmp_path), 2)
  params = jax.jit(jax.vmap(lambda k: model.init(k, jnp.zeros((1, 4),
                                                               jnp.int32))))(
      jax.random.split(jax.random.key(0), 2))["params"]
  word = params["roberta"]["embeddings"]["word_embeddings"]["embedding"]
  np.testing.assert_array_equal(
      word, np.stack([state["roberta.embeddings.word_embeddings.weight"]] * 2))
  head = np.asarray(params["classifier"]["out_proj"]["kernel"])
  assert not np.allclose(head[0], head[1])


def test_tokenizer_matches_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  _byte_level_folder(str(tmp_path), [("Ġ", "g"), ("o", "o"), ("Ġg", "oo"),
                                     ("Ġgoo", "d"), ("'", "t"), ("n", "'t")])
  sentences = ["a good film", "is n't good , really", "", "good " * 20]
  ids, truncated = pretrained.tokenize(str(tmp_path), sentences, 12)
  assert ids.shape == (4, 12) and truncated == 2  # the last two
  reference = transformers.RobertaTokenizer(
      str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))(
          sentences, padding="max_length", truncation=True, max_length=12)
  np.testing.assert_array_equal(ids, reference["input_ids"])


def test_ghost_clipping_of_the_transformer_equals_naive():
  from mico_jax import dp  # pylint: disable=g-import-not-at-top
  config = roberta.RobertaConfig(
      vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=12, max_position_embeddings=12)
  model = roberta.RobertaClassifier(config)
  # Repeated tokens within a sentence and padding (id 1) of several lengths.
  x = jnp.array([[0, 5, 5, 7, 5, 2, 1, 1], [0, 9, 10, 11, 12, 13, 14, 2],
                 [0, 4, 2, 1, 1, 1, 1, 1], [0, 8, 8, 8, 8, 8, 8, 2],
                 [0, 3, 6, 2, 1, 1, 1, 1]])
  y = jnp.array([0, 1, 1, 0, 1])
  mask = jnp.array([True, True, True, True, False])
  params = model.init(jax.random.key(0), x)
  # Every parameter is in a covered layer: no vmap(grad) fallback.
  calls = []
  jax.eval_shape(lambda p: dp._tapped_apply(model.apply, p, x, None, calls),
                 params)
  assert all(c.supported for c in calls)
  layers = {path[:-1] for path in traverse_util.flatten_dict(params["params"])}
  # 4 in the embeddings, 8 in the transformer layer, 2 in the head.
  assert {c.path for c in calls} == layers and len(layers) == 4 + 8 + 2

  naive, ghost = (jax.jit(lambda p, c, m=m: dp.clipped_grad_sum(
      model.apply, p, x, y, mask, c, m)) for m in ("naive", "ghost"))
  _, _, norms = naive(params, 1.0)
  clip = jnp.median(norms)  # clip about half
  _, naive_sum, naive_norms = naive(params, clip)
  _, ghost_sum, ghost_norms = ghost(params, clip)
  np.testing.assert_allclose(ghost_norms, naive_norms, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               ghost_sum, naive_sum)
  # bfloat16 compute: float32 gradients, norms close to float32's.
  model16 = roberta.RobertaClassifier(config, dtype=jnp.bfloat16)
  _, sum16, norms16 = jax.jit(lambda p: dp.clipped_grad_sum(
      model16.apply, p, x, y, mask, clip))(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(sum16))
  np.testing.assert_allclose(norms16, naive_norms, rtol=2e-2)


def _byte_level_folder(folder, merges=()):
  """vocab.json + merges.txt: RoBERTa's specials, the byte alphabet, merges."""
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  vocab = (["<s>", "<pad>", "</s>", "<unk>"] +
           sorted(pre_tokenizers.ByteLevel.alphabet()) +
           [a + b for a, b in merges])
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return len(vocab)


def _run(*args):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, "-m", "experiments.run", *args],
                        cwd=root, capture_output=True, text=True, timeout=300)


def test_main_job_fine_tunes_a_pretrained_folder(tmp_path):
  folder = str(tmp_path / "roberta")
  config = roberta.RobertaConfig(
      vocab_size=_byte_level_folder(folder), hidden_size=8,
      num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
      max_position_embeddings=70)
  params = roberta.RobertaClassifier(config).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  pretrained.save_roberta_folder(folder, config, params)
  rng = np.random.default_rng(0)
  os.makedirs(tmp_path / "data" / "sst2")
  for name, rows in (("train.tsv", 50), ("dev.tsv", 10)):
    lines = ["sentence\tlabel"] + [
        f"{'good' if y else 'bad'} film {i}\t{y}"
        for i, y in enumerate(rng.integers(0, 2, rows))]
    (tmp_path / "data" / "sst2" / name).write_text("\n".join(lines) + "\n")
  workdir = tmp_path / "out"
  proc = _run("--task=sst2", f"--pretrained_dir={folder}",
              f"--data_dir={tmp_path / 'data'}", f"--workdir={workdir}",
              "--num_models=2", "--epochs=1", "--len_training=30",
              "--len_challenge=5", "--attacks=loss", "--submit_attack=loss")
  assert proc.returncode == 0, proc.stderr
  assert "30 of 60 sst2 points" in proc.stdout
  scores = json.loads((workdir / "scores.json").read_text())
  assert "loss" in scores["inf"]["all"]

  proc = _run("--task=sst2", f"--data_dir={tmp_path / 'data'}",
              f"--workdir={tmp_path / 'out2'}")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "pass --pretrained_dir" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_sst2_tiny_fine_tunes_a_word_level_folder(tmp_path):
  # The folder experiments/pretrain_tiny.py writes: word-level tokenizer.json.
  from mico_jax import data, tasks  # pylint: disable=g-import-not-at-top
  from mico_jax.data import sst2  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  words = np.array(["good", "bad", "film", "is", "n't", "really", "'s", ","])
  total = tasks.SST2_TINY.pool_size + 10
  sentences = [" ".join(rng.choice(words, 4)) + f" {i}" for i in range(total)]
  labels = rng.integers(0, 2, len(sentences))
  os.makedirs(tmp_path / "data" / "sst2")
  for name, rows in (("train.tsv", slice(0, total - 10)),
                     ("dev.tsv", slice(total - 10, None))):
    (tmp_path / "data" / "sst2" / name).write_text(
        "sentence\tlabel\n" + "".join(
            f"{s}\t{y}\n" for s, y in zip(sentences[rows], labels[rows])))
  folder = str(tmp_path / "tiny")
  tokenizer = pretrained.word_level_tokenizer(sentences[:50], 20, 32)
  assert tokenizer.get_vocab_size() == 20
  text = "It 's N'T good,really!"
  ids = tokenizer.encode(text).ids
  vocab = tokenizer.get_vocab()
  expected = [0] + [vocab.get(t, 3) for t in sst2.tokenize(text)] + [2]
  assert ids == expected + [1] * (32 - len(expected))
  config = roberta.RobertaConfig(
      vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=8, max_position_embeddings=34)
  pretrained.save_roberta_folder(folder, config, roberta.RobertaClassifier(
      config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  tokenizer.save(os.path.join(folder, "tokenizer.json"))

  task = tasks.with_pretrained(tasks.SST2_TINY, folder)
  dataset = task.load(str(tmp_path / "data"))
  # The same pool as sst2_tiny's (a seeded subset), tokenised by the folder.
  idx = data.subset_indices(len(sentences), tasks.SST2_TINY.pool_size)
  np.testing.assert_array_equal(dataset.y, labels[idx])
  assert dataset.x.shape == (tasks.SST2_TINY.pool_size, tasks.SST2_TINY_LENGTH)
  np.testing.assert_array_equal(dataset.x[:3], [
      e.ids for e in tokenizer.encode_batch([sentences[i] for i in idx[:3]])])
  assert task.make_model(2).config.hidden_size == 8
  with pytest.raises(data.DataError, match="only sst2 and sst2_tiny"):
    tasks.with_pretrained(tasks.SST2_CPU, folder)
