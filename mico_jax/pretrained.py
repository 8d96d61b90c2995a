"""Hugging Face RoBERTa folders, offline: config, weights and tokenizer.

A folder as `save_pretrained` writes it (and as MICO releases its SST-2
models): `config.json`, weights in `model.safetensors` (read with the
`safetensors` package and numpy; no torch) or `pytorch_model.bin` (read with
`torch.load(weights_only=True)`; torch is imported only then), and for
tokenising `tokenizer.json` or `vocab.json` + `merges.txt` (read with the
`tokenizers` package). Nothing is downloaded: a missing file is a
`FolderError` naming it.

`load_roberta_folder(path) -> (config, params)` is the entry point for
importers; `Pretrained(path)` hands a folder's weights to
`roberta.RobertaClassifier` as its initial parameters.
"""

import dataclasses
import functools
import hashlib
import json
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mico_jax.data import sst2
from mico_jax.roberta import (RobertaClassifier, RobertaConfig,
                              from_torch_names, torch_name)

_GET = ("on a machine with internet: `huggingface-cli download roberta-base"
        " --local-dir DIR` (or the model you fine-tune), then copy DIR here")


class FolderError(ValueError):
  """A pretrained folder lacks a file or holds something unusable."""


def _file(folder: str, *names: str, get: str = _GET) -> str:
  """The first of `names` present in `folder`, else a FolderError."""
  for name in names:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  raise FolderError(f"{folder}: no {' or '.join(names)}; get it {get}")


def read_config(folder: str, get: str = _GET) -> RobertaConfig:
  """The folder's `config.json` as a `RobertaConfig`."""
  path = _file(folder, "config.json", get=get)
  try:
    return RobertaConfig.from_json(path)
  except (OSError, ValueError, TypeError) as e:
    raise FolderError(f"{path}: not a RoBERTa config ({e})") from e


# Fields of `config.json` that change a RoBERTa's numbers (not its init).
_ARCHITECTURE = tuple(f.name for f in dataclasses.fields(RobertaConfig)
                      if f.name != "initializer_range")


def check_config(config: RobertaConfig, expected: RobertaConfig,
                 path: str) -> None:
  """Every field that changes the model's outputs must be `expected`'s."""
  for field in _ARCHITECTURE:
    got, want = getattr(config, field), getattr(expected, field)
    if got != want:
      raise FolderError(f"{path}: {field} = {got}, the task's model has"
                        f" {want} (not the task's RoBERTa)")


def read_torch_state(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict (`torch.save`) as float32 arrays.

  Read with `torch.load(weights_only=True)`, which refuses any pickle that is
  not plain tensors without running it; torch is imported only here.
  Non-float tensors (buffers such as `position_ids`) are left out.

  Raises:
    FolderError: torch is missing, the file is unreadable or truncated, or
      holds anything but a mapping of names to tensors.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FolderError(
        f"{path}: reading PyTorch weights needs torch (pip install torch;"
        " the CPU build is enough)") from e
  import pickle  # pylint: disable=g-import-not-at-top
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise FolderError(
        f"{path}: refused: holds objects other than tensors (not loaded)"
    ) from e
  except FileNotFoundError as e:
    raise FolderError(f"{path}: no such file") from e
  except Exception as e:  # pylint: disable=broad-except
    # torch reports truncated or foreign files as RuntimeError, EOFError...
    raise FolderError(f"{path}: not a readable PyTorch file (truncated or"
                      f" damaged: {type(e).__name__})") from e
  if not isinstance(state, Mapping) or not all(
      isinstance(k, str) and isinstance(v, torch.Tensor)
      for k, v in state.items()):
    raise FolderError(f"{path}: not a state_dict of named tensors")
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()
          if torch.is_floating_point(v)}


def _read_state(path: str) -> dict[str, np.ndarray]:
  """Checkpoint name -> float array, from safetensors or a PyTorch pickle."""
  if not path.endswith(".safetensors"):
    return read_torch_state(path)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise FolderError(f"{path}: not a readable safetensors file (truncated"
                      f" or damaged: {type(e).__name__})") from e


def _cache_path(weights: str, cache_dir: str) -> str:
  """Where a converted checkpoint is kept: keyed by its path, size and time."""
  stat = os.stat(weights)
  key = f"{os.path.abspath(weights)}:{stat.st_size}:{stat.st_mtime_ns}"
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  return os.path.join(cache_dir, f"roberta_{digest}.npz")


def default_cache_dir() -> str:
  """`$MICO_JAX_CACHE`, else `~/.cache/mico_jax`."""
  return os.environ.get("MICO_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mico_jax")


def check_folder(path: str, expected: RobertaConfig | None = None,
                 get: str = _GET) -> tuple[RobertaConfig, str]:
  """A RoBERTa folder's config (checked against `expected` if given) and its
  weights file, without reading the weights: a quick check of many folders.
  """
  config = read_config(path, get)
  if expected is not None:
    check_config(config, expected, os.path.join(path, "config.json"))
  return config, _file(path, "model.safetensors", "pytorch_model.bin",
                       get=get)


def load_roberta_folder(path: str, *, require_head: bool = True,
                        cache_dir: str | None = None,
                        expected: RobertaConfig | None = None,
                        get: str = _GET) -> tuple[RobertaConfig, dict]:
  """A RoBERTa checkpoint folder's architecture and parameters.

  Args:
    path: the folder (`config.json` and `model.safetensors` or
      `pytorch_model.bin`).
    require_head: whether the classification head must be in the checkpoint
      (a fine-tuned model); if False, a checkpoint without one (roberta-base)
      gives parameters without `classifier`.
    cache_dir: where to keep a `pytorch_model.bin` once converted (npz), so
      later loads need no torch and no unpickling; None: no cache. Safetensors
      files are read directly (memory-mapped, fast).
    expected: if given, the architecture the folder must have (checked from
      `config.json` before any weights are read; `check_config`).
    get: where a missing file comes from, said in the error.

  Returns:
    (config, `{"params": ...}` for `RobertaClassifier(config)`, float32 numpy).

  Raises:
    FolderError: a file is missing, unreadable or of another architecture, or
      a parameter is absent or misshapen.
  """
  config, weights = check_folder(path, expected, get)
  cached = cache_dir and not weights.endswith(".safetensors") and _cache_path(
      weights, cache_dir)
  if cached and os.path.isfile(cached):
    with np.load(cached) as f:
      flat = {k: f[k] for k in f.files}
  else:
    like = jax.eval_shape(RobertaClassifier(config, parent=None).init,
                          jax.random.key(0),
                          jnp.zeros((1, 2), jnp.int32))
    try:
      flat, missing = from_torch_names(_read_state(weights), like)
    except ValueError as e:
      raise FolderError(f"{weights}: {e}") from e
    if not require_head:
      missing = [m for m in missing if not m.startswith("classifier/")]
    if missing:
      more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
      raise FolderError(f"{weights}: missing key {torch_name(missing[0])}"
                        f"{more}; not a RoBERTa checkpoint?")
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    if cached:
      os.makedirs(cache_dir, exist_ok=True)
      tmp = cached + ".tmp.npz"
      np.savez(tmp, **flat)
      os.replace(tmp, cached)  # never a half-written cache
  return config, {"params": traverse_util.unflatten_dict(flat, sep="/")}


def save_roberta_folder(path: str, config: RobertaConfig,
                        params: dict) -> None:
  """Writes `config.json` and `model.safetensors` that Hugging Face's
  `RobertaForSequenceClassification.from_pretrained` (and
  `load_roberta_folder`) read: the inverse of `load_roberta_folder`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  tensors = {}
  for name, leaf in traverse_util.flatten_dict(params["params"],
                                               sep="/").items():
    array = np.asarray(leaf, np.float32)
    tensors[torch_name(name)] = np.ascontiguousarray(
        array.T if name.endswith("/kernel") else array)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "roberta",
               "architectures": ["RobertaForSequenceClassification"],
               **dataclasses.asdict(config)}, f, indent=2)


@functools.lru_cache(maxsize=2)
def _folder_params(path: str) -> dict[str, np.ndarray]:
  _, params = load_roberta_folder(path, require_head=False,
                                  cache_dir=default_cache_dir())
  return traverse_util.flatten_dict(params["params"], sep="/")


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A pretrained folder's weights, read once per process when first needed.

  Hashable and compared by path, so models built on it are valid jit keys
  and describe themselves by the folder.
  """

  path: str

  def params(self) -> dict[str, np.ndarray]:
    """Parameter path (`roberta/.../kernel`) -> array."""
    return _folder_params(self.path)

  def names(self) -> set[str]:
    return set(self.params())


def pretrained_classifier(path: str, num_classes: int,
                          dtype=jnp.float32) -> RobertaClassifier:
  """`RobertaClassifier` initialised from the folder, with `num_classes`."""
  config = dataclasses.replace(read_config(path), num_labels=num_classes)
  return RobertaClassifier(config, Pretrained(os.path.abspath(path)), dtype)


def load_tokenizer(folder: str, max_length: int):
  """The folder's byte-level BPE tokenizer, padding and truncating to
  `max_length` with `<s>` first and `</s>` last, as Hugging Face's
  `RobertaTokenizer(..., padding="max_length", truncation=True)`.

  Returns a `tokenizers.Tokenizer`.
  """
  from tokenizers import Tokenizer, processors  # pylint: disable=g-import-not-at-top
  from tokenizers.implementations import ByteLevelBPETokenizer  # pylint: disable=g-import-not-at-top
  if os.path.isfile(os.path.join(folder, "tokenizer.json")):
    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
  else:
    vocab = _file(folder, "vocab.json", "tokenizer.json")
    merges = _file(folder, "merges.txt")
    tokenizer = ByteLevelBPETokenizer(vocab, merges, trim_offsets=True)
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", tokenizer.token_to_id("</s>")),
        ("<s>", tokenizer.token_to_id("<s>")))
  pad = tokenizer.token_to_id("<pad>")
  if pad is None:
    raise FolderError(f"{folder}: the tokenizer has no <pad> token")
  tokenizer.enable_truncation(max_length)
  tokenizer.enable_padding(pad_id=pad, pad_token="<pad>", length=max_length)
  return tokenizer


def tokenize(folder: str, sentences: Sequence[str],
             max_length: int) -> tuple[np.ndarray, int]:
  """int32 ids `[len(sentences), max_length]` and how many were truncated."""
  tokenizer = load_tokenizer(folder, max_length)
  encodings = tokenizer.encode_batch(list(sentences))
  ids = np.asarray([e.ids for e in encodings], np.int32)
  truncated = sum(bool(e.overflowing) for e in encodings)
  return ids.reshape(len(sentences), max_length), truncated


_SPECIAL = ("<s>", "<pad>", "</s>", "<unk>")  # RoBERTa's ids 0-3


def word_level_tokenizer(sentences: Sequence[str], vocab_size: int,
                         max_length: int):
  """A word-level `tokenizers.Tokenizer` over `sentences`' most frequent words
  (`mico_jax.data.sst2`'s tokens), with RoBERTa's special ids: `<s>`, words,
  `</s>`, padding to `max_length`."""
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import (Regex, Tokenizer, models, normalizers,
                          pre_tokenizers, processors)
  # The most frequent words; Vocabulary's own <pad> and <unk> are replaced by
  # RoBERTa's four specials, and <mask> comes last.
  words = sst2.Vocabulary.build(sentences, vocab_size - len(_SPECIAL) - 1 + 2)
  vocab = {token: i for i, token in enumerate(
      _SPECIAL + words.tokens[2:] + ("<mask>",))}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.normalizer = normalizers.Lowercase()
  # Whitespace, then sst2.tokenize's pattern: its exact tokens.
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Split(Regex(r"[^\W_]+|\S"), "isolated")])
  tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2),
                                                          ("<s>", 0))
  tokenizer.add_special_tokens(list(_SPECIAL) + ["<mask>"])
  tokenizer.enable_truncation(max_length)
  tokenizer.enable_padding(pad_id=1, pad_token="<pad>", length=max_length)
  return tokenizer
