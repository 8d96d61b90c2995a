"""The real MICO release in and out: model folders, weights, submissions.

A MICO task folder holds one folder per scenario, `<task>_<scenario>/` with
scenario `inf`, `hi`, `lo` (or `ddp`, the DP-distinguisher track), each with
phases `train/`, `dev/`, `final/` of `model_<i>/` folders (any subset here):

  model.pt          the model's `state_dict` (DP models: Opacus's `_module.`
                    prefix on every key); SST-2: config.json and
                    pytorch_model.bin (or model.safetensors), Hugging Face's
                    RoBERTa
  seed_challenge    always
  seed_training     train (and DDP's dev/final)
  seed_membership   train only
  solution.csv      train only: 0/1 per challenge point, one comma row

Weights are read with `torch.load(weights_only=True)`, which refuses any pickle
that is not plain tensors without running it; torch is imported only then.
They become our flax parameters (PyTorch's OIHW conv kernels -> HWIO, Linear
`[out, in]` -> `[in, out]`). `observe_release` reads a scenario's models a
group at a time (MICO's 200 SST-2 models of one scenario are ~100 GB of
weights), computes their statistics and caches those, not the weights: a
rerun needs neither torch nor the weights.

A submission is MICO's starting kit's zip: one `prediction.csv` (a comma row
of values in [0, 1]) per dev/final model at
`<task>/<task>_<scenario>/<phase>/model_<i>/prediction.csv`, which CodaLab's
scorer reads under `res/`.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
from typing import Mapping, Sequence

import jax
import numpy as np

from mico_jax import challenge as challenge_lib
from mico_jax import checkpoint, models, parallel, pipeline, pretrained
from mico_jax import roberta
from mico_jax import stats as stats_lib
from mico_jax.data import Dataset

SCENARIOS = ("inf", "hi", "lo", "ddp")
SUBMITTED_PHASES = ("dev", "final")
_DP_PREFIX = "_module."
_ENTRY = re.compile(
    r"(?P<task>[A-Za-z0-9_]+)/(?P=task)_(?P<scenario>[a-z]+)/"
    r"(?P<phase>dev|final)/model_(?P<index>\d+)/prediction\.csv")


class MicoIOError(ValueError):
  """A release or submission file that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class ScenarioRelease:
  """One scenario folder of a MICO release, its seeds turned into splits.

  Attributes:
    name: the folder's name, `<task>_<scenario>`.
    scenario: `inf`, `hi`, `lo` or `ddp`.
    folders: each model's folder, in order of model index.
    indices: each model's MICO index (`model_<i>`).
    challenge: every model's splits; only `challenge_KxC` is real where a
      model's other seeds are not revealed (see the masks).
    training_known_K: the model's training set is revealed (`seed_training`
      and its membership).
    membership_known_K: the model's challenge membership is known (from
      `seed_membership`, `solution.csv` or a solutions folder).
  """

  name: str
  scenario: str
  folders: tuple[str, ...]
  indices: np.ndarray
  challenge: challenge_lib.Challenge
  training_known_K: np.ndarray
  membership_known_K: np.ndarray

  @property
  def phases(self) -> tuple[str, ...]:
    return self.challenge.phases

  @property
  def keep_KxN(self) -> np.ndarray:
    """Known training sets; rows of models whose set is hidden are False."""
    return self.challenge.keep_KxN & self.training_known_K[:, None]


def find_scenarios(mico_dir: str, task: str) -> dict[str, str]:
  """`{scenario: folder}` for every `<task>_<scenario>` folder in `mico_dir`."""
  if not os.path.isdir(mico_dir):
    raise MicoIOError(f"{mico_dir}: no such folder")
  found = {s: os.path.join(mico_dir, f"{task}_{s}") for s in SCENARIOS
           if os.path.isdir(os.path.join(mico_dir, f"{task}_{s}"))}
  if not found:
    raise MicoIOError(
        f"{mico_dir}: holds none of "
        + ", ".join(f"{task}_{s}" for s in SCENARIOS))
  return found


def _read_seed(path: str) -> int:
  try:
    with open(path) as f:
      seed = int(f.read().strip())
  except FileNotFoundError as e:
    raise MicoIOError(f"{path}: missing seed file") from e
  except (OSError, ValueError) as e:
    raise MicoIOError(f"{path}: not an integer seed ({e})") from e
  if not 0 <= seed < 2**64:
    raise MicoIOError(f"{path}: seed {seed} is outside [0, 2^64)")
  return seed


def _model_folders(root: str) -> list[tuple[int, str, str]]:
  found = challenge_lib.model_folders(root)
  if not found:
    raise MicoIOError(f"{root}: no {{train,dev,final}}/model_<i> folders")
  return found


def read_scenario(root: str, scenario: str, pool_size: int, len_training: int,
                  len_challenge: int, solutions_root: str | None = None
                  ) -> ScenarioRelease:
  """Reads the seeds (and solutions) of one scenario folder and rebuilds splits.

  `seed_challenge` is required everywhere, `seed_training` and
  `seed_membership` in `train`. Where `solution.csv` and `seed_membership`
  are both present they must agree: that checks the split semantics.

  Args:
    root: the `<task>_<scenario>` folder.
    scenario: its scenario (`inf`, `hi`, `lo`, `ddp`).
    pool_size, len_training, len_challenge: the task's N, n and m.
    solutions_root: optional folder laid out as `root` (CodaLab's `ref/`)
      with `solution.csv` of models whose membership `root` hides.
  """
  models_found = _model_folders(root)
  seeds, has_training, has_membership, solutions = [], [], [], []
  for _, phase, path in models_found:
    row = [_read_seed(os.path.join(path, "seed_challenge"))]
    for name in ("seed_training", "seed_membership"):
      file = os.path.join(path, name)
      if phase == "train" or os.path.exists(file):
        row.append(_read_seed(file))
      else:
        row.append(None)
    has_training.append(row[1] is not None)
    has_membership.append(row[2] is not None)
    # An absent seed only fills the array: its splits are masked as unknown.
    seeds.append([0 if s is None else s for s in row])
    solution = None
    for folder in (path, solutions_root and os.path.join(
        solutions_root, os.path.relpath(path, root))):
      if folder and os.path.exists(os.path.join(folder, "solution.csv")):
        solution = os.path.join(folder, "solution.csv")
        break
    solutions.append(solution)
  try:
    challenge = challenge_lib.make_challenge(
        pool_size, len_training, len_challenge, np.array(seeds, np.uint64),
        phases=[phase for _, phase, _ in models_found])
  except challenge_lib.ChallengeError as e:
    raise MicoIOError(f"{root}: {e}") from e
  member_KxC = challenge.member_KxC.copy()
  known = np.array(has_membership)
  for k, path in enumerate(solutions):
    if path is None:
      continue
    values = challenge_lib.read_values(path)
    if values.shape != (2 * len_challenge,) or not np.isin(values,
                                                           (0, 1)).all():
      raise MicoIOError(f"{path}: expected {2 * len_challenge} values 0 or 1")
    if known[k] and not (values == member_KxC[k]).all():
      raise MicoIOError(
          f"{path}: disagrees with the membership rebuilt from"
          " seed_membership (wrong pool order or split semantics?)")
    member_KxC[k], known[k] = values.astype(bool), True
  challenge = dataclasses.replace(challenge, member_KxC=member_KxC)
  return ScenarioRelease(
      os.path.basename(os.path.normpath(root)), scenario,
      tuple(p for _, _, p in models_found),
      np.array([i for i, _, _ in models_found]), challenge,
      np.array(has_training) & np.array(has_membership), known)


# --- weights ---------------------------------------------------------------

def _torch_layers(model) -> dict[str, tuple[str, str]]:
  """flax layer name -> (PyTorch module name in MICO's scripts, kind)."""
  if isinstance(model, models.MLP):
    # mico.py: `self.mlp = nn.Sequential(Linear, Tanh, ..., Linear)`.
    return {f"Dense_{i}": (f"mlp.{2 * i}", "linear")
            for i in range(len(model.hidden) + 1)}
  if isinstance(model, models.CNN):
    # mico.py: `self.cnn = nn.Sequential(Conv2d, Tanh, MaxPool2d, Conv2d,
    # Tanh, Conv2d, Tanh, AvgPool2d, Flatten, Linear)`.
    return {"Conv_0": ("cnn.0", "conv"), "Conv_1": ("cnn.3", "conv"),
            "Conv_2": ("cnn.5", "conv"), "Dense_0": ("cnn.9", "linear")}
  raise MicoIOError(f"importing PyTorch weights into {type(model).__name__}"
                    " is not supported")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `model.pt` state dict as float32 arrays, Opacus's `_module.` removed.

  Raises:
    MicoIOError: torch is missing, the file is unreadable or truncated, or
      holds anything but a mapping of names to tensors (refused by
      `weights_only=True` before any of it runs).
  """
  with _as_mico_error():
    state = pretrained.read_torch_state(path)
  return {k.removeprefix(_DP_PREFIX): v for k, v in state.items()}


@contextlib.contextmanager
def _as_mico_error():
  """A pretrained folder's error, raised as this module's (same message)."""
  try:
    yield
  except pretrained.FolderError as e:
    raise MicoIOError(str(e)) from e


def to_flax(state: Mapping[str, np.ndarray], model, params_like,
            path: str) -> dict:
  """One model's PyTorch state dict as flax params shaped like `params_like`.

  Raises:
    MicoIOError: a key is missing or unexpected, or a shape differs.
  """
  layers = _torch_layers(model)
  expected = {f"{name}.{p}" for name, _ in layers.values()
              for p in ("weight", "bias")}
  if missing := sorted(expected - set(state)):
    raise MicoIOError(f"{path}: missing key {missing[0]}")
  if unexpected := sorted(set(state) - expected):
    raise MicoIOError(f"{path}: unexpected key {unexpected[0]}")
  params = {}
  for layer, like in params_like["params"].items():
    name, kind = layers[layer]
    weight = state[f"{name}.weight"]
    # Linear [out, in] -> [in, out]; Conv2d [out, in, h, w] -> [h, w, in, out].
    kernel = weight.T if kind == "linear" else weight.transpose(2, 3, 1, 0)
    converted = {"kernel": kernel, "bias": state[f"{name}.bias"]}
    for p, value in converted.items():
      if value.shape != like[p].shape:
        torch_shape = weight.shape if p == "kernel" else value.shape
        raise MicoIOError(
            f"{path}: {name}.{'weight' if p == 'kernel' else 'bias'} has"
            f" shape {tuple(torch_shape)}, the model needs"
            f" {tuple(like[p].shape)} (as flax {layer}.{p})")
    params[layer] = {p: np.ascontiguousarray(v, np.float32)
                     for p, v in converted.items()}
  return {"params": params}


_SST2_FILES = ("from MICO's release: each SST-2 model folder holds config.json"
               " and pytorch_model.bin")


def read_weights(folder: str, model, params_like) -> dict:
  """The flax params of the model stored in one MICO model folder.

  SST-2 folders are Hugging Face RoBERTa folders (`Trainer.save_model`:
  `config.json` and `pytorch_model.bin`, or `model.safetensors`), read by
  `pretrained.load_roberta_folder`, which first checks that `config.json`
  is the task's architecture.
  """
  if isinstance(model, roberta.RobertaClassifier):
    with _as_mico_error():
      return pretrained.load_roberta_folder(folder, expected=model.config,
                                            get=_SST2_FILES)[1]
  path = check_folder(folder, model)
  return to_flax(read_state_dict(path), model, params_like, path)


def check_folder(folder: str, model) -> str:
  """The model file of a folder, checked without reading the weights (for
  RoBERTa, `config.json` against the model's architecture too).

  Raises:
    MicoIOError: a file is missing or of another architecture.
  """
  if isinstance(model, roberta.RobertaClassifier):
    with _as_mico_error():
      return pretrained.check_folder(folder, model.config, _SST2_FILES)[1]
  path = os.path.join(folder, "model.pt")
  if not os.path.exists(path):
    if os.path.exists(os.path.join(folder, "config.json")):
      raise MicoIOError(f"{folder}: a RoBERTa folder, but the task's model is"
                        f" {type(model).__name__}")
    raise MicoIOError(f"{path}: missing model file")
  return path


def load_params(release: ScenarioRelease, model, example_x: np.ndarray,
                rows: Sequence[int] | None = None):
  """Models `rows` (default all) of a scenario as one stacked flax pytree.

  The stack is allocated first and filled one model at a time, so reading
  holds the group plus one model.
  """
  rows = range(len(release.folders)) if rows is None else rows
  params_like = jax.eval_shape(model.init, jax.random.key(0), example_x[:1])
  stacked = jax.tree.map(
      lambda a: np.empty((len(rows), *a.shape), a.dtype), params_like)
  for k, row in enumerate(rows):
    one = read_weights(release.folders[row], model, params_like)
    jax.tree.map(lambda out, a, k=k: out.__setitem__(k, a), stacked, one)
  return stacked


# Host memory for one group's stacked weights (`default_models_per_read`).
READ_BUDGET_BYTES = 2 * 2**30
# At most this many models a group by default: activations of a statistics
# batch grow with the group too (200 tiny RoBERTas at once: 9.4 GiB, 8 at a
# time: 1.4 GiB, and faster; experiments/RESULTS.md).
MAX_MODELS_PER_READ = 16


def default_models_per_read(model, example_x: np.ndarray, num_models: int,
                            budget_bytes: int = READ_BUDGET_BYTES) -> int:
  """How many models `observe_release` reads at once: as many as fit in
  `budget_bytes` of float32 weights (4 roberta-base models of 125M
  parameters), at least one and at most `MAX_MODELS_PER_READ`."""
  params_like = jax.eval_shape(model.init, jax.random.key(0), example_x[:1])
  size = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params_like))
  return int(np.clip(budget_bytes // max(size, 1), 1,
                     min(num_models, MAX_MODELS_PER_READ)))


def _file_stamps(folders: Sequence[str]) -> list[str]:
  """Each model file's path, size and modification time."""
  stamps = []
  for folder in folders:
    for name in ("model.pt", "pytorch_model.bin", "model.safetensors",
                 "config.json"):
      path = os.path.join(folder, name)
      if os.path.exists(path):
        stat = os.stat(path)
        stamps.append(f"{os.path.abspath(path)}:{stat.st_size}:"
                      f"{stat.st_mtime_ns}")
  return stamps


def _data_digest(dataset: Dataset) -> str:
  digest = hashlib.sha256()
  for a in (dataset.x, dataset.y):
    a = np.ascontiguousarray(a)
    digest.update(f"{a.dtype}{a.shape}".encode())
    digest.update(memoryview(a).cast("B"))
  return digest.hexdigest()[:16]


def observe_release(release: ScenarioRelease, model, dataset: Dataset,
                    queries: Sequence[stats_lib.Query], *,
                    models_per_read: int = 0, cache_dir: str | None = None,
                    mesh=None, log=print) -> stats_lib.Stats:
  """Statistics of every model of a scenario, reading a group at a time.

  The models are read and observed (`pipeline.observe`) in groups of at most
  `models_per_read` (0: `default_models_per_read`), so no more than one
  group's weights are held; groups are as even as possible and the last is
  padded with copies of its last model, so one shape compiles.
  Results equal observing all models at once. Every folder's files (and
  RoBERTa config) are checked before the first group is read.

  With `cache_dir`, each group's statistics are saved there
  (`targets_<first>-<last>.npz`) and reused while the model files (paths,
  sizes, modification times), the model, the data, the queries and the code
  are the same: a rerun, or a run stopped part way, reads only what changed.
  """
  for folder in release.folders:  # fail in seconds, not after hours
    check_folder(folder, model)
  total = len(release.folders)
  limit = models_per_read or default_models_per_read(model, dataset.x, total)
  group = -(-total // -(-total // limit))  # even groups of at most `limit`
  description = {"model": repr(model), "dataset": dataset.name,
                 "pool_size": len(dataset), "data": _data_digest(dataset),
                 "queries": [repr(q) for q in queries]}
  parts, spent = [], []  # seconds of each group computed here
  for first in range(0, total, group):
    rows = np.arange(first, min(first + group, total))
    span = f"targets {rows[0]}-{rows[-1]} of {total}"
    path = cache_dir and os.path.join(cache_dir,
                                      f"targets_{rows[0]}-{rows[-1]}.npz")
    described = dict(description, files=_file_stamps(
        [release.folders[r] for r in rows]))
    if path:
      try:
        saved = checkpoint.load_results(path, described, None)
      except checkpoint.CheckpointError as e:
        saved = None
        if log:
          log(f"[{release.name}] {span}: not reusing saved statistics ({e})")
      if saved:
        parts.append(saved[1])
        if log:
          log(f"[{release.name}] {span}: statistics from {path}")
        continue
    start = time.perf_counter()
    params = load_params(release, model, dataset.x, rows)
    if len(rows) < group:  # copies of the last model fill the group
      params = jax.tree.map(
          lambda a: a[np.minimum(np.arange(group), len(rows) - 1)], params)
    read = time.perf_counter() - start
    observed = pipeline.observe(model, params, dataset, queries, mesh)
    del params
    observed = stats_lib.Stats(*(a[:len(rows)] for a in observed))
    if log:
      took = time.perf_counter() - start
      spent.append(took)
      left = np.mean(spent) * -(-(total - rows[-1] - 1) // group)
      log(f"[{release.name}] {span}: read in {read:.1f}s, statistics in"
          f" {took - read:.1f}s; ~{left / 60:.0f} min left")
    if path and parallel.is_main_process():
      checkpoint.save_results(path, described, None, observed)
    parts.append(observed)
  return stats_lib.Stats(*(np.concatenate(a) for a in zip(*parts)))


# --- submissions -----------------------------------------------------------

def atomic_write(path: str, write, binary: bool = False) -> None:
  """Writes `path` through a temporary file in its folder, then renames."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
  try:
    with os.fdopen(fd, "wb" if binary else "w") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    os.remove(tmp)
    raise


def entry_name(task: str, scenario: str, phase: str, index: int) -> str:
  """A prediction's path in MICO's submission zip (and CodaLab's `res/`)."""
  return f"{task}/{task}_{scenario}/{phase}/model_{index}/prediction.csv"


def check_entry_name(name: str) -> re.Match:
  """Refuses a zip entry that is not a MICO prediction path (e.g. `../`)."""
  parts = name.replace("\\", "/").split("/")
  if name.startswith(("/", "\\")) or ".." in parts or ":" in name:
    raise MicoIOError(f"{name}: unsafe path in a submission")
  match = _ENTRY.fullmatch(name)
  if match is None:
    raise MicoIOError(f"{name}: not <task>/<task>_<scenario>/{{dev,final}}/"
                      "model_<i>/prediction.csv")
  return match


def check_predictions(name: str, values: np.ndarray, length: int) -> None:
  """Predictions must be `length` finite numbers in [0, 1]."""
  values = np.asarray(values, np.float64)
  if values.shape != (length,):
    raise MicoIOError(f"{name}: {values.size} predictions, expected {length}")
  if not np.isfinite(values).all():
    raise MicoIOError(f"{name}: not all finite numbers")
  if not ((values >= 0) & (values <= 1)).all():
    raise MicoIOError(f"{name}: outside [0, 1]")


def write_submission(zip_path: str, predictions: Mapping[str, np.ndarray],
                     length: int, root: str) -> None:
  """Writes the prediction files under `root` and MICO's submission zip of them.

  Everything is validated before anything is written; `root` appears only
  complete (written in a temporary folder that replaces it) and so does the
  zip (a temporary file, then renamed).

  Args:
    zip_path: the `.zip` to write.
    predictions: entry name (`entry_name`) -> values in [0, 1].
    length: predictions per model (2m).
    root: the folder receiving the tree of `prediction.csv` files.
  """
  for name, values in predictions.items():
    check_entry_name(name)
    check_predictions(name, values, length)
  root = os.path.abspath(root)
  os.makedirs(os.path.dirname(root), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(root), prefix=".tmp_")
  for name, values in predictions.items():
    path = os.path.join(tmp, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    challenge_lib.write_values(path, np.asarray(values, np.float64))

  def write_zip(f):
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
      for name in sorted(predictions):
        z.write(os.path.join(tmp, name), name)

  try:
    atomic_write(zip_path, write_zip, binary=True)
  except BaseException:
    shutil.rmtree(tmp)
    raise
  if os.path.exists(root):
    shutil.rmtree(root)
  os.replace(tmp, root)


def read_submission(zip_path: str, length: int) -> dict[str, np.ndarray]:
  """Reads and validates a submission zip: safe names, valid predictions.

  Raises:
    MicoIOError: naming the zip entry (or the zip) that is wrong.
  """
  try:
    with zipfile.ZipFile(zip_path) as z:
      names = [i.filename for i in z.infolist() if not i.is_dir()]
      for name in names:
        check_entry_name(name)
      result = {}
      for name in names:
        text = z.read(name).decode()
        try:
          values = np.array([float(v) for v in re.split(r"[,\s]+",
                                                        text.strip()) if v])
        except ValueError as e:
          raise MicoIOError(f"{name}: not a list of numbers") from e
        check_predictions(name, values, length)
        result[name] = values
  except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as e:
    raise MicoIOError(f"{zip_path}: not a readable zip ({e})") from e
  if not result:
    raise MicoIOError(f"{zip_path}: holds no predictions")
  return result


def check_submission_covers(predictions: Mapping[str, np.ndarray],
                            expected: Sequence[str], zip_path: str) -> None:
  """Every expected dev/final model has a prediction, and nothing else."""
  if missing := sorted(set(expected) - set(predictions)):
    raise MicoIOError(f"{zip_path}: no {missing[0]}")
  if extra := sorted(set(predictions) - set(expected)):
    raise MicoIOError(f"{zip_path}: unexpected entry {extra[0]}")


def write_json(obj, path: str) -> None:
  """JSON written atomically (NaN written as null)."""
  def clean(o):
    if isinstance(o, dict):
      return {k: clean(v) for k, v in o.items()}
    if isinstance(o, float) and not math.isfinite(o):
      return None
    return o
  atomic_write(path, lambda f: json.dump(clean(obj), f, indent=2))
