"""Tests for the CIFAR-10 loaders: JPEG archive and TFDS (mocked, offline)."""

import io
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mico_jax import data
from mico_jax.data import DataError
from mico_jax.data import cifar10
import tfds_prepared

# ../shared/data from the repository root; absent on users' machines.
_REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = _REPO.parent / "shared" / "data"


def _jpeg(color, size=(32, 32), mode="RGB") -> bytes:
  out = io.BytesIO()
  Image.new(mode, size, color).save(out, format="JPEG", quality=100)
  return out.getvalue()


def _write_npz(path, blobs, labels, splits, **overrides):
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
  arrays = dict(
      jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
      label=np.asarray(labels, np.int64), split=np.asarray(splits, np.int8),
      classes=np.array(["a", "b", "c"]))
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return path


def test_normalize_matches_mico_transform():
  images = np.array([[[[0, 128, 255]]]], np.uint8)
  expected = (images / 255 - np.array(cifar10.CIFAR10_MEAN)) / np.array(
      cifar10.CIFAR10_STD)
  got = cifar10.normalize(images)
  assert got.dtype == np.float32 and got.shape == images.shape
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  with pytest.raises(DataError, match="uint8 RGB"):
    cifar10.normalize(images.astype(np.float32))


def test_npz_decodes_in_archive_order(tmp_path):
  colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255)]
  blobs = [_jpeg(c) for c in colors] + [_jpeg(200, mode="L")]  # Gray -> RGB.
  path = _write_npz(tmp_path / "c.npz", blobs, [0, 1, 2, 3, 9, 4],
                    [0, 0, 0, 0, 1, 1])
  ds = cifar10.load_cifar10_npz(path)
  assert ds.name == "cifar10" and ds.kind == "image" and ds.hflip
  assert ds.num_classes == 10 and ds.x.dtype == np.float32
  assert ds.x.shape == (6, 32, 32, 3) and ds.y.dtype == np.int32
  np.testing.assert_array_equal(ds.y, [0, 1, 2, 3, 9, 4])
  pixels = np.array(colors + [(200, 200, 200)], np.uint8)[:, None, None, :]
  expected = cifar10.normalize(np.broadcast_to(pixels, (6, 32, 32, 3)).copy())
  np.testing.assert_allclose(ds.x, expected, atol=3 / 255 / 0.24)
  # Sorted by class, not CIFAR-10's order: MICO's seeds must not apply.
  assert not ds.mico_order
  with pytest.raises(DataError, match="cifar10: this pool is not in MICO's"):
    data.require_mico_order(ds)


def test_npz_missing_file(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    cifar10.load_cifar10_npz(tmp_path / "absent.npz")


def test_npz_not_an_archive(tmp_path):
  path = tmp_path / "junk.npz"
  path.write_bytes(b"not a zip file")
  with pytest.raises(DataError, match="not a readable .npz archive"):
    cifar10.load_cifar10_npz(path)


def test_npz_missing_array(tmp_path):
  path = _write_npz(tmp_path / "c.npz", [_jpeg(0)], [0], [0], offsets=None)
  with pytest.raises(DataError, match=r"missing arrays \['offsets'\]"):
    cifar10.load_cifar10_npz(path)


@pytest.mark.parametrize("overrides,message", [
    ({"offsets": np.array([0, 5, 3])}, "offsets must rise from 0 to len"),
    ({"offsets": np.array([0])}, "2 labels but 1 offsets"),
    ({"split": np.array([1, 0], np.int8)}, "train images .* must precede"),
    ({"label": np.array([0, 10])}, r"labels must lie in \[0, 10\)"),
])
def test_npz_inconsistent_arrays(tmp_path, overrides, message):
  path = _write_npz(tmp_path / "c.npz", [_jpeg(0), _jpeg(9)], [0, 1], [0, 1],
                    **overrides)
  with pytest.raises(DataError, match=message):
    cifar10.load_cifar10_npz(path)


def test_npz_bad_image_named_by_index(tmp_path):
  blobs = [_jpeg(0), b"\xff\xd8 garbage", _jpeg(0)]
  path = _write_npz(tmp_path / "c.npz", blobs, [0, 1, 2], [0, 0, 1])
  with pytest.raises(DataError, match="image 1: cannot decode"):
    cifar10.load_cifar10_npz(path)
  blobs = [_jpeg(0), _jpeg(0, size=(16, 32))]
  path = _write_npz(tmp_path / "d.npz", blobs, [0, 1], [0, 1])
  with pytest.raises(DataError, match=r"image 1: shape \(32, 16, 3\)"):
    cifar10.load_cifar10_npz(path)


def _shuffled_source(split: str, n: int, seed: int, id_type=bytes):
  """Fake `tfds.data_source` records in shuffled storage order, like TFDS's."""
  order = np.random.default_rng(seed).permutation(n)
  offset = 0 if split == "train" else 100
  records = []
  for i in order:
    name = f"{split}_{i:05d}"
    records.append({
        "id": name.encode() if id_type is bytes else name,
        # Pixel value = original position in the pool, to check the order.
        "image": np.full((32, 32, 3), offset + i, np.uint8),
        "label": np.int64((offset + i) % 10),
    })
  return records


def _mock_cifar10(sizes, **kwargs):
  def as_data_source(builder, split, **unused_kwargs):
    assert builder.name == "cifar10"
    return _shuffled_source(split, sizes[split], seed=len(split), **kwargs)
  return tfds.testing.mock_data(as_data_source_fn=as_data_source)


@pytest.mark.parametrize("id_type", [bytes, str])
def test_tfds_restores_original_order(id_type):
  with _mock_cifar10({"train": 12, "test": 5}, id_type=id_type):
    ds = cifar10.load_cifar10_tfds(data_dir="/nonexistent")
  pool_index = np.r_[np.arange(12), 100 + np.arange(5)]
  expected = cifar10.normalize(
      np.broadcast_to(pool_index.astype(np.uint8)[:, None, None, None],
                      (17, 32, 32, 3)).copy())
  np.testing.assert_array_equal(ds.x, expected)
  np.testing.assert_array_equal(ds.y, pool_index % 10)
  assert ds.kind == "image" and ds.hflip and ds.num_classes == 10
  assert ds.mico_order
  data.require_mico_order(ds)
  # A subset is not MICO's pool any more.
  with pytest.raises(DataError, match="not in MICO's order"):
    data.require_mico_order(data.subset(ds, 10))


def _png(value: int) -> bytes:
  out = io.BytesIO()
  Image.new("RGB", (32, 32), (value,) * 3).save(out, format="PNG")
  return out.getvalue()


def test_tfds_real_data_source_on_prepared_files(tmp_path):
  # Written as TFDS would (shuffled), read by the real array_record path.
  splits = {}
  for split, n, offset in (("train", 6, 0), ("test", 4, 100)):
    order = np.random.default_rng(n).permutation(n)
    splits[split] = [
        {"id": f"{split}_{i:05d}".encode(), "image": _png(offset + i),
         "label": (offset + i) % 10} for i in order]
  tfds_prepared.write_prepared("cifar10", tmp_path, splits)
  ds = cifar10.load_cifar10_tfds(data_dir=tmp_path)
  pool_index = np.r_[np.arange(6), 100 + np.arange(4)]
  np.testing.assert_array_equal(ds.y, pool_index % 10)
  expected = cifar10.normalize(np.broadcast_to(
      pool_index.astype(np.uint8)[:, None, None, None], (10, 32, 32, 3)).copy())
  np.testing.assert_array_equal(ds.x, expected)


def test_tfds_random_mock_ids_are_rejected():
  # tfds' default mock fills the Text feature `id` with random letters.
  with tfds.testing.mock_data(num_examples=3):
    with pytest.raises(DataError, match=r"cifar10/train: record 0 has id"):
      cifar10.load_cifar10_tfds()


def test_tfds_duplicate_ids_are_rejected():
  def as_data_source(builder, split, **unused_kwargs):
    del builder
    records = _shuffled_source(split, 3, seed=0)
    records[1]["id"] = records[0]["id"]
    return records
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    with pytest.raises(DataError, match=r"exactly once"):
      cifar10.load_cifar10_tfds()


def test_tfds_unprepared_data_dir(tmp_path):
  with pytest.raises(DataError, match="cifar10/train is not readable"):
    cifar10.load_cifar10_tfds(data_dir=tmp_path, download=False)


def test_real_npz():
  path = SHARED_DATA / "cifar10" / "cifar10_jpeg.npz"
  if not path.exists():
    pytest.skip(f"{path} not available")
  ds = cifar10.load_cifar10_npz(path)
  assert ds.x.shape == (60_000, 32, 32, 3) and len(ds) == 60_000
  np.testing.assert_array_equal(np.bincount(ds.y[:50_000]), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.y[50_000:]), [1000] * 10)
  # Normalized with the training set's own statistics: mean ~0, std ~1.
  train = ds.x[:50_000:10].reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(train.mean(0), 0, atol=0.01)
  np.testing.assert_allclose(train.std(0), 1, atol=0.02)
