"""Pretrains `sst2_tiny`'s encoder without labels, for `--pretrained_dir`.

MICO fine-tunes roberta-base, pretrained on public text by masked language
modelling; DP fine-tuning then only has to adapt good features (Li et al.,
"Large Language Models Can Be Strong Differentially Private Learners"; Tramèr
& Boneh, "Differentially Private Learning Needs Better Features"). The CPU
stand-in: the same tiny RoBERTa as `sst2_tiny`, pretrained on the SST-2
sentences that lie in no CPU task's pool (`sst2_tiny`'s 60,000 and
`sst2_cpu`'s 4,000 are left out, so no challenge point, member or not, is
seen). Labels are never read. Two self-supervised losses, summed:
RoBERTa's masked LM (15% of the tokens chosen, at most 6 a sentence; of those
80% `<mask>`, 10% a random id, 10% kept), and a bag-of-words loss at `<s>`:
the same LM head, applied to the first token's final state, predicts every
word of the sentence. The classification head reads that state; masked LM
alone never trains it, and a tiny model then fine-tunes from a constant
feature (its non-DP fine-tuning plateaus as from scratch).

The folder written is what `tasks.with_pretrained` loads: `config.json` and
`model.safetensors` (the encoder; no classification head) as
`pretrained.save_roberta_folder` writes them, and a `tokenizer.json`: the
word-level tokenizer of `mico_jax.data.sst2.tokenize` (lower case; runs of
letters and digits, or single other characters) over the 1,995 most frequent
words of the pretraining sentences, with RoBERTa's special ids (`<s>` 0,
`<pad>` 1, `</s>` 2, `<unk>` 3, `<mask>` last) and its `<s> ... </s>`
framing.

  python -m experiments.pretrain_tiny --data_dir=../shared/data \
      --out=/tmp/sst2_tiny_mlm
"""

import dataclasses
import json
import os
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mico_jax import data, pretrained, roberta, tasks
from mico_jax.data import sst2

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder with sst2/*.tsv.",
                                required=True)
_OUT = flags.DEFINE_string("out", None, "Folder to write.", required=True)
_STEPS = flags.DEFINE_integer("steps", 4000, "Adam steps.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Sentences a step.")
_LR = flags.DEFINE_float("lr", 2e-3, "Peak learning rate (linear warm-up and"
                         " decay).")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and masking seed.")

MASK_RATE = 0.15
MAX_MASKED = 6  # of at most 30 real tokens: 4.5 expected, rarely more


def outside_sentences(data_dir: str) -> list[str]:
  """SST-2's sentences outside every CPU task's pool, in GLUE order."""
  sentences, _ = sst2.read_sst2_tsv(os.path.join(data_dir, "sst2"))
  inside = np.zeros(len(sentences), bool)
  for task in (tasks.SST2_TINY, tasks.SST2_CPU):
    # The pools' own choice (`tasks.load_sst2`): a seeded subset.
    inside[data.subset_indices(len(sentences), task.pool_size)] = True
  return [s for s, used in zip(sentences, inside) if not used]


class MaskedLM(nn.Module):
  """RoBERTa's encoder and LM head (dense, gelu, LayerNorm, decoder), the
  head at the given positions `[B, M]` only (the decoder is most of the
  cost)."""

  config: roberta.RobertaConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, at_BxM: jax.Array) -> jax.Array:
    h = roberta.RobertaModel(self.config, name="roberta")(tokens_BxT)
    h = jnp.take_along_axis(h, at_BxM[:, :, None], 1)
    h = nn.gelu(nn.Dense(self.config.hidden_size)(h), approximate=False)
    h = nn.LayerNorm(self.config.layer_norm_eps)(h)
    return nn.Dense(self.config.vocab_size)(h)


def mask_tokens(key: jax.Array, ids_BxT: jax.Array, mask_id: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """RoBERTa's corruption of 15% of the real tokens, at most
  `MAX_MASKED` a sentence: (inputs, positions `[B, MAX_MASKED]`, whether each
  position was chosen)."""
  choose, action, random_id = jax.random.split(key, 3)
  real = ids_BxT > 3  # not special
  u = jax.random.uniform(choose, ids_BxT.shape)
  chosen = real & (u < MASK_RATE)
  # The chosen positions first (lowest u), then any others, masked out.
  _, at_BxM = jax.lax.top_k(jnp.where(chosen, -u, -2.0), MAX_MASKED)
  kept_BxM = jnp.take_along_axis(chosen, at_BxM, 1)
  rows_Bx1 = jnp.arange(ids_BxT.shape[0])[:, None]
  chosen = jnp.zeros_like(chosen).at[rows_Bx1, at_BxM].max(kept_BxM)
  v = jax.random.uniform(action, ids_BxT.shape)
  random_ids = jax.random.randint(random_id, ids_BxT.shape, 4, mask_id)
  inputs = jnp.where(chosen & (v < 0.8), mask_id,
                     jnp.where(chosen & (v < 0.9), random_ids, ids_BxT))
  return inputs, at_BxM, kept_BxM


def main(argv):
  del argv
  tiny = tasks.SST2_TINY.make_model(2).config
  sentences = outside_sentences(_DATA_DIR.value)
  # fairseq positions run from pad + 1 = 2 to pad + length.
  config = dataclasses.replace(tiny, pad_token_id=1,
                               max_position_embeddings=tiny.pad_token_id +
                               tasks.SST2_TINY_LENGTH + 2)
  tokenizer = pretrained.word_level_tokenizer(sentences, config.vocab_size,
                              tasks.SST2_TINY_LENGTH)
  assert tokenizer.get_vocab_size() == config.vocab_size
  ids = np.asarray([e.ids for e in tokenizer.encode_batch(sentences)],
                   np.int32)
  rng = np.random.default_rng(_SEED.value)
  held_out = rng.choice(len(ids), 500, replace=False)
  train_ids = np.delete(ids, held_out, 0)
  print(f"{len(sentences)} sentences outside the pools ({len(train_ids)}"
        f" to train, 500 held out); {_STEPS.value} steps of {_BATCH.value}")

  model = MaskedLM(config)
  mask_id = config.vocab_size - 1
  init_key, mask_key, eval_key = jax.random.split(jax.random.key(_SEED.value),
                                                 3)
  params = model.init(init_key, jnp.asarray(ids[:2]),
                      jnp.zeros((2, MAX_MASKED), jnp.int32))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, _LR.value, _STEPS.value // 20, _STEPS.value)
  optimizer = optax.adamw(schedule, weight_decay=0.01)
  opt_state = optimizer.init(params)

  def loss_fn(params, key, ids_BxT):
    """(masked-LM loss + the `<s>` state's bag-of-words loss, (MLM loss,
    MLM accuracy, bag-of-words loss))."""
    inputs, at_BxM, chosen = mask_tokens(key, ids_BxT, mask_id)
    # The LM head at `<s>` (position 0) too, for the bag-of-words loss.
    at = jnp.concatenate([jnp.zeros_like(at_BxM[:, :1]), at_BxM], 1)
    logits = model.apply(params, inputs, at)
    targets = jnp.take_along_axis(ids_BxT, at_BxM, 1)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, 1:],
                                                             targets)
    correct = logits[:, 1:].argmax(-1) == targets
    count = jnp.maximum(chosen.sum(), 1)
    mlm = jnp.sum(jnp.where(chosen, losses, 0)) / count
    # -log p(word | <s>) for every word of the sentence, averaged.
    log_p_BxT = jnp.take_along_axis(jax.nn.log_softmax(logits[:, 0]),
                                    ids_BxT, 1)
    real = ids_BxT > 3
    bow = -jnp.mean(jnp.sum(jnp.where(real, log_p_BxT, 0), 1) /
                    jnp.maximum(real.sum(1), 1))
    return mlm + bow, (mlm, jnp.sum(chosen & correct) / count, bow)

  @jax.jit
  def step(params, opt_state, key, ids_BxT):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, key, ids_BxT)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  evaluate = jax.jit(loss_fn)
  start = time.perf_counter()
  for i in range(_STEPS.value):
    batch = train_ids[rng.integers(0, len(train_ids), _BATCH.value)]
    params, opt_state, loss = step(params, opt_state,
                                   jax.random.fold_in(mask_key, i), batch)
    if (i + 1) % max(1, _STEPS.value // 10) == 0:
      _, (held_loss, held_acc, held_bow) = evaluate(
          params, eval_key, ids[held_out])
      print(f"step {i + 1}: train loss {float(loss):.3f}; held out: masked"
            f" loss {float(held_loss):.3f}, accuracy {float(held_acc):.3f},"
            f" bag-of-words loss {float(held_bow):.3f}"
            f"  {time.perf_counter() - start:.0f}s")

  encoder = {"params": {"roberta": params["params"]["roberta"]}}
  pretrained.save_roberta_folder(_OUT.value, config, encoder)
  tokenizer.no_padding()
  tokenizer.no_truncation()
  tokenizer.save(os.path.join(_OUT.value, "tokenizer.json"))
  with open(os.path.join(_OUT.value, "pretraining.json"), "w") as f:
    json.dump({"objective": "masked LM + bag of words at <s>",
               "sentences": len(train_ids),
               "steps": _STEPS.value, "batch_size": _BATCH.value,
               "lr": _LR.value, "seed": _SEED.value,
               "held_out_masked_loss": float(held_loss),
               "held_out_masked_accuracy": float(held_acc),
               "held_out_bag_of_words_loss": float(held_bow),
               "seconds": round(time.perf_counter() - start)}, f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
