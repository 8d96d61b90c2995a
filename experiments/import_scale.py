r"""Importing a MICO SST-2 scenario at its real count: memory and time by group.

  python -m experiments.import_scale --data_dir=../shared/data \
      --out=/tmp/import_scale --models_per_read=8,200 \
      --e2e_models=16 --e2e_models_per_read=2,16 [--measure=roberta_base]

Writes a MICO-layout `sst2_inf` of `--num_models` RoBERTa folders (MICO's
200) under `--out`: a tiny random RoBERTa (`--hidden_size`, 2 layers, 2
heads) with a word-level tokenizer over the pool's sentences as
`<out>/pretrained`, each model its weights moved at random, saved as
`config.json` + `model.safetensors`, with seeds and solutions (the models
learnt nothing: the attacks score chance). Then measures, each in a child
process (wall time and peak resident memory, the child's `ru_maxrss`):

- for each `--models_per_read` G: `mico_io.observe_release` of all models on
  the first `--points` points of MICO's pool (one batch of 512: the memory
  of a full pass, a 133rd of its compute);
- for each `--e2e_models_per_read` G: `python -m experiments.attack_mico
  --task=sst2 --fresh_shadows=0` end to end on the first `--e2e_models`
  models (MICO's pool of 68,221 sentences, 67 tokens), then once more in the
  first G's workdir (statistics reused).

`--measure=roberta_base` adds what one real-size model costs: a random
`RobertaForSequenceClassification` of roberta-base's shape (transformers and
torch; nothing downloaded) saved as MICO's `pytorch_model.bin` and as
`model.safetensors`, the seconds to read each into our params, the seconds a
point to compute its statistics (CPU, float32), and the peak memory of
reading a group of `--base_group` such models and observing them on a few
points; from these, the hours of a 200-model scenario.
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import jax
import numpy as np

from mico_jax import challenge, mico_io, parallel, pretrained, roberta
from mico_jax import stats, tasks
from mico_jax.data import Dataset, sst2

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Holds sst2/{train,dev}.tsv.",
                                required=True)
_OUT = flags.DEFINE_string("out", None, "Folder to write.", required=True)
_NUM_MODELS = flags.DEFINE_integer("num_models", 200, "Models of the scenario.")
_HIDDEN = flags.DEFINE_integer("hidden_size", 8, "Width of the tiny RoBERTa.")
_PER_READ = flags.DEFINE_list("models_per_read", ["8", "200"],
                              "Group sizes G to measure.")
_POINTS = flags.DEFINE_integer("points", 512, "Pool points observed by the"
                               " 200-model measurement (one batch of 512).")
_E2E = flags.DEFINE_integer("e2e_models", 16, "Models of the release that"
                            " attack_mico attacks end to end.")
_E2E_PER_READ = flags.DEFINE_list("e2e_models_per_read", ["2", "16"],
                                  "attack_mico's --models_per_read values.")
_CHILD = flags.DEFINE_integer("child_models_per_read", None, "Internal: run"
                              " one observe_release measurement.")
_MEASURE = flags.DEFINE_multi_enum(
    "measure", ["release"], ["release", "roberta_base"], "What to measure:"
    " the tiny release by group sizes, one roberta-base-shaped model.")
_BASE_GROUP = flags.DEFINE_integer("base_group", 4, "roberta-base models read"
                                   " and observed together.")
_BASE_POINTS = flags.DEFINE_integer("base_points", 16, "Points observed by"
                                    " the roberta-base measurement.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 4_000


def write_release(out: str) -> str:
  """`<out>/pretrained` and `<out>/sst2/sst2_inf`; returns the latter's parent."""
  base = os.path.join(out, "pretrained")
  sentences, _ = sst2.read_sst2_tsv(os.path.join(_DATA_DIR.value, "sst2"))
  tokenizer = pretrained.word_level_tokenizer(sentences, VOCAB,
                                              tasks.SST2_MAX_LENGTH)
  config = roberta.RobertaConfig(
      vocab_size=VOCAB, hidden_size=_HIDDEN.value, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=2 * _HIDDEN.value,
      max_position_embeddings=tasks.SST2_MAX_LENGTH + 2, pad_token_id=1,
      num_labels=2)
  model = roberta.RobertaClassifier(config)
  params = jax.tree.map(np.asarray, model.init(
      jax.random.key(0), np.zeros((1, tasks.SST2_MAX_LENGTH), np.int32)))
  pretrained.save_roberta_folder(base, config, params)
  tokenizer.no_padding()
  tokenizer.no_truncation()
  tokenizer.save(os.path.join(base, "tokenizer.json"))
  task = tasks.SST2
  chal = challenge.make_challenge(
      task.pool_size, task.len_training, task.len_challenge,
      challenge.make_seeds(0, _NUM_MODELS.value),
      phases=challenge.mico_phases(_NUM_MODELS.value))
  mico_dir = os.path.join(out, "sst2")
  challenge.write_bundle(mico_dir, "sst2_inf", chal)
  rng = np.random.default_rng(0)
  for k, phase in enumerate(chal.phases):
    moved = jax.tree.map(
        lambda a: a + 0.05 * rng.standard_normal(a.shape, np.float32), params)
    pretrained.save_roberta_folder(
        challenge.model_dir(mico_dir, "sst2_inf", phase, k), config, moved)
  return mico_dir


def run_child(argv: list[str]) -> tuple[float, float, int]:
  """(wall seconds, peak RSS in GiB, exit status) of a child process."""
  start = time.perf_counter()
  with tempfile.TemporaryFile("w+") as errors:
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=errors)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
      errors.seek(0)
      print(errors.read()[-2000:], file=sys.stderr)
  return (round(time.perf_counter() - start, 1),
          round(usage.ru_maxrss / 2**20, 2), child.returncode)


def _sst2(out: str):
  task = tasks.with_pretrained(tasks.SST2, os.path.join(out, "pretrained"))
  return task, task.load(_DATA_DIR.value)


def observe_child(out: str, mico_dir: str, per_read: int) -> None:
  """In a child process: `observe_release` of every model, `--points`."""
  task, dataset = _sst2(out)
  dataset = dataclasses.replace(dataset, x=dataset.x[:_POINTS.value],
                                y=dataset.y[:_POINTS.value])
  release = mico_io.read_scenario(
      os.path.join(mico_dir, "sst2_inf"), "inf", task.pool_size,
      task.len_training, task.len_challenge)
  mico_io.observe_release(release, task.make_model(2), dataset,
                          stats.default_queries(dataset),
                          models_per_read=per_read, log=None)


def measure(out: str, mico_dir: str) -> list[dict]:
  """Each G: `observe_release` of all models on `--points` points, then
  attack_mico end to end on the first `--e2e_models` (and once more, reusing
  the first G's statistics)."""
  rows = []
  for per_read in _PER_READ.value:
    argv = [sys.executable, "-m", "experiments.import_scale",
            f"--data_dir={_DATA_DIR.value}", f"--out={out}",
            f"--num_models={_NUM_MODELS.value}", f"--points={_POINTS.value}",
            f"--child_models_per_read={per_read}"]
    rows.append(dict(zip(("seconds", "peak_rss_gib", "exit"), run_child(
        argv)), models=_NUM_MODELS.value, points=_POINTS.value,
                     models_per_read=int(per_read), run="observe_release"))
    print(json.dumps(rows[-1]), flush=True)
  small = os.path.join(out, "sst2_e2e")
  os.makedirs(os.path.join(small, "sst2_inf"), exist_ok=True)
  for k, phase in enumerate(challenge.mico_phases(_NUM_MODELS.value)[
      :_E2E.value]):
    link = challenge.model_dir(small, "sst2_inf", phase, k)
    if not os.path.exists(link):
      os.makedirs(os.path.dirname(link), exist_ok=True)
      os.symlink(challenge.model_dir(mico_dir, "sst2_inf", phase, k), link)
  values = _E2E_PER_READ.value
  for i, per_read in enumerate(values + values[:1]):
    workdir = os.path.join(out, f"work_{per_read}")
    argv = [sys.executable, "-m", "experiments.attack_mico", "--task=sst2",
            f"--pretrained_dir={out}/pretrained", f"--mico_dir={small}",
            f"--data_dir={_DATA_DIR.value}", "--fresh_shadows=0",
            "--attacks=loss,lira_offline", "--submit_attack=lira_offline",
            f"--models_per_read={per_read}", f"--workdir={workdir}"]
    rows.append(dict(zip(("seconds", "peak_rss_gib", "exit"), run_child(
        argv)), models=_E2E.value, points=tasks.SST2.pool_size,
                     models_per_read=int(per_read),
                     run="attack_mico" + (" (reused)" if i == len(values)
                                          else "")))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def measure_roberta_base(out: str) -> dict:
  """One roberta-base-shaped model: file sizes, read and statistics time."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hf_config = transformers.RobertaConfig(
      max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
      num_labels=2)  # roberta-base's shape
  net = transformers.RobertaForSequenceClassification(hf_config)
  folder = os.path.join(out, "roberta_base", "model_0")
  net.save_pretrained(folder)  # config.json + model.safetensors
  torch.save(net.state_dict(), os.path.join(folder, "pytorch_model.bin"))
  del net
  config = pretrained.read_config(folder)
  model = roberta.RobertaClassifier(config)
  x = np.zeros((1, tasks.SST2_MAX_LENGTH), np.int32)
  like = jax.eval_shape(model.init, jax.random.key(0), x)
  result = {"parameters": int(sum(a.size for a in jax.tree.leaves(like)))}
  for name in ("pytorch_model.bin", "model.safetensors"):
    path = os.path.join(folder, name)
    result[f"{name} MB"] = round(os.path.getsize(path) / 1e6)
    if name == "pytorch_model.bin":  # read without the safetensors file
      hidden = os.path.join(folder, "hidden.safetensors")
      os.rename(os.path.join(folder, "model.safetensors"), hidden)
    start = time.perf_counter()
    params = mico_io.read_weights(folder, model, like)
    result[f"read {name} s"] = round(time.perf_counter() - start, 2)
    if name == "pytorch_model.bin":
      os.rename(hidden, os.path.join(folder, "model.safetensors"))
  rng = np.random.default_rng(0)
  n = _BASE_POINTS.value
  tokens = rng.integers(3, config.vocab_size, (n, tasks.SST2_MAX_LENGTH))
  tokens[:, 0], tokens[:, -1] = 0, 2
  dataset = Dataset("random", tokens.astype(np.int32),
                    rng.integers(0, 2, n).astype(np.int32), 2, "text")
  stacked = jax.tree.map(lambda a: a[None], params)
  del params
  for _ in range(2):  # the first call compiles
    start = time.perf_counter()
    stats.compute_stats(model.apply, stacked, dataset.x, dataset.y,
                        batch_size=n)
    seconds = time.perf_counter() - start
  per_point = seconds / n
  result["statistics s/point (1 model)"] = round(per_point, 4)
  result["statistics h/model (68,221 points)"] = round(
      per_point * tasks.SST2.pool_size / 3600, 2)
  result["200 models, h"] = round(200 * per_point * tasks.SST2.pool_size /
                                  3600 + 200 * result[
                                      "read pytorch_model.bin s"] / 3600, 1)
  del stacked
  # A group read and observed as observe_release does (`pipeline.observe`
  # on the stacked group), here on n points in one batch.
  release = mico_io.ScenarioRelease(
      "base", "inf", (folder,) * _BASE_GROUP.value,
      np.arange(_BASE_GROUP.value), None, np.zeros(0, bool), np.zeros(0, bool))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  # As `pipeline.observe` places them, on one batch of n points (its
  # 512-point batches would take minutes a model on CPU).
  group = parallel.put_models(mico_io.load_params(release, model, x),
                              parallel.make_mesh())
  stats.compute_stats(model.apply, group, dataset.x, dataset.y,
                      batch_size=n, to_host=parallel.to_host)
  result[f"peak RSS GiB, group of {_BASE_GROUP.value}"] = round(
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
  result["peak RSS GiB before the group"] = round(before, 2)
  return result


def main(argv):
  del argv
  out = os.path.abspath(_OUT.value)
  if _CHILD.value is not None:
    observe_child(out, os.path.join(out, "sst2"), _CHILD.value)
    return
  print(f"load: {os.getloadavg()}", flush=True)
  start = time.perf_counter()
  if "release" in _MEASURE.value:
    mico_dir = write_release(out)
    print(f"wrote {_NUM_MODELS.value} models in {mico_dir} in"
          f" {time.perf_counter() - start:.0f}s", flush=True)
    measure(out, mico_dir)
  if "roberta_base" in _MEASURE.value:
    print(json.dumps(measure_roberta_base(out), indent=1), flush=True)
  print(f"load: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
  app.run(main)
