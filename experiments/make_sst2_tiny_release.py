r"""A tiny MICO-layout SST-2 release, to run `attack_mico --task=sst2` on CPU.

  python -m experiments.make_sst2_tiny_release --data_dir=../shared/data \
      --out=/tmp/sst2_tiny
  python -m experiments.attack_mico --task=sst2 \
      --pretrained_dir=/tmp/sst2_tiny/pretrained \
      --mico_dir=/tmp/sst2_tiny/release/sst2 \
      --solutions_dir=/tmp/sst2_tiny/release/solutions/sst2 \
      --data_dir=../shared/data --fresh_shadows=0 --workdir=W

Not MICO's models: roberta-base is replaced by a tiny random RoBERTa
(`<out>/pretrained`: 2 layers, width 16, a byte-level BPE of `--vocab_size`
trained on the pool), and each model is fine-tuned for only `--steps` Adam
steps (members first, then its other training points shuffled), so the
attacks score near chance. What is MICO's: the pool (GLUE train then
validation), n = 67,349, m = 100, the splits (torch's `random_split` from
three seeds per model), the phases and the folders as `train_sst2.py`'s
`Trainer.save_model` wrote them (`config.json`, `pytorch_model.bin`, seeds,
`solution.csv`; dev/final solutions under `<out>/release/solutions`).
torch and transformers are needed (optional extras of mico_jax).
"""

import os
import sys

from absl import app
from absl import flags
import numpy as np

from experiments import torch_mico
from mico_jax import challenge, pretrained, tasks
from mico_jax.data import sst2

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Holds sst2/{train,dev}.tsv.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_NUM_MODELS = flags.DEFINE_integer("num_models", 8, "Models (MICO: 200).")
_STEPS = flags.DEFINE_integer("steps", 40, "Fine-tuning steps a model.")
_VOCAB = flags.DEFINE_integer("vocab_size", 512, "BPE vocabulary size.")


def main(argv):
  del argv
  if _OUT.value is None or _DATA_DIR.value is None:
    sys.exit("error: --out and --data_dir are required")
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers.implementations import ByteLevelBPETokenizer  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  task = tasks.TASKS["sst2"]
  # GLUE train then validation: MICO's pool order.
  sentences, labels = sst2.read_sst2_tsv(os.path.join(_DATA_DIR.value,
                                                      "sst2"))
  labels = np.asarray(labels)
  base = os.path.join(_OUT.value, "pretrained")
  os.makedirs(base, exist_ok=True)
  tokenizer = ByteLevelBPETokenizer()
  tokenizer.train_from_iterator(
      sentences, vocab_size=_VOCAB.value, min_frequency=2,
      special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
  tokenizer.save_model(base)
  ids, _ = pretrained.tokenize(base, sentences, tasks.SST2_MAX_LENGTH)
  config = transformers.RobertaConfig(
      vocab_size=tokenizer.get_vocab_size(), hidden_size=16,
      num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
      max_position_embeddings=tasks.SST2_MAX_LENGTH + 5, type_vocab_size=1,
      layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
      num_labels=2)
  torch.manual_seed(0)
  transformers.RobertaForSequenceClassification(config).save_pretrained(base)
  n, m = task.len_training, task.len_challenge
  for index, phase in enumerate(challenge.mico_phases(_NUM_MODELS.value)):
    seeds = torch_mico.mico_seeds(7, index)
    _, member, train_idx, _ = torch_mico.mico_splits(len(labels), n, m, seeds)
    model = transformers.RobertaForSequenceClassification.from_pretrained(base)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(index)
    order = np.concatenate([train_idx[:m], rng.permutation(train_idx[m:])])
    for step in range(_STEPS.value):
      batch = order[step * 64:(step + 1) * 64]
      x = torch.from_numpy(ids[batch]).long()
      loss = model(x, attention_mask=(x != 1).long(),
                   labels=torch.from_numpy(labels[batch]).long()).loss
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
    sub = os.path.join("sst2_inf", phase, f"model_{index}")
    folder = os.path.join(_OUT.value, "release", "sst2", sub)
    torch_mico.write_metadata(
        folder, phase, seeds, member,
        os.path.join(_OUT.value, "release", "solutions", "sst2", sub))
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    print(f"model_{index} ({phase}): last loss {loss.item():.3f}")


if __name__ == "__main__":
  app.run(main)
