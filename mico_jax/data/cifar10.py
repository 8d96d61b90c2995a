"""CIFAR-10, MICO's image pool: train (50,000) then test (10,000), N = 60,000.

Two sources:

* `load_cifar10_tfds`: TFDS's prepared `cifar10` (array_record), read through
  `tfds.data_source`, which needs no TensorFlow. TFDS stores examples shuffled;
  the loader restores CIFAR-10's original order from the `id` feature, so the
  pool's index `i` is the original index and MICO's seed-derived splits apply.
* `load_cifar10_npz`: the JPEG archive of `../shared/data/cifar10` (see its
  README). Its order within each split is by class, not the original one, and
  its pixels are JPEG-recompressed; fine for our own challenges, not for
  reproducing the real MICO release.

Images are normalized as MICO's `load_cifar10` does (`ToTensor` then
`Normalize(CIFAR10_MEAN, CIFAR10_STD)`, per channel), and returned `NHWC`.
"""

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from mico_jax.data import Dataset, DataError, read_tfds_split

# MICO's `challenge_datasets.load_cifar10` (the exact statistics of CIFAR-10's
# training set; the per-image-average std that Opacus uses is wrong, it notes).
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
NUM_TRAIN = 50_000
NUM_TEST = 10_000
_IMAGE_SHAPE = (32, 32, 3)
_NPZ_KEYS = ("jpeg", "offsets", "label", "split")


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 `[..., 3]` images -> float32 `(x/255 - CIFAR10_MEAN) / CIFAR10_STD`.

  Computed through a per-channel lookup table (exact in float64, then rounded):
  4x faster than float arithmetic on all 60,000 images.
  """
  if images.dtype != np.uint8 or images.shape[-1:] != (3,):
    raise DataError(
        f"normalize wants uint8 RGB images, got {images.dtype} {images.shape}")
  values = np.arange(256, dtype=np.float64)[:, None] / 255
  table = ((values - CIFAR10_MEAN) / CIFAR10_STD).astype(np.float32)  # [256, 3]
  x = np.empty(images.shape, np.float32)
  for channel in range(3):
    x[..., channel] = table[:, channel][images[..., channel]]
  return x


def load_cifar10_npz(path: str | os.PathLike[str]) -> Dataset:
  """CIFAR-10 from the shared JPEG archive (`cifar10_jpeg.npz`).

  The archive holds `jpeg` (all JPEG files concatenated), `offsets` (image `i`
  is `jpeg[offsets[i]:offsets[i+1]]`), `label` and `split` (0 = train, first;
  1 = test, last). Decoding all 60,000 with Pillow takes a few seconds.

  Note: within each split the archive is ordered by class, then by source file
  number, NOT in CIFAR-10's original order (so `mico_order` is False), and
  JPEG pixels differ slightly from the original binaries. Use
  `load_cifar10_tfds` to index the original order (e.g. to reproduce the real
  MICO splits).

  Args:
    path: the `.npz` archive.

  Returns:
    A `Dataset` "cifar10": `x` float32 `[N, 32, 32, 3]` normalized like MICO,
    `y` int32 `[N]`, 10 classes, kind "image", `hflip=True`.

  Raises:
    DataError: the file is missing or not an archive of that layout, or an
      image does not decode to 32x32 RGB (the message names its index).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {k: archive[k] for k in _NPZ_KEYS if k in archive.files}
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not a readable .npz archive ({e})") from e
  missing = [k for k in _NPZ_KEYS if k not in arrays]
  if missing:
    raise DataError(f"{path}: missing arrays {missing}")
  jpeg, offsets, label, split = (arrays[k] for k in _NPZ_KEYS)
  n = len(label)
  if offsets.shape != (n + 1,) or split.shape != (n,):
    raise DataError(
        f"{path}: {n} labels but {len(offsets)} offsets and {len(split)}"
        " split flags (want N + 1 and N)")
  if (offsets[0] != 0 or offsets[-1] != len(jpeg)
      or (np.diff(offsets) <= 0).any()):
    raise DataError(f"{path}: offsets must rise from 0 to len(jpeg)")
  if split.size and (np.diff(split) < 0).any():
    raise DataError(f"{path}: train images (split 0) must precede test (1)")
  data = jpeg.tobytes()
  images = np.empty((n, *_IMAGE_SHAPE), np.uint8)
  for i in range(n):
    images[i] = _decode(data[offsets[i]:offsets[i + 1]], f"{path}: image {i}")
  return _dataset(images, label, mico_order=False)


def load_cifar10_tfds(
    data_dir: str | os.PathLike[str] | None = None, *, download: bool = False
) -> Dataset:
  """CIFAR-10 from TFDS, in the original order: train 0..49,999, then test.

  Reads the prepared `cifar10` dataset with `tfds.data_source` (array_record,
  no TensorFlow needed), then sorts each split by the `id` feature, which TFDS
  sets to `f"{split}_{index:05d}"` (`train_00012`, `test_00042`), the index in
  the original CIFAR-10 binaries.

  Args:
    data_dir: TFDS data directory; None for TFDS's default.
    download: whether TFDS may download and prepare the data set if absent.
      Preparing CIFAR-10 needs TensorFlow, and array_record output (e.g.
      `tfds build cifar10 --file_format=array_record`).

  Returns:
    A `Dataset` "cifar10", as `load_cifar10_npz` describes.

  Raises:
    DataError: the data set is not prepared (as array_record) under
      `data_dir`, or its ids are not `train_#####`/`test_#####` covering each
      split exactly once.
  """
  images, labels = [], []
  for split in ("train", "test"):
    examples = read_tfds_split("cifar10", split, data_dir, download)
    order = _order_by_id(
        [ex["id"] for ex in examples], prefix=f"{split}_",
        what=f"TFDS cifar10/{split}")
    images.append(np.stack([examples[i]["image"] for i in order]))
    labels.append(np.asarray([examples[i]["label"] for i in order]))
  return _dataset(np.concatenate(images), np.concatenate(labels),
                  mico_order=True)


def _order_by_id(ids: Sequence[Any], prefix: str, what: str) -> np.ndarray:
  """The permutation that sorts ids `f"{prefix}{index}"` by index.

  Args:
    ids: one id per record, str or bytes.
    prefix: what precedes the decimal index in every id.
    what: the source, for error messages.

  Returns:
    int64 `[len(ids)]`: position `j` holds the record whose index is `j`.

  Raises:
    DataError: an id has another form, or the indices are not exactly
      `0..len(ids)-1`.
  """
  index = np.empty(len(ids), np.int64)
  for position, raw in enumerate(ids):
    text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    digits = text[len(prefix):]
    if not (text.startswith(prefix) and digits.isdigit()):
      raise DataError(
          f"{what}: record {position} has id {text!r}, expected"
          f" '{prefix}<index>'")
    index[position] = int(digits)
  order = np.argsort(index, kind="stable")
  if (index[order] != np.arange(len(ids))).any():
    raise DataError(
        f"{what}: ids do not number the records 0..{len(ids) - 1} exactly once")
  return order


def _decode(data: bytes, where: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as image:
      array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
  except (OSError, ValueError) as e:
    raise DataError(f"{where}: cannot decode ({e})") from e
  if array.shape != _IMAGE_SHAPE:
    raise DataError(f"{where}: shape {array.shape}, expected {_IMAGE_SHAPE}")
  return array


def _dataset(images: np.ndarray, labels: np.ndarray, mico_order: bool
             ) -> Dataset:
  return Dataset("cifar10", normalize(images), labels.astype(np.int32), 10,
                 "image", hflip=True, mico_order=mico_order)
