"""MICO release import and submission export (`mico_jax/mico_io.py`)."""

import sys

import jax
import numpy as np
import pytest

from mico_jax import mico_io, models

torch = pytest.importorskip("torch")
nn = torch.nn


def _abstract(model, x):
  return jax.eval_shape(model.init, jax.random.key(0), x[:1])


class _TorchCNN(nn.Module):
  """MICO's CIFAR-10 CNN (mico.py) with narrower channels for speed."""

  def __init__(self, c1, c2, c3):
    super().__init__()
    self.cnn = nn.Sequential(
        nn.Conv2d(3, c1, kernel_size=8, stride=2, padding=3), nn.Tanh(),
        nn.MaxPool2d(kernel_size=3, stride=1),
        nn.Conv2d(c1, c2, kernel_size=3), nn.Tanh(),
        nn.Conv2d(c2, c3, kernel_size=3), nn.Tanh(),
        nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(),
        nn.Linear(in_features=c3 * 25, out_features=10))

  def forward(self, x):
    return self.cnn(x)


class _TorchMLP(nn.Module):
  """MICO's Purchase-100 MLP (mico.py), any widths."""

  def __init__(self, d, hidden, classes):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(),
                             nn.Linear(hidden, classes))

  def forward(self, x):
    return self.mlp(x)


def _save(state, path, prefix=""):
  torch.save({prefix + k: v for k, v in state.items()}, path)
  return path


@pytest.mark.parametrize("prefix", ["", "_module."])
def test_cnn_logits_match_pytorch(tmp_path, prefix):
  torch.manual_seed(0)
  net = _TorchCNN(8, 16, 16).eval()
  x_nchw = torch.randn(4, 3, 32, 32)
  path = _save(net.state_dict(), tmp_path / "model.pt", prefix)
  model = models.CNN(10, (8, 16, 16))
  x_nhwc = x_nchw.permute(0, 2, 3, 1).numpy()
  params = mico_io.to_flax(mico_io.read_state_dict(str(path)), model,
                           _abstract(model, x_nhwc), str(path))
  ours = np.asarray(model.apply(params, x_nhwc))
  with torch.no_grad():
    theirs = net(x_nchw).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix", ["", "_module."])
def test_mlp_logits_match_pytorch(tmp_path, prefix):
  torch.manual_seed(1)
  net = _TorchMLP(600, 128, 100).eval()
  x = torch.randint(0, 2, (16, 600)).float()
  path = _save(net.state_dict(), tmp_path / "model.pt", prefix)
  model = models.MLP(100, (128,))
  params = mico_io.to_flax(mico_io.read_state_dict(str(path)), model,
                           _abstract(model, x.numpy()), str(path))
  ours = np.asarray(model.apply(params, x.numpy()))
  with torch.no_grad():
    theirs = net(x).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


# --- bad weights: one clear error naming the file ---------------------------

def _mlp_state():
  torch.manual_seed(2)
  return _TorchMLP(8, 4, 3).state_dict()


def _read_mlp(path):
  model = models.MLP(3, (4,))
  return mico_io.to_flax(mico_io.read_state_dict(str(path)), model,
                         _abstract(model, np.zeros((1, 8), np.float32)),
                         str(path))


def test_truncated_model_is_refused(tmp_path):
  path = _save(_mlp_state(), tmp_path / "model.pt")
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(mico_io.MicoIOError, match="model.pt: not a readable"):
    _read_mlp(path)


class _Payload:
  """Unpickling this would run `open(marker, "w")`: a file would appear."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_never_run(tmp_path):
  marker = tmp_path / "executed"
  path = tmp_path / "model.pt"
  torch.save({"mlp.0.weight": _Payload(str(marker))}, path)
  assert not marker.exists()
  with pytest.raises(mico_io.MicoIOError, match="model.pt: refused"):
    _read_mlp(path)
  assert not marker.exists(), "the pickle's payload ran"


def test_non_tensor_values_are_refused(tmp_path):
  path = tmp_path / "model.pt"
  torch.save({"mlp.0.weight": [1.0, 2.0]}, path)
  with pytest.raises(mico_io.MicoIOError, match="model.pt: not a state_dict"):
    _read_mlp(path)


def test_wrong_shape_and_missing_key_are_named(tmp_path):
  state = _mlp_state()
  bad = dict(state, **{"mlp.0.weight": torch.zeros(4, 9)})
  with pytest.raises(mico_io.MicoIOError,
                     match=r"model.pt: mlp.0.weight has shape \(4, 9\)"):
    _read_mlp(_save(bad, tmp_path / "model.pt"))
  del state["mlp.2.bias"]
  with pytest.raises(mico_io.MicoIOError,
                     match="model.pt: missing key mlp.2.bias"):
    _read_mlp(_save(state, tmp_path / "model.pt"))


def test_roberta_folder_for_an_mlp_task_is_named(tmp_path):
  # SST-2 folders are read for the sst2 task (tests/test_mico_io_sst2.py).
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(mico_io.MicoIOError,
                     match="a RoBERTa folder, but the task's model is MLP"):
    mico_io.read_weights(str(tmp_path), models.MLP(3), None)


def test_missing_torch_is_one_clear_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(mico_io.MicoIOError,
                     match="model.pt: reading PyTorch weights needs torch"):
    mico_io.read_state_dict(str(tmp_path / "model.pt"))
