"""MICO submissions: prediction files and the zip (`mico_jax/mico_io.py`).

No torch needed.
"""

import os
import zipfile

import numpy as np
import pytest

from mico_jax import mico_io


def _entries(values):
  return {mico_io.entry_name("t", "inf", "dev", 3): np.asarray(values)}


@pytest.mark.parametrize("values, message", [
    ([0.5, np.nan], "not all finite"),
    ([0.5, 1.5], r"outside \[0, 1\]"),
    ([0.5], "1 predictions, expected 2"),
])
def test_bad_predictions_write_nothing(tmp_path, values, message):
  zip_path = tmp_path / "submission.zip"
  with pytest.raises(mico_io.MicoIOError,
                     match="t/t_inf/dev/model_3/prediction.csv: " + message):
    mico_io.write_submission(str(zip_path), _entries(values), 2,
                             str(tmp_path / "predictions"))
  assert os.listdir(tmp_path) == []


def test_submission_round_trip_and_unsafe_entries(tmp_path):
  zip_path = tmp_path / "submission.zip"
  values = np.array([0.0, 1 / 3])
  mico_io.write_submission(str(zip_path), _entries(values), 2,
                           str(tmp_path / "predictions"))
  read = mico_io.read_submission(str(zip_path), 2)
  np.testing.assert_array_equal(read["t/t_inf/dev/model_3/prediction.csv"],
                                values)
  on_disk = tmp_path / "predictions/t/t_inf/dev/model_3/prediction.csv"
  assert on_disk.read_text() == "0.0,0.3333333333333333\n"
  evil = tmp_path / "evil.zip"
  with zipfile.ZipFile(evil, "w") as z:
    z.writestr("t/t_inf/dev/model_3/prediction.csv", "0.5,0.5")
    z.writestr("../t/t_inf/dev/model_4/prediction.csv", "0.5,0.5")
  with pytest.raises(mico_io.MicoIOError,
                     match=r"\.\./t/t_inf/dev/model_4/prediction.csv: unsafe"):
    mico_io.read_submission(str(evil), 2)
  with pytest.raises(mico_io.MicoIOError, match="unsafe"):
    mico_io.write_submission(str(tmp_path / "x.zip"),
                             {"/abs/prediction.csv": values}, 2,
                             str(tmp_path / "x"))
  assert not (tmp_path / "x.zip").exists() and not (tmp_path / "x").exists()
