"""Datasets as plain arrays: the MICO pool of a task, plus its embedded default.

Every loader returns a `Dataset`: the whole pool that MICO draws challenges from
(for CIFAR-10 and SST-2, train and test concatenated), as numpy arrays.

MICO's seeds pick pool *indices*, so they give MICO's splits only on a pool in
MICO's order (CIFAR-10: torchvision's train then test, each in file order;
SST-2: GLUE's train then validation; Purchase-100: the file's order). Each
loader says whether its pool is in that order (`Dataset.mico_order`); anything
that rebuilds the real release's splits calls `require_mico_order`.
"""

import dataclasses
import os
from typing import Any, Literal

import numpy as np

Kind = Literal["image", "tabular", "text"]


class DataError(ValueError):
  """A data file or array is missing or malformed; the message says where."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A pool of labelled examples.

  Attributes:
    name: short name, e.g. "digits", "cifar10".
    x: features, `[N, ...]`: float32 images `NHWC`, float32 tabular rows, or
      int32 token ids `[N, L]` (0 = padding) for text.
    y: int32 labels `[N]`, in `[0, num_classes)`.
    num_classes: number of classes.
    kind: "image", "tabular" or "text"; decides models and query augmentations.
    hflip: whether a horizontal flip preserves labels (natural images).
    mico_order: point i is point i of MICO's own pool for this data set, so
      MICO's seeds select the same points here. False for pools in another
      order (the shared CIFAR-10 archive is sorted by class) or subsets.
  """

  name: str
  x: np.ndarray
  y: np.ndarray
  num_classes: int
  kind: Kind
  hflip: bool = False
  mico_order: bool = False

  def __post_init__(self):
    if len(self.x) != len(self.y):
      raise DataError(
          f"{self.name}: {len(self.x)} examples but {len(self.y)} labels")
    if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.num_classes):
      raise DataError(
          f"{self.name}: labels must lie in [0, {self.num_classes}), got"
          f" [{self.y.min()}, {self.y.max()}]")
    if self.kind not in ("image", "tabular", "text"):
      raise DataError(f"{self.name}: unknown kind {self.kind!r}")

  def __len__(self) -> int:
    return len(self.y)


def require_mico_order(dataset: Dataset) -> None:
  """Raises DataError unless `dataset` is in MICO's pool order.

  For code that applies the real MICO release's seeds: a pool in another order
  would give other splits silently.
  """
  if not dataset.mico_order:
    raise DataError(
        f"{dataset.name}: this pool is not in MICO's order (point i here is"
        " not MICO's point i), so MICO's seeds would select other points; load"
        " it from a source in the original order (for CIFAR-10, TFDS rather"
        " than the shared JPEG archive) and without subsetting")


def subset_indices(pool_size: int, size: int, seed: int = 0) -> np.ndarray:
  """A seeded random choice of `size` of `pool_size` indices, in pool order.

  Raises:
    DataError: `size` is not in `[1, pool_size]`.
  """
  if not 1 <= size <= pool_size:
    raise DataError(f"cannot take {size} of {pool_size} points")
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(pool_size, size, replace=False))


def subset(dataset: Dataset, size: int, seed: int = 0) -> Dataset:
  """The points `subset_indices(len(dataset), size, seed)` of `dataset`."""
  idx = subset_indices(len(dataset), size, seed)
  return dataclasses.replace(dataset, x=dataset.x[idx], y=dataset.y[idx],
                             mico_order=False)


def load_digits() -> Dataset:
  """scikit-learn's bundled 8x8 handwritten digits: 1,797 images, 10 classes.

  Ships inside scikit-learn, so the main job runs with no download. Pixels are
  scaled from [0, 16] to [0, 1]; images are `[N, 8, 8, 1]`.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  return Dataset("digits", x, digits.target.astype(np.int32), 10, "image")


def read_tfds_split(name: str, split: str,
                    data_dir: str | os.PathLike[str] | None,
                    download: bool) -> list[Any]:
  """All records of a TFDS split, read through TensorFlow-free `data_source`.

  Raises:
    DataError: the split is not prepared as array_record under `data_dir`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=download,
        builder_kwargs={"file_format": "array_record"} if download else None)
  except (RuntimeError, OSError, ValueError, AssertionError) as e:
    raise DataError(
        f"TFDS {name}/{split} is not readable from data_dir={data_dir!r} as"
        f" array_record: {e}") from e
  # Mocked sources reject batched reads (`__getitems__`); read one by one.
  return [source[i] for i in range(len(source))]
