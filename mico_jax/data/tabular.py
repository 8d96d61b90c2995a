"""Tabular pools in the text format of Shokri et al. (2017).

Purchase-100 (`dataset_purchase`), Location (`bangkok`) and Texas-100 ship as
one record a line, `label,feature_1,...,feature_d`: comma separated, labels
1-based and possibly quoted (`"13"`), features numeric (binary in all three).

Parsing is bulk, by numpy's C reader (`np.loadtxt`, which since numpy 1.23 no
longer goes through Python per value): first as int16, which reads Purchase-100
(197,324 x 601 values, ~240 MB) in about 1 s, then, if a value is not a small
integer, as float32. Only when bulk parsing or validation fails is the file
scanned line by line, to name the first bad line in a `DataError`.

Blank lines are skipped (as `np.loadtxt` does); line numbers in errors count
them, so they match an editor's.
"""

import math
import os
import warnings

import numpy as np

from mico_jax.data import Dataset, DataError

_QUOTE_AND_SPACE = b' \t\r\n"'  # What np.loadtxt(quotechar='"') strips.
_MAX_LABEL = int(np.iinfo(np.int32).max)


def load_tabular(
    path: str | os.PathLike[str],
    name: str,
    num_features: int | None = None,
    num_classes: int | None = None,
) -> Dataset:
  """Reads a `label,f1,...,fd` file into a tabular `Dataset`.

  Args:
    path: the text file.
    name: the `Dataset`'s name.
    num_features: expected number of features `d`; if None, the first record
      decides and every other record must agree.
    num_classes: number of classes; labels must lie in `[1, num_classes]`. If
      None, the largest label.

  Returns:
    A `Dataset` of kind "tabular": `x` float32 `[N, d]`, `y` int32 `[N]`
    (0-based: the file's label minus one).

  Raises:
    DataError: the file is missing or empty, or a line has the wrong number of
      columns, a feature that is not a finite number, or a label that is not an
      integer in range; the message names the file and the line.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  table = _parse_bulk(path)
  if table is None or not _valid(table, num_features, num_classes):
    _scan_for_error(path, num_features, num_classes)  # Raises.
    raise DataError(f"{path}: could not parse the file")  # Defensive.
  x = table[:, 1:].astype(np.float32, copy=False)
  y = table[:, 0].astype(np.int32) - 1
  if num_classes is None:
    num_classes = int(y.max()) + 1
  # MICO's Purchase-100 pool is its file's records in order, as here.
  return Dataset(name, x, y, num_classes, "tabular", mico_order=True)


def load_purchase100(path: str | os.PathLike[str]) -> Dataset:
  """Purchase-100 (`dataset_purchase`): 197,324 x 600 features, 100 classes."""
  return load_tabular(path, "purchase100", num_features=600, num_classes=100)


def load_location(path: str | os.PathLike[str]) -> Dataset:
  """Location (`bangkok`): 5,010 records, 446 features, 30 classes."""
  return load_tabular(path, "location", num_features=446, num_classes=30)


def load_texas100(path: str | os.PathLike[str]) -> Dataset:
  """Texas-100: 67,330 records, 6,169 features, 100 classes."""
  return load_tabular(path, "texas100", num_features=6169, num_classes=100)


def _parse_bulk(path: str) -> np.ndarray | None:
  """The whole file as a `[N, 1 + d]` array, or None if numpy cannot read it."""
  for dtype in (np.int16, np.float32):
    try:
      with warnings.catch_warnings():
        # "input contained no data": an empty file, reported by the scan.
        warnings.simplefilter("ignore", UserWarning)
        return np.loadtxt(
            path, dtype=dtype, delimiter=",", quotechar='"', comments=None,
            ndmin=2, encoding="utf-8")
    except (ValueError, OverflowError, UnicodeDecodeError):
      continue
  return None


def _valid(
    table: np.ndarray, num_features: int | None, num_classes: int | None
) -> bool:
  """Whether a bulk-parsed table passes every check `_scan_for_error` makes."""
  if table.shape[0] == 0 or table.shape[1] < 2:
    return False
  if num_features is not None and table.shape[1] != num_features + 1:
    return False
  labels = table[:, 0]
  if np.issubdtype(table.dtype, np.floating):
    if not np.isfinite(table).all() or (labels != np.round(labels)).any():
      return False
  top = _MAX_LABEL if num_classes is None else num_classes
  if labels.min() < 1 or labels.max() > top:
    return False
  return True


def _scan_for_error(
    path: str, num_features: int | None, num_classes: int | None
) -> None:
  """Reads `path` line by line; raises a `DataError` at the first bad line."""
  expected = None if num_features is None else num_features + 1
  seen_record = False
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}, line {line_no}"
      fields = [field.strip(_QUOTE_AND_SPACE) for field in line.split(b",")]
      if expected is None:
        if len(fields) < 2:
          raise DataError(
              f"{where}: a record needs a label and at least one feature, got"
              f" {len(fields)} column(s)")
        expected = len(fields)
      if len(fields) != expected:
        detail = ("num_features + 1" if num_features is not None
                  else "the first record")
        raise DataError(
            f"{where}: {len(fields)} columns, expected {expected} ({detail})")
      label = _number(fields[0])
      if label is None or not label.is_integer():
        raise DataError(f"{where}: label {_show(fields[0])} is not an integer")
      top = _MAX_LABEL if num_classes is None else num_classes
      if label < 1 or label > top:
        limit = f"[1, {top}]"
        raise DataError(
            f"{where}: label {int(label)} out of range (labels are 1-based,"
            f" {limit})")
      for column, field in enumerate(fields[1:], start=2):
        value = _number(field)
        if value is None or not math.isfinite(value):
          raise DataError(
              f"{where}, column {column}: feature {_show(field)} is not a"
              " finite number")
      seen_record = True
  if not seen_record:
    raise DataError(f"{path}: empty file (no records)")


def _number(field: bytes) -> float | None:
  try:
    return float(field)
  except ValueError:
    return None


def _show(field: bytes) -> str:
  text = field.decode("utf-8", errors="replace")
  return repr(text if len(text) <= 20 else text[:20] + "...")
