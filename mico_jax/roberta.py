"""A RoBERTa-family encoder with a sequence-classification head, in flax.

The numbers of Hugging Face's `RobertaForSequenceClassification` in eval mode
(tested to 1e-4 against it), with a parameter tree that mirrors its checkpoint
names: `roberta/encoder/layer_3/attention/self/query/kernel` is
`roberta.encoder.layer.3.attention.self.query.weight` transposed
(`torch_name` / `from_torch_names` convert). Every layer is an `nn.Dense`,
`nn.Embed` or `nn.LayerNorm`, so DP-SGD's ghost norms (`mico_jax.dp`) cover
every parameter.

Differences from the PyTorch model: no dropout (training here is
deterministic; MICO fine-tunes with dropout 0.1), no token types other than 0,
and the attention mask comes from the tokens (`pad_token_id` is padding).
With `dtype=jnp.bfloat16` the model computes in bfloat16 while its parameters,
and so gradients, clipping and optimizer state, stay float32.
"""

import dataclasses
import json
import os
import re
from typing import Any, Callable

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RobertaConfig:
  """The architecture, as in a Hugging Face `config.json` (same field names).

  The defaults are roberta-base's.
  """

  vocab_size: int = 50265
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 514
  type_vocab_size: int = 1
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  num_labels: int = 2
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of"
                       f" num_attention_heads {self.num_attention_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not one of"
                       f" {sorted(_ACTIVATIONS)}")

  @classmethod
  def from_dict(cls, config: dict[str, Any]) -> "RobertaConfig":
    """From a parsed `config.json`; other keys (dropout, ...) are ignored.

    `num_labels` is the length of `id2label` where the file has one.
    """
    if config.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError("only absolute position embeddings are supported, got"
                       f" {config['position_embedding_type']!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in fields}
    if "id2label" in config and "num_labels" not in config:
      kwargs["num_labels"] = len(config["id2label"])
    return cls(**kwargs)

  @classmethod
  def from_json(cls, path: str | os.PathLike[str]) -> "RobertaConfig":
    with open(path) as f:
      return cls.from_dict(json.load(f))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


def _dense(config: RobertaConfig, features: int, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, name=name, kernel_init=
                  nn.initializers.normal(config.initializer_range))


def _layer_norm(config: RobertaConfig, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(config.layer_norm_eps, dtype=dtype, name="LayerNorm")


class _SelfAttention(nn.Module):
  """Multi-head attention over the unmasked positions (`attention.self`)."""

  config: RobertaConfig
  dtype: Any

  @nn.compact
  def __call__(self, h_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    batch, length, width = h_BxTxD.shape
    heads = self.config.num_attention_heads

    def project(name):  # -> [B, heads, T, D / heads]
      x = _dense(self.config, width, self.dtype, name)(h_BxTxD)
      return x.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)

    q, k, v = project("query"), project("key"), project("value")
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask_BxT[:, None, None, :], scores,
                       jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), -1).astype(q.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    return out.transpose(0, 2, 1, 3).reshape(batch, length, width)


class _DenseAddNorm(nn.Module):
  """LayerNorm(dense(x) + residual): `attention.output` and `output`."""

  config: RobertaConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
    x = _dense(self.config, residual.shape[-1], self.dtype, "dense")(x)
    return _layer_norm(self.config, self.dtype)(x + residual)


class _Attention(nn.Module):
  config: RobertaConfig
  dtype: Any

  @nn.compact
  def __call__(self, h_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    x = _SelfAttention(self.config, self.dtype, name="self")(h_BxTxD, mask_BxT)
    return _DenseAddNorm(self.config, self.dtype, name="output")(x, h_BxTxD)


class _Intermediate(nn.Module):
  config: RobertaConfig
  dtype: Any

  @nn.compact
  def __call__(self, h_BxTxD: jax.Array) -> jax.Array:
    x = _dense(self.config, self.config.intermediate_size, self.dtype,
               "dense")(h_BxTxD)
    return _ACTIVATIONS[self.config.hidden_act](x)


class _Layer(nn.Module):
  """One post-LayerNorm transformer block (`encoder.layer.N`)."""

  config: RobertaConfig
  dtype: Any

  @nn.compact
  def __call__(self, h_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    h = _Attention(self.config, self.dtype, name="attention")(h_BxTxD,
                                                              mask_BxT)
    x = _Intermediate(self.config, self.dtype, name="intermediate")(h)
    return _DenseAddNorm(self.config, self.dtype, name="output")(x, h)


class _Embeddings(nn.Module):
  """Token + position + token-type embeddings, then LayerNorm."""

  config: RobertaConfig
  dtype: Any

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    c = self.config
    embed = lambda n, name: nn.Embed(
        n, c.hidden_size, dtype=self.dtype, name=name,
        embedding_init=nn.initializers.normal(c.initializer_range))
    # fairseq's positions: padding keeps `pad_token_id`, real tokens count
    # from pad_token_id + 1.
    mask = mask_BxT.astype(jnp.int32)
    positions_BxT = jnp.cumsum(mask, 1) * mask + c.pad_token_id
    x = (embed(c.vocab_size, "word_embeddings")(tokens_BxT) +
         embed(c.max_position_embeddings, "position_embeddings")(
             positions_BxT) +
         embed(c.type_vocab_size, "token_type_embeddings")(
             jnp.zeros_like(tokens_BxT)))
    return _layer_norm(c, self.dtype)(x)


class _Encoder(nn.Module):
  config: RobertaConfig
  dtype: Any

  @nn.compact
  def __call__(self, h_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      h_BxTxD = _Layer(self.config, self.dtype, name=f"layer_{i}")(h_BxTxD,
                                                                   mask_BxT)
    return h_BxTxD


class RobertaModel(nn.Module):
  """Token ids `[B, T]` -> hidden states `[B, T, D]` (`RobertaModel` without
  its pooler): the encoder a classifier, or a pretraining head, sits on."""

  config: RobertaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    mask_BxT = tokens_BxT != self.config.pad_token_id
    h = _Embeddings(self.config, self.dtype, name="embeddings")(tokens_BxT,
                                                                mask_BxT)
    return _Encoder(self.config, self.dtype, name="encoder")(h, mask_BxT)


class _ClassificationHead(nn.Module):
  """tanh(dense(first token)) -> out_proj (`classifier`)."""

  config: RobertaConfig
  dtype: Any

  @nn.compact
  def __call__(self, h_BxTxD: jax.Array) -> jax.Array:
    x = jnp.tanh(_dense(self.config, self.config.hidden_size, self.dtype,
                        "dense")(h_BxTxD[:, 0]))
    return _dense(self.config, self.config.num_labels, self.dtype,
                  "out_proj")(x)


class RobertaClassifier(nn.Module):
  """Token ids `[B, T]` (first `<s>`, padding `pad_token_id`) -> logits `[B, C]`.

  Attributes:
    config: the architecture.
    pretrained: if set, `init` takes every parameter the checkpoint has from
      it (the classification head stays random where it lacks one, as when
      fine-tuning roberta-base).
    dtype: compute dtype; parameters and logits stay float32.
  """

  config: RobertaConfig
  pretrained: Any = None  # a `pretrained.Pretrained`
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    h = RobertaModel(self.config, self.dtype, name="roberta")(tokens_BxT)
    logits = _ClassificationHead(self.config, self.dtype,
                                 name="classifier")(h)
    return logits.astype(jnp.float32)

  def init(self, rngs, *args, **kwargs):
    """Random parameters, replaced by the pretrained ones where they exist.

    The pretrained arrays enter through a host callback rather than as
    constants, so a jitted (and vmapped) init stays small and compiles fast.
    """
    variables = super().init(rngs, *args, **kwargs)
    if self.pretrained is None:
      return variables
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    known = {k: v for k, v in flat.items() if k in self.pretrained.names()}
    loaded = jax.pure_callback(
        lambda: {k: self.pretrained.params()[k].astype(v.dtype)
                 for k, v in known.items()},
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in known.items()})
    params = traverse_util.unflatten_dict({**flat, **loaded}, sep="/")
    return {**variables, "params": params}


# Checkpoint names <-> parameter paths.

_LEAF_TO_TORCH = {"kernel": "weight", "embedding": "weight", "scale": "weight",
                  "bias": "bias"}


def torch_name(path: str) -> str:
  """`roberta/encoder/layer_0/.../kernel` -> `roberta.encoder.layer.0...weight`.
  """
  *modules, leaf = path.split("/")
  name = ".".join(modules + [_LEAF_TO_TORCH[leaf]])
  return re.sub(r"\blayer_(\d+)\b", r"layer.\1", name)


def from_torch_names(state: dict[str, np.ndarray],
                     like: PyTree) -> tuple[dict[str, np.ndarray], list[str]]:
  """A checkpoint's tensors as flat parameters (`path -> array`) shaped `like`.

  Dense kernels are transposed; checkpoint entries with no parameter here
  (`roberta.pooler.*`, `lm_head.*`, buffers) are ignored. A checkpoint of a
  bare `RobertaModel` (names without `roberta.`) is read too, and so are
  names behind Opacus's `_module.`.

  Args:
    state: checkpoint name -> array.
    like: the parameters (`{"params": ...}` or the inner tree; shapes only).

  Returns:
    (flat parameters found, paths missing from the checkpoint).

  Raises:
    ValueError: an array whose shape does not match.
  """
  like = like.get("params", like)
  # Opacus's GradSampleModule prefixes its wrapped model's names.
  state = {k.removeprefix("_module."): v for k, v in state.items()}
  if not any(k.startswith("roberta.") for k in state):
    state = {"roberta." + k: v for k, v in state.items()}
  found, missing = {}, []
  for path, leaf in traverse_util.flatten_dict(like, sep="/").items():
    name = torch_name(path)
    if name not in state:
      missing.append(path)
      continue
    array = np.asarray(state[name])
    if path.endswith("/kernel"):
      array = array.T
    if array.shape != tuple(leaf.shape):
      raise ValueError(f"{name}: shape {array.shape} in the checkpoint,"
                       f" {tuple(leaf.shape)} expected")
    found[path] = array
  return found, missing
