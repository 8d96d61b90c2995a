"""Tests for the Shokri et al. tabular reader (Purchase-100, Location, ...)."""

import pathlib

import numpy as np
import pytest

from mico_jax.data import DataError
from mico_jax.data import tabular

# ../shared/data from the repository root; absent on users' machines.
_REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = _REPO.parent / "shared" / "data"


def _write(tmp_path, text: str, name: str = "records") -> pathlib.Path:
  path = tmp_path / name
  path.write_text(text)
  return path


def test_parses_quoted_and_plain_labels(tmp_path):
  path = _write(tmp_path, '"2",0,1,1\n1,1,0,0\n"3",0,0,1\n')
  ds = tabular.load_tabular(path, "toy")
  assert ds.name == "toy" and ds.kind == "tabular" and not ds.hflip
  assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
  np.testing.assert_array_equal(ds.x, [[0, 1, 1], [1, 0, 0], [0, 0, 1]])
  np.testing.assert_array_equal(ds.y, [1, 0, 2])
  assert ds.num_classes == 3  # Inferred: the largest label.
  assert ds.mico_order  # the file's order, as MICO reads Purchase-100


def test_num_classes_given_and_non_integer_features(tmp_path):
  path = _write(tmp_path, "1,0.5,-2\r\n4,1e1,3\r\n\n")  # CRLF, trailing blank.
  ds = tabular.load_tabular(path, "toy", num_features=2, num_classes=10)
  assert ds.num_classes == 10
  np.testing.assert_allclose(ds.x, [[0.5, -2], [10, 3]])
  np.testing.assert_array_equal(ds.y, [0, 3])


def test_single_record(tmp_path):
  ds = tabular.load_tabular(_write(tmp_path, "1,1,0\n"), "toy")
  assert ds.x.shape == (1, 2) and ds.y.tolist() == [0]


def test_convenience_loaders_check_shape(tmp_path):
  row = "5," + ",".join(["0"] * 446) + "\n"
  ds = tabular.load_location(_write(tmp_path, row * 3))
  assert ds.name == "location" and ds.x.shape == (3, 446)
  assert ds.num_classes == 30
  with pytest.raises(DataError, match=r"line 1: 447 columns, expected 601"):
    tabular.load_purchase100(_write(tmp_path, row, "p"))
  with pytest.raises(DataError, match=r"expected 6170"):
    tabular.load_texas100(_write(tmp_path, row, "t"))


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    tabular.load_tabular(tmp_path / "absent", "toy")


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path, text):
  path = _write(tmp_path, text)
  with pytest.raises(DataError, match=f"{path}: empty file"):
    tabular.load_tabular(path, "toy")


# (file contents, kwargs, expected message).
_BAD = [
    ("1,0,1\n2,0\n", {}, r"line 2: 2 columns, expected 3 \(the first record\)"),
    ("1,0,1\n2,0,1,1\n", {}, r"line 2: 4 columns, expected 3"),
    ("1,0,1\n\n2,0\n", {}, r"line 3: 2 columns"),  # Blank lines count.
    ("1,0,1\n", {"num_features": 3}, r"line 1: 3 columns, expected 4"
     r" \(num_features \+ 1\)"),
    ("1\n", {}, r"line 1: a record needs a label and at least one feature"),
    ("1,0,1\n2,0,x\n", {}, r"line 2, column 3: feature 'x' is not a finite"),
    ("1,0,1\n2,,1\n", {}, r"line 2, column 2: feature '' is not a finite"),
    ("1,0,nan\n", {}, r"line 1, column 3: feature 'nan' is not a finite"),
    ("1,0,1\n2,0,1\n1,1.5,inf\n", {}, r"line 3, column 3: feature 'inf'"),
    ("a,0,1\n", {}, r"line 1: label 'a' is not an integer"),
    ('1,0,1\n"2.5",0,1\n', {}, r"line 2: label '2.5' is not an integer"),
    ("1,0,1\n0,0,1\n", {}, r"line 2: label 0 out of range \(labels are"
     r" 1-based, \[1, "),
    ("1,0,1\n-3,0,1\n", {}, r"line 2: label -3 out of range"),
    ("1,0,1\n11,0,1\n", {"num_classes": 10}, r"line 2: label 11 out of range"
     r" \(labels are 1-based, \[1, 10\]\)"),
    ("1,0.5,1\n11,0,1\n", {"num_classes": 10}, r"line 2: label 11 out of"),
    ("1,0,1\n1,0,99999999999999\n0,0,1\n", {}, r"line 3: label 0 out of"),
]


@pytest.mark.parametrize("text,kwargs,message", _BAD)
def test_errors_name_file_and_line(tmp_path, text, kwargs, message):
  path = _write(tmp_path, text)
  with pytest.raises(DataError, match=message) as info:
    tabular.load_tabular(path, "toy", **kwargs)
  assert str(info.value).startswith(str(path))


def test_bulk_path_matches_scan_on_large_file(tmp_path):
  rng = np.random.default_rng(0)
  x = (rng.random((2000, 50)) < 0.3).astype(np.int64)
  y = rng.integers(1, 101, size=2000)
  lines = [f'"{label}",' + ",".join(map(str, row)) for label, row in zip(y, x)]
  path = _write(tmp_path, "\n".join(lines) + "\n")
  ds = tabular.load_tabular(path, "toy", num_features=50, num_classes=100)
  np.testing.assert_array_equal(ds.x, x)
  np.testing.assert_array_equal(ds.y, y - 1)
  lines[1234] = lines[1234].replace(",1", ",?", 1)
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"line 1235, column \d+: feature '\?'"):
    tabular.load_tabular(path, "toy", num_features=50, num_classes=100)


def test_real_location():
  path = SHARED_DATA / "location" / "bangkok"
  if not path.exists():
    pytest.skip(f"{path} not available")
  ds = tabular.load_location(path)
  assert ds.x.shape == (5010, 446) and ds.y.shape == (5010,)
  assert ds.num_classes == 30
  assert set(np.unique(ds.y).tolist()) == set(range(30))
  assert set(np.unique(ds.x).tolist()) == {0.0, 1.0}


def test_non_utf8_byte_is_reported(tmp_path):
  path = tmp_path / "records"
  path.write_bytes(b"1,0,1\n2,0,\xff\n")
  with pytest.raises(DataError, match=r"line 2, column 3: feature"):
    tabular.load_tabular(path, "toy")
