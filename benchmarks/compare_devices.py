r"""The main job on 1 and on N fake CPU devices: how far apart are the results?

  python -m benchmarks.compare_devices --devices=8 -- --num_models=128

Runs `experiments.run` (flags after `--`) in two fresh workdirs and prints the
largest difference of any MICO metric and of any parameter (relative to the
parameter's largest magnitude), and each run's wall time.
"""

import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices of run 2.",
                                lower_bound=2)


def _run(workdir: str, devices: int, args: list[str]) -> float:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count="
             f"{devices}")
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "experiments.run",
                  f"--workdir={workdir}", *args], env=env, check=True,
                 stdout=subprocess.DEVNULL)
  return time.perf_counter() - start


def _params(workdir: str) -> list[np.ndarray]:
  leaves = []
  for path in sorted(glob.glob(os.path.join(workdir, "*", "trained",
                                            "*.npz"))):
    with np.load(path) as f:
      leaves += [f[k] for k in sorted(f.files) if k.startswith("param_")]
  return leaves


def main(argv):
  args = argv[1:]
  with tempfile.TemporaryDirectory() as root:
    one, many = os.path.join(root, "one"), os.path.join(root, "many")
    seconds = (_run(one, 1, args), _run(many, _DEVICES.value, args))
    scores = [json.load(open(os.path.join(w, "scores.json")))
              for w in (one, many)]
    metric_diff = max(
        abs(scores[0][s][a][m] - scores[1][s][a][m])
        for s in scores[0] for a in scores[0][s] for m in scores[0][s][a])
    param_diff = max(float(np.abs(a - b).max() / np.abs(a).max())
                     for a, b in zip(_params(one), _params(many)))
  print(f"1 device {seconds[0]:.1f}s, {_DEVICES.value} devices"
        f" {seconds[1]:.1f}s; largest metric difference {metric_diff:.2e},"
        f" largest relative parameter difference {param_diff:.2e}")


if __name__ == "__main__":
  app.run(main)
