r"""mico_jax against the trainers a user would run instead, in one run.

  python -m benchmarks.vs_reference --out=/tmp/vs_reference.json

The reference is MICO's PyTorch trainer re-created from its scripts (the same
models, optimizers and batches; non-DP batches in list order, as its
`DataLoader` without shuffling), with Opacus for DP-SGD in its per-example
hooks mode (MICO's) and in ghost clipping mode (`grad_sample_mode="ghost"`,
the strongest PyTorch peer). Each workload (model x DP or not) runs on
identical shapes, batch and step count in both engines, timed interleaved
(fastest of `--repeats`) so other load on the machine hits both alike. mico_jax
trains K models together; the reference trains one model at a time, so its
cost per model is its cost for one. Prints seconds per step per model, the
ratio reference / mico_jax (> 1: mico_jax faster), the JAX f32 matmul peak
of the same run and, for the MLP, the share of it reached; `--out` writes
the same as JSON.

Needs the `bench` extra (torch, opacus). `--smoke` runs tiny sizes, to check
the script runs.
"""

import argparse
import json
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mico_jax import bitpack, dp, models, parallel, pipeline, train

# MICO's recipes. MLP: Purchase-100, n = 150,000, Adam 1e-3, batch 512, C = 2.6.
# CNN: CIFAR-10, n = 50,000, SGD; batch 32 (lr 0.005) without DP, 512 (lr 0.5)
# with DP. The CNN's DP batch defaults smaller here (--cnn_dp_batch): a
# 512-example DP step of MICO's CNN takes ~10 s per model on 2 cores.
EPSILON, DELTA, CLIP = 10.0, 1e-5, 2.6


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workloads", default="mlp,mlp_dp,cnn,cnn_dp",
                      help="comma-separated: mlp, mlp_dp, cnn, cnn_dp")
  parser.add_argument("--models", default="1,8", help="values of K")
  parser.add_argument("--steps", type=int, default=2,
                      help="steps per run of the CNN workloads")
  parser.add_argument("--mlp_steps", type=int, default=32,
                      help="steps per run of the MLP workloads: a real run"
                      " takes an epoch (293 steps) per compiled call, and a"
                      " call's fixed cost weighs on a few ~4 ms steps")
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed runs of each; the fastest counts")
  parser.add_argument("--mlp_n", type=int, default=150_000)
  parser.add_argument("--cnn_n", type=int, default=2_048,
                      help="training points per CNN (the pool held in memory)")
  parser.add_argument("--cnn_batch", type=int, default=32)
  parser.add_argument("--cnn_dp_batch", type=int, default=64)
  parser.add_argument("--cnn_channels", default="128,256,256")
  parser.add_argument("--threads", type=int, default=2,
                      help="torch threads (match the cores JAX uses)")
  parser.add_argument("--cpu_devices", type=int, default=None,
                      help="CPU devices for mico_jax (default: one a core, as"
                      " experiments.run); K models are sharded over the most"
                      " of them that divide K, as the main job shards them")
  parser.add_argument("--no_reference", action="store_true",
                      help="mico_jax only (no torch needed)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes: checks that everything runs")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args()
  if args.smoke:
    args.mlp_n, args.cnn_n, args.cnn_channels = 2_048, 256, "8,16,16"
    args.steps, args.mlp_steps, args.repeats = 1, 1, 1
  return args


def matmul_runner(size: int = 2048) -> tuple[Callable[[], None], float]:
  """A compiled, warmed-up float32 matmul and its FLOPs: timed, the
  machine's practical peak."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size))
  matmul = jax.jit(lambda a: a @ a)
  run = lambda: jax.block_until_ready(matmul(a))
  run()
  return run, 2 * size ** 3


def matmul_peak(repeats: int = 5, size: int = 2048) -> float:
  """FLOP/s of a jitted float32 matmul: the machine's practical peak."""
  run, flops = matmul_runner(size)
  return flops / min(_time(run) for _ in range(repeats))


class Workload:
  """One model and recipe: shapes, data and both engines' step runners."""

  def __init__(self, name: str, args):
    self.name, self.dp = name, name.endswith("_dp")
    rng = np.random.default_rng(0)
    self.steps = args.mlp_steps if name.startswith("mlp") else args.steps
    if name.startswith("mlp"):
      self.n, d, self.classes = args.mlp_n, 600, 100
      self.x_N = (rng.random((self.n, d)) < 0.1).astype(np.float32)
      self.model = models.MLP(100, (128,))
      self.config = train.TrainConfig("adam", 1e-3, batch_size=512, epochs=30)
      # forward 2·(600·128 + 128·100), backward twice that less the input
      # gradient of the first layer.
      self.flops = 2 * (600 * 128 + 128 * 100) * 2 + 2 * 128 * 100
    else:
      self.channels = tuple(int(c) for c in args.cnn_channels.split(","))
      self.n, self.classes = args.cnn_n, 10
      self.x_N = rng.normal(size=(self.n, 32, 32, 3)).astype(np.float32)
      self.model = models.CNN(10, self.channels)
      batch = args.cnn_dp_batch if self.dp else args.cnn_batch
      self.config = train.TrainConfig("sgd", 0.5 if self.dp else 0.005,
                                      batch_size=batch, epochs=50)
      c1, c2, c3 = self.channels
      forward = 2 * (256 * 192 * c1 + 144 * 9 * c1 * c2 + 100 * 9 * c2 * c3
                     + 25 * c3 * 10)
      self.flops = 3 * forward - 2 * 256 * 192 * c1  # no input gradient
    self.y_N = rng.integers(0, self.classes, self.n).astype(np.int32)
    if self.dp:
      self.config = train.TrainConfig(
          **{**self.config.__dict__, "dp": dp.DPConfig(EPSILON, DELTA, CLIP)})
      self.mechanism = dp.calibrate(self.config.dp, self.n,
                                    self.config.batch_size, self.config.epochs)

  @property
  def batch(self) -> float:
    """Examples per step: the (expected) batch."""
    return self.config.batch_size

  def jax_runner(self, num_models: int, steps: int) -> Callable[[], None]:
    """A compiled, warmed-up `steps`-step run of K models."""
    # CNN trainers unrolled, as the CNN tasks are (on CPU each model stepped
    # from Python, no loop in the program): XLA:CPU runs convolution
    # gradients ~4-40x slower inside a loop (see RESULTS.md).
    trainer = pipeline.make_trainer(self.model, self.config, self.n,
                                    unroll=self.name.startswith("cnn"))
    return sharded_runner(trainer, num_models, self.n, self.x_N, self.y_N,
                          steps)

  def torch_runner(self, mode: str, steps: int) -> Callable[[], None]:
    """MICO's trainer for one model: `mode` is plain, hooks or ghost."""
    import torch  # pylint: disable=g-import-not-at-top
    from torch import nn as tnn  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    if self.name.startswith("mlp"):
      net = tnn.Sequential(tnn.Linear(600, 128), tnn.Tanh(),
                           tnn.Linear(128, 100))
      x = torch.from_numpy(self.x_N)
    else:
      c1, c2, c3 = self.channels
      net = tnn.Sequential(
          tnn.Conv2d(3, c1, 8, 2, 3), tnn.Tanh(), tnn.MaxPool2d(3, 1),
          tnn.Conv2d(c1, c2, 3), tnn.Tanh(), tnn.Conv2d(c2, c3, 3), tnn.Tanh(),
          tnn.AvgPool2d(2, 2), tnn.Flatten(), tnn.Linear(c3 * 25, 10))
      x = torch.from_numpy(self.x_N.transpose(0, 3, 1, 2).copy())
    data = torch.utils.data.TensorDataset(x, torch.from_numpy(
        self.y_N.astype(np.int64)))
    loader = torch.utils.data.DataLoader(data, self.config.batch_size)
    lr = self.config.learning_rate
    optimizer = (torch.optim.Adam(net.parameters(), lr)
                 if self.config.optimizer == "adam"
                 else torch.optim.SGD(net.parameters(), lr))
    criterion = tnn.CrossEntropyLoss()
    if mode != "plain":
      import opacus  # pylint: disable=g-import-not-at-top
      made = opacus.PrivacyEngine().make_private(
          module=net, optimizer=optimizer, data_loader=loader,
          criterion=criterion,
          noise_multiplier=self.mechanism.noise_multiplier,
          max_grad_norm=CLIP, poisson_sampling=True, grad_sample_mode=mode)
      if mode == "ghost":
        net, optimizer, criterion, loader = made
      else:
        net, optimizer, loader = made
    batches = []
    for xb, yb in loader:  # drawn up front: loading is not what we time
      batches.append((xb, yb))
      if len(batches) == steps:
        break

    def run():
      for xb, yb in batches:
        optimizer.zero_grad()
        loss = criterion(net(xb), yb)
        loss.backward()
        optimizer.step()

    run()
    return run


def sharded_runner(trainer: train.Trainer, num_models: int, n: int,
                   x_N: np.ndarray, y_N: np.ndarray, steps: int
                   ) -> Callable[[], None]:
  """A compiled, warmed-up `steps`-step run of K models on the n points,
  held and sharded as `pipeline.train_models` holds them: binary features
  as bits, the models over `parallel.make_mesh(K)`."""
  mesh = parallel.make_mesh(num_models)
  train_KxT = parallel.put_models(
      np.tile(np.arange(n, dtype=np.int32), (num_models, 1)), mesh)
  x_N, y_N = parallel.put_replicated((bitpack.pack(x_N), y_N), mesh)
  key_K = parallel.put_models(np.asarray(train.model_keys(
      np.arange(num_models * 3).reshape(-1, 3))), mesh)
  state = pipeline.init_state(trainer, key_K, jnp.asarray(x_N[0]), mesh)
  # Timed from after the warm-up: not at step 0, where a shuffled epoch
  # starts with a permutation of the n points (MICO's loader has none).
  state, _ = jax.block_until_ready(
      trainer.run(state, train_KxT, x_N, y_N, steps))
  return lambda: jax.block_until_ready(
      trainer.run(state, train_KxT, x_N, y_N, steps))


def _time(run: Callable[[], None]) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def main():
  args = _parse()
  parallel.initialize(cpu_devices=args.cpu_devices)
  if not args.no_reference:
    try:
      import opacus  # pylint: disable=g-import-not-at-top,unused-import
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise SystemExit("vs_reference: torch and opacus are needed (pip install"
                       " -e .[bench]), or pass --no_reference") from None
    torch.set_num_threads(args.threads)
  model_counts = [int(k) for k in args.models.split(",")]
  workloads = [Workload(w, args) for w in args.workloads.split(",")]

  runs = {}  # (workload, engine) -> runner; engine "jax K" or a torch mode
  for w in workloads:
    for k in model_counts:
      runs[w.name, f"jax K={k}"] = (w, k, w.jax_runner(k, w.steps))
    if not args.no_reference:
      for mode in (("hooks", "ghost") if w.dp else ("plain",)):
        runs[w.name, f"torch {mode}"] = (w, 1, w.torch_runner(mode, w.steps))
  # The peak is timed among the runs, so that load on the machine hits it
  # as it hits them: "of peak" then compares like with like.
  matmul, matmul_flops = matmul_runner()
  best = dict.fromkeys(runs, float("inf"))
  best_matmul = float("inf")
  for _ in range(args.repeats):
    for key, (_, _, run) in runs.items():
      best[key] = min(best[key], _time(run))
      best_matmul = min(best_matmul, _time(matmul))
  peak = matmul_flops / best_matmul

  rows = []
  for (name, engine), (w, k, _) in runs.items():
    per_model_step = best[name, engine] / w.steps / k
    rows.append({
        "workload": name, "engine": engine, "models": k,
        "seconds_per_step_per_model": per_model_step,
        "examples_per_second_per_model": w.batch / per_model_step,
        "gflops_per_second": w.flops * w.batch / per_model_step / 1e9,
        "batch": w.batch})
  by_key = {(r["workload"], r["engine"]): r for r in rows}
  for r in rows:
    ref = [e for e in ("torch plain", "torch hooks", "torch ghost")
           if (r["workload"], e) in by_key]
    for e in ref:
      r[f"speedup_vs_{e.split()[1]}"] = (
          by_key[r["workload"], e]["seconds_per_step_per_model"] /
          r["seconds_per_step_per_model"])
    r["share_of_matmul_peak"] = r["gflops_per_second"] * 1e9 / peak
    one = by_key.get((r["workload"], "jax K=1"))
    if one and r["engine"].startswith("jax"):
      r["per_model_cost_vs_K1"] = (r["seconds_per_step_per_model"] /
                                   one["seconds_per_step_per_model"])

  print(f"JAX f32 matmul peak (same run): {peak / 1e9:.1f} GFLOP/s;"
        f" {len(jax.devices())} {jax.default_backend()} devices,"
        f" jax {jax.__version__}"
        + ("" if args.no_reference else
           f", torch {torch.__version__} ({args.threads} threads),"
           f" opacus {opacus.__version__}"))
  print(f"steps per run: MLP {args.mlp_steps}, CNN {args.steps}; fastest of"
        f" {args.repeats}; speed-up ="
        " reference s/step / mico_jax s/step per model (> 1: mico_jax"
        " faster)\n")
  header = (f"{'workload':<9}{'engine':<14}{'batch':>6}{'ms/step/model':>15}"
            f"{'ex/s/model':>12}{'of peak':>9}{'vs K=1':>8}{'vs plain':>9}"
            f"{'vs hooks':>9}{'vs ghost':>9}")
  print(header)
  fmt = lambda r, k, f: f.format(r[k]) if k in r else "-"
  for r in rows:
    print(f"{r['workload']:<9}{r['engine']:<14}{r['batch']:>6}"
          f"{r['seconds_per_step_per_model'] * 1e3:>15.1f}"
          f"{r['examples_per_second_per_model']:>12.1f}"
          f"{r['share_of_matmul_peak']:>9.1%}"
          f"{fmt(r, 'per_model_cost_vs_K1', '{:.2f}'):>8}"
          f"{fmt(r, 'speedup_vs_plain', '{:.2f}x'):>9}"
          f"{fmt(r, 'speedup_vs_hooks', '{:.2f}x'):>9}"
          f"{fmt(r, 'speedup_vs_ghost', '{:.2f}x'):>9}")
  dp_rows = {r["engine"]: r for r in rows if r["workload"] == "mlp_dp"}
  for k in model_counts:
    plain = by_key.get(("mlp", f"jax K={k}"))
    if plain and f"jax K={k}" in dp_rows:
      print(f"MLP DP / non-DP step cost, K = {k}:"
            f" {dp_rows[f'jax K={k}']['seconds_per_step_per_model'] / plain['seconds_per_step_per_model']:.2f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"matmul_peak_flops": peak, "args": vars(args),
                 "jax": jax.__version__, "machine": platform.platform(),
                 "devices": str(jax.devices()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
