"""Tasks as code: a data pool, a model, MICO's split sizes and one recipe per scenario.

Scenarios follow MICO: `inf` (no DP), `hi` (epsilon = 10), `lo` (epsilon = 4).

Recipes cite the MICO script they follow (microsoft/MICO at commit 6ec0eaf,
`training/`): the `.sh` file gives the hyperparameters, the `.py` file the
loop. Two facts of those loops matter for membership: without DP,
`train_cifar10.py` and `train_purchase100.py` iterate
`DataLoader(challenge_dataset.get_train_dataset(), batch_size=...)` (in
`main`) without shuffling, members first every epoch (`shuffle=False` here);
with DP, Opacus samples Poisson batches at `args.sample_rate = 1 /
len(train_loader)` (`sample_rate_rule="steps"`), while `train_sst2.py` uses
`sampling_probability = train_batch_size * gradient_accumulation_steps /
len(ds["train"])` (`"batch"`). A deliberate difference from MICO is a field
of the recipe and a comment beside it.

Each MICO task comes twice: at MICO's scale (`cifar10`, `sst2`, `purchase100`;
meant for accelerators) and as a `_cpu` variant that runs on 2 CPU cores in
minutes. Each task's comment says what differs from MICO. Location, not part
of MICO, stands in for Purchase-100 (same file format, same recipe), because
Purchase-100 is not available offline.

Data: `load(data_dir)`. With `data_dir`, files are read in the layout of the
project's shared data folder (`cifar10/cifar10_jpeg.npz`, `sst2/train.tsv` and
`sst2/dev.tsv`, `location/bangkok`, `purchase100/dataset_purchase`); without,
CIFAR-10 and SST-2 come from TFDS's prepared data (`tfds.data_source`), and the
tabular tasks, which TFDS does not have, raise a `DataError`.
"""

import dataclasses
import functools
import os
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mico_jax import data, models, pretrained, roberta
from mico_jax.data import cifar10, sst2, tabular
from mico_jax.dp import DPConfig
from mico_jax.train import TrainConfig

# MICO's privacy targets per DP scenario; δ = 1e-5 throughout.
MICO_EPSILONS = {"hi": 10.0, "lo": 4.0}
MICO_DELTA = 1e-5


def mico_scenarios(inf: TrainConfig, dp_base: TrainConfig,
                   clip_norm: float = 2.6, delta: float = MICO_DELTA,
                   sample_rate_rule: str = "steps"
                   ) -> dict[str, TrainConfig]:
  """MICO's three scenarios: `inf` as given, `hi` and `lo` as DP-SGD.

  Args:
    inf: the non-private recipe.
    dp_base: the DP recipe without privacy (batch size = expected batch).
    clip_norm: C.
    delta: δ.
    sample_rate_rule: see `DPConfig`.
  """
  return {"inf": inf, **{
      name: dataclasses.replace(
          dp_base, dp=DPConfig(eps, delta, clip_norm, sample_rate_rule))
      for name, eps in MICO_EPSILONS.items()}}


# MICO's recipes, as data for the tasks that use them. PyTorch's StepLR with
# step 1 is `decay_every=1`.
MICO_RECIPES: dict[str, dict[str, TrainConfig]] = {
    # Purchase-100 MLP 600-128-100: train_purchase100_{inf,hi,lo}.sh: Adam
    # (`optim.Adam(model.parameters(), lr=args.learning_rate)`) lr 0.001,
    # StepLR gamma 0.9 step 5, batch 512, 30 epochs, C = 2.6 with DP; no
    # shuffling without DP (`DataLoader(train_dataset, batch_size=...)`).
    "purchase100": mico_scenarios(
        inf=TrainConfig("adam", 1e-3, batch_size=512, epochs=30,
                        decay_every=5, decay_rate=0.9, shuffle=False),
        dp_base=TrainConfig("adam", 1e-3, batch_size=512, epochs=30,
                            decay_every=5, decay_rate=0.9)),
    # CIFAR-10 CNN: train_cifar10_{inf,hi,lo}.sh with train_cifar10.py's
    # `optim.SGD(..., momentum=0)`: non-DP batch 32 lr 0.005, DP batch 512
    # lr 0.5 and C = 2.6; StepLR gamma 0.96 (default step 1), 50 epochs; no
    # shuffling without DP.
    "cifar10": mico_scenarios(
        inf=TrainConfig("sgd", 0.005, batch_size=32, epochs=50,
                        decay_every=1, decay_rate=0.96, shuffle=False),
        dp_base=TrainConfig("sgd", 0.5, batch_size=512, epochs=50,
                            decay_every=1, decay_rate=0.96)),
}


@dataclasses.dataclass(frozen=True)
class Task:
  """What the main job needs to build, train and attack one MICO track.

  Attributes:
    name: the task's flag value.
    load: data folder (or None) -> the pool (`Dataset`); reads files, so
      called lazily.
    make_model: number of classes -> flax module.
    pool_size: N, the size of the pool `load` returns from the documented data.
    len_training: n, each model's training-set size.
    len_challenge: m, members (and non-members) per model's challenge.
    scenarios: recipe per scenario name.
    default_models: models per scenario when the user does not say.
    wave_size: models trained at once by default (0: all); see
      `pipeline.Execution`. Changes speed, not results.
    unroll: on CPU, step the models from Python with no loop in the
      compiled program (see `train.Trainer`): XLA:CPU runs convolutions
      ~10-40x slower inside loops. Ignored on accelerators. Changes speed
      (and float rounding), not results.
    embedded: the data ships with the code; `load` ignores its data folder.
  """

  name: str
  load: Callable[[str | None], data.Dataset]
  make_model: Callable[[int], nn.Module]
  pool_size: int
  len_training: int
  len_challenge: int
  scenarios: Mapping[str, TrainConfig]
  default_models: int = 200
  wave_size: int = 0
  unroll: bool = False
  embedded: bool = False


def _local_file(data_dir: str | None, task: str, *parts: str) -> str:
  """`data_dir/parts...`, or a DataError if the task has no data folder."""
  where = os.path.join(*parts)
  if data_dir is None:
    raise data.DataError(
        f"task {task} reads local files: pass --data_dir, a folder holding"
        f" {where}")
  return os.path.join(data_dir, where)


def _from_tfds(load: Callable[[], object], files: str):
  """`load()`, whose error also says that --data_dir is the other source."""
  try:
    return load()
  except data.DataError as e:
    raise data.DataError(f"{e}; or pass --data_dir, a folder holding {files}"
                         ) from e


def load_cifar10(data_dir: str | None, pool_size: int | None = None
                 ) -> data.Dataset:
  """CIFAR-10 (N = 60,000): `data_dir`'s JPEG archive, else TFDS.

  Args:
    data_dir: folder holding `cifar10/cifar10_jpeg.npz`, or None for TFDS.
    pool_size: keep a seeded random subset of this many points.
  """
  if data_dir is None:
    dataset = _from_tfds(cifar10.load_cifar10_tfds, "cifar10/cifar10_jpeg.npz")
  else:
    dataset = cifar10.load_cifar10_npz(
        os.path.join(data_dir, "cifar10", "cifar10_jpeg.npz"))
  return data.subset(dataset, pool_size) if pool_size else dataset


def _sst2_sentences(data_dir: str | None, pool_size: int | None = None):
  """SST-2's (sentences, labels): `data_dir`'s GLUE TSVs, else TFDS; a seeded
  random subset of `pool_size` of them if given."""
  if data_dir is None:
    sentences, labels = _from_tfds(sst2.read_sst2_tfds,
                                   "sst2/train.tsv and sst2/dev.tsv")
  else:
    sentences, labels = sst2.read_sst2_tsv(os.path.join(data_dir, "sst2"))
  if pool_size:
    idx = data.subset_indices(len(labels), pool_size)
    sentences, labels = [sentences[i] for i in idx], labels[idx]
  return sentences, labels


def load_sst2(data_dir: str | None, pool_size: int | None = None,
              vocab_size: int = 10_000, max_len: int = 64) -> data.Dataset:
  """SST-2 (N = 68,221): `data_dir`'s GLUE TSVs, else TFDS; tokenized.

  The vocabulary (`vocab_size` ids) is built from the pool after subsetting,
  so a small pool gets no embeddings for words it never contains.

  Args:
    data_dir: folder holding `sst2/train.tsv` and `sst2/dev.tsv`, or None for
      TFDS.
    pool_size: keep a seeded random subset of this many sentences.
    vocab_size: word-level vocabulary size, padding and unknown included.
    max_len: tokens per sentence (truncated or padded with 0).
  """
  sentences, labels = _sst2_sentences(data_dir, pool_size)
  return sst2.encode_text(sentences, labels, "sst2", vocab_size=vocab_size,
                          max_len=max_len, mico_order=not pool_size)


def load_purchase100(data_dir: str | None, pool_size: int | None = None
                     ) -> data.Dataset:
  """Purchase-100 (N = 197,324) from `data_dir/purchase100/dataset_purchase`."""
  dataset = tabular.load_purchase100(
      _local_file(data_dir, "purchase100", "purchase100", "dataset_purchase"))
  return data.subset(dataset, pool_size) if pool_size else dataset


def load_location(data_dir: str | None) -> data.Dataset:
  """Location (N = 5,010) from `data_dir/location/bangkok`."""
  return tabular.load_location(
      _local_file(data_dir, "location", "location", "bangkok"))


# The embedded default: 1,797 8x8 digits, an MLP that overfits its 900 points
# so membership leaks, and 128 models (64 per point IN on average). DP-SGD with
# MICO's C = 2.6 learns digits best with plain SGD at a large rate and a
# quarter of the data per step (q = 1/4, 160 steps): ~92% evaluation accuracy
# at epsilon = 4.
DIGITS = Task(
    name="digits",
    load=lambda data_dir: data.load_digits(),
    make_model=lambda num_classes: models.MLP(num_classes, (128,)),
    pool_size=1797,
    len_training=900,
    len_challenge=100,
    scenarios=mico_scenarios(
        inf=TrainConfig(optimizer="adam", learning_rate=2e-3, batch_size=32,
                        epochs=60),
        dp_base=TrainConfig(optimizer="sgd", learning_rate=0.5,
                            batch_size=225, epochs=40)),
    default_models=128,
    embedded=True,
)

# MICO's CIFAR-10 track: its CNN, train + test pooled, n = 50,000; plain SGD
# (no momentum) for 50 epochs, lr decayed x0.96 every epoch: lr 0.005 and
# batch 32 without DP, lr 0.5 and expected batch 512 with DP (C = 2.6).
CIFAR10 = Task(
    name="cifar10",
    load=load_cifar10,
    make_model=lambda num_classes: models.CNN(num_classes),
    pool_size=60_000,
    len_training=50_000,
    len_challenge=100,
    scenarios=MICO_RECIPES["cifar10"],
    unroll=True,
)

# CIFAR-10 on 2 CPU cores, in MICO's batch order (no shuffling without DP).
# Differs from MICO's: a seeded pool of 2,000 of the
# 60,000 images with n = 1,000 (each point IN for ~50% of models, not ~83%);
# the CNN's channels 16-32-32 instead of 128-256-256 (~1/45 of the FLOPs);
# SGD with momentum 0.9 and lr 0.01 for 30 epochs (MICO's plain lr 0.005
# barely moves in the ~600 steps a small pool gives); 32 models. With DP:
# MICO's SGD lr 0.5 decayed x0.96 per epoch and C = 2.6, but an expected batch
# of 128 (q = 0.128) for 20 epochs. Trained one model at a time with unrolled
# steps, the fast way for convolutions on CPU.
CIFAR10_CPU = Task(
    name="cifar10_cpu",
    load=functools.partial(load_cifar10, pool_size=2_000),
    make_model=lambda num_classes: models.CNN(num_classes, (16, 32, 32)),
    pool_size=2_000,
    len_training=1_000,
    len_challenge=100,
    scenarios=mico_scenarios(
        inf=TrainConfig(optimizer="sgd", learning_rate=0.01, momentum=0.9,
                        batch_size=32, epochs=30, decay_every=1,
                        decay_rate=0.96, shuffle=False),
        dp_base=TrainConfig(optimizer="sgd", learning_rate=0.5, batch_size=128,
                            epochs=20, decay_every=1, decay_rate=0.96)),
    default_models=32,
    wave_size=1,
    unroll=True,
)

# MICO's SST-2 track: RoBERTa fine-tuned from a pretrained folder
# (`with_pretrained`, the main job's --pretrained_dir; MICO: roberta-base) on
# train + validation pooled, n = 67,349 (a point is IN for ~99% of models),
# tokenised by the folder's BPE to 67 tokens; 3 epochs at a constant lr, Adam
# (HF Trainer's AdamW without weight decay): lr 5e-5 and batch 96 without DP;
# lr 5e-4, expected batch 1,024 and C = 0.1 with DP (MICO:
# training/train_sst2_{inf,hi,lo}.sh). Differs: no dropout (MICO trains with
# 0.1) and no global gradient-norm clipping at 1.0 (HF Trainer's default);
# with DP, q = 1/66 instead of 1024/67,349 (0.4% apart). Without a folder the
# model is roberta-base's shape, randomly initialised, and loading the data
# asks for --pretrained_dir.
SST2_MAX_LENGTH = 67


def load_sst2_pretrained(data_dir: str | None, pretrained_dir: str | None,
                         pool_size: int | None = None,
                         max_length: int = SST2_MAX_LENGTH) -> data.Dataset:
  """SST-2 tokenised by a pretrained folder's tokenizer, to `max_length`
  tokens (MICO: 67).

  Raises:
    DataError: no folder given.
    pretrained.FolderError: the folder lacks the tokenizer's files.
  """
  if pretrained_dir is None:
    raise data.DataError(
        "task sst2 fine-tunes a pretrained RoBERTa: pass --pretrained_dir, a"
        " folder with config.json, model.safetensors (or pytorch_model.bin)"
        " and vocab.json + merges.txt (or tokenizer.json), e.g. roberta-base")
  sentences, labels = _sst2_sentences(data_dir, pool_size)
  ids, _ = pretrained.tokenize(pretrained_dir, sentences, max_length)
  return data.Dataset("sst2", ids, np.asarray(labels, np.int32), 2, "text",
                      mico_order=not pool_size)


SST2 = Task(
    name="sst2",
    load=functools.partial(load_sst2_pretrained, pretrained_dir=None),
    make_model=lambda num_classes: roberta.RobertaClassifier(
        roberta.RobertaConfig(num_labels=num_classes)),
    pool_size=68_221,
    len_training=67_349,
    len_challenge=100,
    scenarios=mico_scenarios(
        inf=TrainConfig(optimizer="adam", learning_rate=5e-5, batch_size=96,
                        epochs=3),
        dp_base=TrainConfig(optimizer="adam", learning_rate=5e-4,
                            batch_size=1024, epochs=3),
        clip_norm=0.1, sample_rate_rule="batch"),
)


def with_pretrained(task: Task, pretrained_dir: str) -> Task:
  """`task` fine-tuning the RoBERTa in `pretrained_dir` (sst2, sst2_tiny).

  The task's pool (same sentences, same order) is tokenised by the folder's
  tokenizer to the task's length. The model computes in bfloat16 on
  accelerators (float32 parameters, clipping and optimizer state) and in
  float32 on CPU.

  Raises:
    DataError: the task takes no pretrained model.
    pretrained.FolderError: the folder lacks config.json.
  """
  if task.name not in _PRETRAINED_POOLS:
    raise data.DataError(f"--pretrained_dir: task {task.name} takes no"
                         " pretrained model (only sst2 and sst2_tiny do)")
  pretrained.read_config(pretrained_dir)  # fail now on a missing config
  dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  pool_size, max_length = _PRETRAINED_POOLS[task.name]
  return dataclasses.replace(
      task, load=functools.partial(load_sst2_pretrained,
                                   pretrained_dir=pretrained_dir,
                                   pool_size=pool_size, max_length=max_length),
      make_model=lambda num_classes: pretrained.pretrained_classifier(
          pretrained_dir, num_classes, dtype))


# SST-2 on 2 CPU cores. Differs from `sst2`: a seeded pool of 4,000 of the
# 68,221 sentences with n = 2,000 (each point IN for ~50% of models, not ~99%:
# with 99% there are almost no OUT shadows), batch 32 and 20 epochs so the
# small model can memorise; 64 models. With DP: expected batch 128 (MICO's
# rule q = B / n = 0.064) for 10 epochs, Adam lr 1e-3, MICO's C = 0.1.
SST2_CPU = Task(
    name="sst2_cpu",
    load=functools.partial(load_sst2, pool_size=4_000),
    make_model=lambda num_classes: models.TextClassifier(
        num_classes, models.BagOfEmbeddings(10_000)),
    pool_size=4_000,
    len_training=2_000,
    len_challenge=100,
    scenarios=mico_scenarios(
        inf=TrainConfig(optimizer="adam", learning_rate=1e-3, batch_size=32,
                        epochs=20),
        dp_base=TrainConfig(optimizer="adam", learning_rate=1e-3,
                            batch_size=128, epochs=10),
        clip_norm=0.1, sample_rate_rule="batch"),
    default_models=64,
)

# SST-2's transformer track on 2 CPU cores: a tiny RoBERTa (1 layer, width
# 16, 2 heads, feed-forward 32; 35,106 parameters) trained from scratch on a
# word-level vocabulary of 2,000 ids and 32 tokens, a `<s>` id first (as
# RoBERTa's), id 0 padding, initialised with std 0.25 (~1/sqrt(width); HF's
# 0.02 suits width 768 and leaves a small model on a long plateau). Differs
# from `sst2`: no pretraining and no BPE; a seeded pool of 60,000 of the
# 68,221 sentences with n = 30,000 (each point IN for ~50% of models); Adam
# lr 1e-3 and batch 32 for 3 epochs without DP. With DP, a recipe that
# learns from scratch at epsilon = 10 (experiments/RESULTS.md, sst2_tiny):
# C = 5 (about the median per-example gradient norm at init; MICO's 0.1
# clips every example and drives the model to the majority class), Adam
# lr 2e-3, expected batch 3,000 (q = 0.1) for 20 epochs (200 steps; MICO's
# 3 epochs are too few from scratch); the few parameters and large n keep the
# noise small against the gradient. 4 models. With --pretrained_dir
# (`with_pretrained`), the same pool tokenised by the folder's tokenizer
# (e.g. a word-level one: experiments/pretrain_tiny.py pretrains this
# architecture without labels on the sentences outside the pool) and the
# folder's encoder.
SST2_TINY_VOCAB = 2_000
SST2_TINY_LENGTH = 32


def load_sst2_tiny(data_dir: str | None) -> data.Dataset:
  """`sst2_tiny`'s pool: word ids, `<s>` (the last id) first, 0 padding."""
  dataset = load_sst2(data_dir, pool_size=SST2_TINY.pool_size,
                      vocab_size=SST2_TINY_VOCAB - 1,
                      max_len=SST2_TINY_LENGTH - 1)
  start = np.full((len(dataset), 1), SST2_TINY_VOCAB - 1, np.int32)
  return dataclasses.replace(dataset, x=np.concatenate([start, dataset.x], 1))


SST2_TINY = Task(
    name="sst2_tiny",
    load=load_sst2_tiny,
    make_model=lambda num_classes: roberta.RobertaClassifier(
        roberta.RobertaConfig(
            vocab_size=SST2_TINY_VOCAB, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=SST2_TINY_LENGTH + 1, pad_token_id=0,
            num_labels=num_classes, initializer_range=0.25)),
    pool_size=60_000,
    len_training=30_000,
    len_challenge=100,
    scenarios=mico_scenarios(
        inf=TrainConfig(optimizer="adam", learning_rate=1e-3, batch_size=32,
                        epochs=3),
        dp_base=TrainConfig(optimizer="adam", learning_rate=2e-3,
                            batch_size=3000, epochs=20),
        clip_norm=5.0, sample_rate_rule="batch"),
    default_models=4,
)

# Tasks that `with_pretrained` accepts: (pool subset size or None for all,
# tokens a sentence).
_PRETRAINED_POOLS = {"sst2": (None, SST2_MAX_LENGTH),
                     "sst2_tiny": (SST2_TINY.pool_size, SST2_TINY_LENGTH)}

# MICO's Purchase-100 track: N = 197,324, n = 150,000; MLP 600-128-100 (tanh),
# Adam lr 1e-3 decayed x0.9 every 5 epochs, batch 512, 30 epochs, with and
# without DP (C = 2.6); MICO_RECIPES["purchase100"] cites the scripts.
PURCHASE100 = Task(
    name="purchase100",
    load=load_purchase100,
    make_model=lambda num_classes: models.MLP(num_classes, (128,)),
    pool_size=197_324,
    len_training=150_000,
    len_challenge=100,
    scenarios=MICO_RECIPES["purchase100"],
)

# Purchase-100 on 2 CPU cores. Differs from MICO's: a seeded pool of 20,000
# records with n = 10,000 (each point IN for ~50% of models, not ~76%); 64
# models. Same model and recipes.
PURCHASE100_CPU = Task(
    name="purchase100_cpu",
    load=functools.partial(load_purchase100, pool_size=20_000),
    make_model=lambda num_classes: models.MLP(num_classes, (128,)),
    pool_size=20_000,
    len_training=10_000,
    len_challenge=100,
    scenarios=MICO_RECIPES["purchase100"],
    default_models=64,
)

# Location (Shokri et al.; 5,010 records, 446 binary features, 30 classes) in
# MICO's tabular structure: MLP 446-128-30 with Purchase-100's recipe, 200
# models with m = 100, and n = 2,500 so each point is IN for ~50% of models.
# Small enough for CPU at full structure. With DP, MICO's expected batch of 512
# is a fifth of n (q = 0.2, 150 steps), not 1/293 as on Purchase-100.
LOCATION = Task(
    name="location",
    load=load_location,
    make_model=lambda num_classes: models.MLP(num_classes, (128,)),
    pool_size=5_010,
    len_training=2_500,
    len_challenge=100,
    scenarios=MICO_RECIPES["purchase100"],
)

# Location with 64 models instead of 200; otherwise as `location`.
LOCATION_CPU = dataclasses.replace(LOCATION, name="location_cpu",
                                   default_models=64)

TASKS: dict[str, Task] = {task.name: task for task in (
    DIGITS, CIFAR10, CIFAR10_CPU, SST2, SST2_CPU, SST2_TINY, PURCHASE100,
    PURCHASE100_CPU, LOCATION, LOCATION_CPU)}
