"""Tests for SST-2: GLUE TSVs, TFDS glue/sst2 (mocked, offline), tokenizer."""

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
# Registers `glue` without TensorFlow (sst2 imports it too, but lazily).
import tensorflow_datasets.text.glue  # pylint: disable=unused-import

from mico_jax.data import DataError
from mico_jax.data import sst2
import tfds_prepared

# ../shared/data from the repository root; absent on users' machines.
_REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = _REPO.parent / "shared" / "data"


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_bytes(text.encode("utf-8"))
  return path


def test_tokenize():
  assert sst2.tokenize("It 's n't BAD , 10/10!") == [
      "it", "'", "s", "n", "'", "t", "bad", ",", "10", "/", "10", "!"]
  assert sst2.tokenize("a résumé -- x_y") == [
      "a", "résumé", "-", "-", "x", "_", "y"]
  assert sst2.tokenize("  \t\r ") == []


def test_vocabulary_build_and_encode():
  vocab = sst2.Vocabulary.build(["b a", "a c", "a b", "d"], size=4)
  # a: 3, b: 2, then c and d tie (1 each) and c wins by its text.
  assert vocab.tokens == ("<pad>", "<unk>", "a", "b")
  assert len(vocab) == 4
  assert vocab.encode("A b c") == [2, 3, vocab.UNK]
  ids = vocab.encode_batch(["a b a b a", "", "c"], max_len=3)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [[2, 3, 2], [0, 0, 0], [1, 0, 0]])
  big = sst2.Vocabulary.build(["x y"], size=100)
  assert big.tokens == ("<pad>", "<unk>", "x", "y")


def test_vocabulary_does_not_depend_on_text_order():
  texts = ["the cat sat", "a dog , the end", "cat and dog"]
  assert (sst2.Vocabulary.build(texts, 6).tokens
          == sst2.Vocabulary.build(texts[::-1], 6).tokens)


def test_vocabulary_rejects_bad_arguments():
  with pytest.raises(DataError, match="starts with '<pad>', '<unk>'"):
    sst2.Vocabulary(["a", "b"])
  with pytest.raises(DataError, match="distinct"):
    sst2.Vocabulary(["<pad>", "<unk>", "a", "a"])
  with pytest.raises(DataError, match=">= 2"):
    sst2.Vocabulary.build(["a"], size=1)
  with pytest.raises(DataError, match="max_len"):
    sst2.Vocabulary.build(["a"]).encode_batch(["a"], max_len=0)


def test_read_glue_tsv(tmp_path):
  path = _write(tmp_path / "train.tsv",
                "sentence\tlabel\nit 's good \r\t1\n\nbad ; awful\t0\n")
  sentences, labels = sst2.read_glue_tsv(path)
  assert sentences == ["it 's good", "bad ; awful"]
  assert labels.dtype == np.int32 and labels.tolist() == [1, 0]
  # A lone "\r" does not end a line (GLUE's train.tsv has one per row).
  assert len(sentences) == 2


def test_read_glue_tsv_header_only_and_bom(tmp_path):
  path = _write(tmp_path / "dev.tsv", "\ufeffsentence\tlabel\r\n")
  sentences, labels = sst2.read_glue_tsv(path)
  assert sentences == [] and labels.shape == (0,)


_BAD = [
    ("", r"empty file, expected header 'sentence<TAB>label'"),
    ("sentence label\nx\t1\n", r"line 1: header 'sentence label', expected"),
    ("index\tsentence\n0\tx\n", r"line 1: header 'index\\tsentence'"),
    ("good\t1\n", r"line 1: header 'good\\t1'"),
    ("sentence\tlabel\nfine\t1\nno tab here 1\n", r"line 3: no tab between"),
    ("sentence\tlabel\nx\t2\n", r"line 2: label '2' is not 0 or 1"),
    ("sentence\tlabel\nx\t\n", r"line 2: label '' is not 0 or 1"),
    ("sentence\tlabel\nx\tpositive\n", r"line 2: label 'positive' is not"),
]


@pytest.mark.parametrize("text,message", _BAD)
def test_read_glue_tsv_errors(tmp_path, text, message):
  path = _write(tmp_path / "bad.tsv", text)
  with pytest.raises(DataError, match=message) as info:
    sst2.read_glue_tsv(path)
  assert str(info.value).startswith(str(path))


def test_read_glue_tsv_missing_and_non_utf8(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    sst2.read_glue_tsv(tmp_path / "absent.tsv")
  path = tmp_path / "latin1.tsv"
  path.write_bytes(b"sentence\tlabel\nok\t1\ncaf\xe9\t0\n")
  with pytest.raises(DataError, match="line 3: not UTF-8"):
    sst2.read_glue_tsv(path)


def test_load_sst2_tsv(tmp_path):
  _write(tmp_path / "train.tsv", "sentence\tlabel\na b c\t1\nb c\t0\n")
  _write(tmp_path / "dev.tsv", "sentence\tlabel\nc d\t1\n")
  ds = sst2.load_sst2_tsv(tmp_path, vocab_size=4, max_len=2)
  assert ds.name == "sst2" and ds.kind == "text" and ds.num_classes == 2
  assert not ds.hflip and ds.x.dtype == np.int32 and ds.y.dtype == np.int32
  # Vocabulary from the whole pool: c (3), b (2).
  np.testing.assert_array_equal(ds.x, [[1, 3], [3, 2], [2, 1]])
  np.testing.assert_array_equal(ds.y, [1, 0, 1])
  assert ds.mico_order  # GLUE's train then dev rows, in file order


def test_load_sst2_tsv_missing_dev(tmp_path):
  _write(tmp_path / "train.tsv", "sentence\tlabel\na\t1\n")
  with pytest.raises(DataError, match=r"dev.tsv: no such file"):
    sst2.load_sst2_tsv(tmp_path)


def _mock_glue(sizes, label=None):
  """Mocks `tfds.data_source` with records shuffled like TFDS stores them."""
  def as_data_source(builder, split, **unused_kwargs):
    assert (builder.name, builder.builder_config.name) == ("glue", "sst2")
    order = np.random.default_rng(len(split)).permutation(sizes[split])
    return [{
        "idx": np.int32(i),
        "sentence": f"{split} sentence {i}".encode(),
        "label": np.int64(i % 2 if label is None else label),
    } for i in order]
  return tfds.testing.mock_data(as_data_source_fn=as_data_source)


def test_read_sst2_tfds_sorts_by_idx():
  with _mock_glue({"train": 9, "validation": 4}):
    sentences, labels = sst2.read_sst2_tfds(data_dir="/nonexistent")
  expected = ([f"train sentence {i}" for i in range(9)]
              + [f"validation sentence {i}" for i in range(4)])
  assert sentences == expected
  np.testing.assert_array_equal(labels, [i % 2 for i in range(9)]
                                + [i % 2 for i in range(4)])


def test_read_sst2_tfds_real_data_source_on_prepared_files(tmp_path):
  # Written as TFDS would (shuffled), read by the real array_record path,
  # which returns Text features as bytes.
  splits = {}
  for split, n in (("train", 7), ("validation", 3)):
    order = np.random.default_rng(n).permutation(n)
    splits[split] = [{"idx": int(i), "sentence": f"{split} {i} é".encode(),
                      "label": int(i % 2)} for i in order]
  tfds_prepared.write_prepared("glue/sst2", tmp_path, splits)
  sentences, labels = sst2.read_sst2_tfds(data_dir=tmp_path)
  assert sentences == ([f"train {i} é" for i in range(7)]
                       + [f"validation {i} é" for i in range(3)])
  np.testing.assert_array_equal(labels, [0, 1, 0, 1, 0, 1, 0, 0, 1, 0])


def test_load_sst2_tfds():
  with _mock_glue({"train": 5, "validation": 2}):
    ds = sst2.load_sst2_tfds(vocab_size=50, max_len=4)
  sentences = ([f"train sentence {i}" for i in range(5)]
               + [f"validation sentence {i}" for i in range(2)])
  expected = sst2.encode_text(sentences, [0, 1, 0, 1, 0, 0, 1], "sst2",
                              vocab_size=50, max_len=4)
  assert ds.x.shape == (7, 4) and ds.kind == "text" and ds.mico_order
  np.testing.assert_array_equal(ds.x, expected.x)
  np.testing.assert_array_equal(ds.y, expected.y)


def test_read_sst2_tfds_rejects_unlabelled():
  with _mock_glue({"train": 3, "validation": 3}, label=-1):
    with pytest.raises(DataError, match=r"glue/sst2/train: record idx 0 has"
                       r" label -1"):
      sst2.read_sst2_tfds()


def test_read_sst2_tfds_random_mock_idx_rejected():
  # tfds' default mock draws idx at random, so they are not 0..n-1.
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(DataError, match="exactly once"):
      sst2.read_sst2_tfds()


def test_read_sst2_tfds_unprepared_data_dir(tmp_path):
  with pytest.raises(DataError, match="glue/sst2/train is not readable"):
    sst2.read_sst2_tfds(data_dir=tmp_path)


def test_real_tsv():
  directory = SHARED_DATA / "sst2"
  if not directory.exists():
    pytest.skip(f"{directory} not available")
  sentences, labels = sst2.read_sst2_tsv(directory)
  assert len(sentences) == 68_221
  np.testing.assert_array_equal(np.bincount(labels[:sst2.NUM_TRAIN]),
                                [29_780, 37_569])
  assert not any("\r" in s or "\t" in s for s in sentences)
  assert sentences[0] == "hide new secretions from the parental units"
  assert sentences[sst2.NUM_TRAIN] == "one long string of cliches ."
  ds = sst2.encode_text(sentences, labels, "sst2")
  assert ds.x.shape == (68_221, 64) and ds.num_classes == 2
  assert ds.x.max() == 9_999  # The vocabulary is full.
  assert (ds.x[:, 0] > 0).all()  # No empty sentence.
