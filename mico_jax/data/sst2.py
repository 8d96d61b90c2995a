"""SST-2, MICO's text pool: GLUE train (67,349) + validation (872), N = 68,221.

Two sources of sentences, both in GLUE's order (the row order of GLUE's TSVs):

* `read_sst2_tsv`: a directory with GLUE's `train.tsv` and `dev.tsv` (header
  `sentence<TAB>label`, labels 0/1).
* `read_sst2_tfds`: TFDS's prepared `glue/sst2` via `tfds.data_source`
  (array_record, no TensorFlow), sorted by the `idx` feature, which TFDS sets
  to the row number in GLUE's TSV.

Then `encode_text` turns sentences into token ids with a small word-level
tokenizer and a vocabulary built from the pool; nothing is downloaded. MICO
fine-tunes RoBERTa-base with its own BPE tokenizer; a pretrained tokenizer can
replace `Vocabulary` later, from the same raw sentences.
"""

import collections
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from mico_jax.data import Dataset, DataError, read_tfds_split

NUM_TRAIN = 67_349
NUM_VALIDATION = 872
_HEADER = ("sentence", "label")
# A run of letters/digits (any script), or any other single non-space character.
_TOKEN = re.compile(r"[^\W_]+|\S")


def tokenize(text: str) -> list[str]:
  """Lower-cases `text` and splits it into words and punctuation.

  A token is a maximal run of letters and digits (Unicode-aware), or any other
  single non-space character: "It 's n't bad!" -> it ' s n ' t bad !
  Deterministic and dependency-free; SST-2 is already tokenized PTB-style, so
  little is lost.

  Args:
    text: a sentence.

  Returns:
    The tokens, in order.
  """
  return _TOKEN.findall(text.lower())


class Vocabulary:
  """Token <-> id mapping with id 0 = padding and id 1 = unknown.

  Attributes:
    tokens: `tokens[i]` is the token with id `i`; `tokens[0]` is "<pad>" and
      `tokens[1]` is "<unk>" (neither can come out of `tokenize`).
  """

  PAD = 0
  UNK = 1

  def __init__(self, tokens: Sequence[str]):
    """Wraps a token list; `tokens[:2]` must be `("<pad>", "<unk>")`."""
    if tuple(tokens[:2]) != ("<pad>", "<unk>"):
      raise DataError("a vocabulary starts with '<pad>', '<unk>'")
    if len(set(tokens)) != len(tokens):
      raise DataError("vocabulary tokens must be distinct")
    self.tokens = tuple(tokens)
    self._ids = {token: i for i, token in enumerate(self.tokens)}

  @classmethod
  def build(cls, texts: Iterable[str], size: int = 10_000) -> "Vocabulary":
    """The `size - 2` most frequent tokens of `texts`, after pad and unknown.

    Ties in frequency are broken by the token's text, so the result depends
    only on the multiset of texts.

    Args:
      texts: sentences.
      size: at most this many ids, the two reserved ones included.

    Returns:
      The vocabulary; smaller than `size` if `texts` has fewer distinct tokens.
    """
    if size < 2:
      raise DataError(f"vocabulary size must be >= 2, got {size}")
    counts = collections.Counter(
        token for text in texts for token in tokenize(text))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return cls(["<pad>", "<unk>"] + [token for token, _ in ranked[:size - 2]])

  def __len__(self) -> int:
    return len(self.tokens)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, unknown tokens mapped to `UNK`; no padding."""
    return [self._ids.get(token, self.UNK) for token in tokenize(text)]

  def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 `[len(texts), max_len]`: each text's first `max_len` ids, 0-padded.
    """
    if max_len < 1:
      raise DataError(f"max_len must be >= 1, got {max_len}")
    ids = np.zeros((len(texts), max_len), np.int32)
    for row, text in enumerate(texts):
      encoded = self.encode(text)[:max_len]
      ids[row, :len(encoded)] = encoded
    return ids


def read_glue_tsv(
    path: str | os.PathLike[str],
) -> tuple[list[str], np.ndarray]:
  """Reads one GLUE SST-2 TSV (`train.tsv` or `dev.tsv`).

  The file starts with the header `sentence<TAB>label`; each row is a sentence,
  a tab and a label 0 or 1. Lines end at "\\n" only: GLUE's `train.tsv` as
  shipped here has a stray "\\r" before each tab, which is stripped with the
  other surrounding whitespace. Blank lines are skipped.

  Args:
    path: the TSV file.

  Returns:
    `(sentences, labels)`: the sentences in file order and int32 labels.

  Raises:
    DataError: the file is missing, the header is missing or not
      `sentence<TAB>label`, or a row has no tab, a label other than 0/1, or
      bytes that are not UTF-8; the message names the file and line.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  sentences, labels = [], []
  header_seen = False
  with open(path, "rb") as f:  # Binary: only b"\n" ends a line.
    for line_no, raw in enumerate(f, start=1):
      where = f"{path}, line {line_no}"
      try:
        line = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 ({e})") from e
      if not header_seen:
        fields = line.lstrip("\ufeff").split("\t")  # A BOM is tolerated.
        header = tuple(field.strip() for field in fields)
        if header != _HEADER:
          raise DataError(
              f"{where}: header {line[:60]!r}, expected 'sentence<TAB>label'")
        header_seen = True
        continue
      if not line.strip():
        continue
      sentence, tab, label = line.rpartition("\t")
      if not tab:
        raise DataError(f"{where}: no tab between sentence and label")
      label = label.strip()
      if label not in ("0", "1"):
        raise DataError(f"{where}: label {label[:20]!r} is not 0 or 1")
      sentences.append(sentence.strip())
      labels.append(int(label))
  if not header_seen:
    raise DataError(f"{path}: empty file, expected header 'sentence<TAB>label'")
  return sentences, np.asarray(labels, np.int32)


def read_sst2_tsv(
    directory: str | os.PathLike[str],
) -> tuple[list[str], np.ndarray]:
  """The SST-2 pool's sentences and labels from `train.tsv` then `dev.tsv`."""
  train_x, train_y = read_glue_tsv(os.path.join(directory, "train.tsv"))
  dev_x, dev_y = read_glue_tsv(os.path.join(directory, "dev.tsv"))
  return train_x + dev_x, np.concatenate([train_y, dev_y])


def read_sst2_tfds(
    data_dir: str | os.PathLike[str] | None = None, *, download: bool = False
) -> tuple[list[str], np.ndarray]:
  """The SST-2 pool's sentences and labels from TFDS `glue/sst2`, GLUE's order.

  Args:
    data_dir: TFDS data directory; None for TFDS's default.
    download: whether TFDS may download and prepare the data set if absent
      (as array_record; preparing needs TensorFlow).

  Returns:
    `(sentences, labels)`: train then validation, each sorted by `idx`.

  Raises:
    DataError: the data set is not prepared (as array_record), its `idx` do not
      number each split's records exactly once, or a label is not 0/1.
  """
  # Without TensorFlow, `glue` is not registered until its module is imported.
  # pylint: disable-next=g-import-not-at-top,unused-import
  import tensorflow_datasets.text.glue
  sentences, labels = [], []
  for split in ("train", "validation"):
    what = f"TFDS glue/sst2/{split}"
    examples = read_tfds_split("glue/sst2", split, data_dir, download)
    idx = np.asarray([int(ex["idx"]) for ex in examples], np.int64)
    order = np.argsort(idx, kind="stable")
    if (idx[order] != np.arange(len(idx))).any():
      raise DataError(
          f"{what}: idx do not number the records 0..{len(idx) - 1} exactly"
          " once")
    split_labels = np.asarray([int(examples[i]["label"]) for i in order])
    bad = np.flatnonzero((split_labels != 0) & (split_labels != 1))
    if bad.size:
      raise DataError(
          f"{what}: record idx {bad[0]} has label {split_labels[bad[0]]}, not"
          " 0 or 1 (GLUE's test split is unlabelled)")
    for i in order:
      sentence = examples[i]["sentence"]
      sentences.append(
          sentence.decode("utf-8") if isinstance(sentence, bytes) else
          str(sentence))
    labels.append(split_labels.astype(np.int32))
  return sentences, np.concatenate(labels)


def encode_text(
    sentences: Sequence[str],
    labels: np.ndarray,
    name: str,
    *,
    vocab_size: int = 10_000,
    max_len: int = 64,
    vocabulary: Vocabulary | None = None,
    mico_order: bool = False,
) -> Dataset:
  """Tokenizes a binary-labelled text pool into a `Dataset`.

  Args:
    sentences: the pool's texts.
    labels: their labels, 0 or 1.
    name: the `Dataset`'s name.
    vocab_size: size of the vocabulary built from `sentences` (the whole pool,
      as a fixed pretrained tokenizer would be) when `vocabulary` is None.
    max_len: sequence length: longer texts are truncated (first tokens kept),
      shorter ones padded with 0.
    vocabulary: a vocabulary to use instead of building one.
    mico_order: the sentences are MICO's whole SST-2 pool in its order (GLUE
      train then validation); see `Dataset.mico_order`.

  Returns:
    A `Dataset` of kind "text": `x` int32 `[N, max_len]`, `y` int32, 2 classes.
  """
  if vocabulary is None:
    vocabulary = Vocabulary.build(sentences, vocab_size)
  x = vocabulary.encode_batch(sentences, max_len)
  return Dataset(name, x, np.asarray(labels, np.int32), 2, "text",
                 mico_order=mico_order)


def load_sst2_tsv(
    directory: str | os.PathLike[str],
    *,
    vocab_size: int = 10_000,
    max_len: int = 64,
) -> Dataset:
  """SST-2 pool (68,221) from GLUE's `train.tsv` and `dev.tsv`, tokenized.

  See `read_glue_tsv` for the format and errors, `encode_text` for the result.
  """
  sentences, labels = read_sst2_tsv(directory)
  return encode_text(sentences, labels, "sst2", vocab_size=vocab_size,
                     max_len=max_len, mico_order=True)


def load_sst2_tfds(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    vocab_size: int = 10_000,
    max_len: int = 64,
) -> Dataset:
  """SST-2 pool (68,221) from TFDS `glue/sst2`, tokenized.

  See `read_sst2_tfds` for the source and errors, `encode_text` for the result.
  """
  sentences, labels = read_sst2_tfds(data_dir, download=download)
  return encode_text(sentences, labels, "sst2", vocab_size=vocab_size,
                     max_len=max_len, mico_order=True)
