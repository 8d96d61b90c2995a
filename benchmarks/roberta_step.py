r"""Fine-tuning K RoBERTa models at once: examples/s per model, DP and non-DP.

  python -m benchmarks.roberta_step                       # roberta-base shapes
  python -m benchmarks.roberta_step --models=2 --batch_size=8 --steps=2

Times jitted training steps (after a warm-up run that compiles) of K
`RobertaClassifier`s with roberta-base's shapes (12 layers, width 768, 12
heads, vocabulary 50,265) on random token ids of MICO's length 67, Adam:
a plain step (mean gradient) and a DP-SGD step (ghost-norm clipping of every
parameter, Gaussian noise), both on full batches of `--batch_size` per model,
interleaved so that other load hits both alike. Prints examples/s per model
and for all K, and the DP / non-DP cost ratio. The compute dtype defaults to
bfloat16 on accelerators and float32 on CPU (parameters, clipping and
optimizer state are float32 either way).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mico_jax import dp, roberta, train


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", type=int, default=8, help="K")
  parser.add_argument("--batch_size", type=int, default=32,
                      help="examples per model per step")
  parser.add_argument("--length", type=int, default=67, help="tokens")
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--hidden", type=int, default=768)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--intermediate", type=int, default=3072)
  parser.add_argument("--vocab", type=int, default=50265)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      default=None, help="compute dtype (default: bfloat16"
                      " on accelerators, float32 on CPU)")
  parser.add_argument("--steps", type=int, default=4,
                      help="steps per timed run")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed runs of each kind; the fastest counts")
  return parser.parse_args()


def main():
  args = _parse()
  dtype = args.dtype or ("float32" if jax.default_backend() == "cpu"
                         else "bfloat16")
  config = roberta.RobertaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      intermediate_size=args.intermediate,
      max_position_embeddings=args.length + 2)
  model = roberta.RobertaClassifier(config, dtype=jnp.dtype(dtype))
  k, b = args.models, args.batch_size
  n = 4 * b  # each model's training list; steps cycle through it
  rng = np.random.default_rng(0)
  x_N = rng.integers(3, args.vocab, (n, args.length)).astype(np.int32)
  x_N[:, 0], x_N[:, -1] = 0, 2  # <s> ... </s>, no padding: every row full
  x_N, y_N = jnp.asarray(x_N), jnp.asarray(rng.integers(0, 2, n), jnp.int32)
  optimizer = train.make_optimizer(
      train.TrainConfig("adam", 5e-5, batch_size=b), n // b)
  sampler = train.EpochShuffle(n, b)
  trainers = {
      "non-DP": train.Trainer(model, optimizer, sampler),
      # MICO's C = 0.1; σ = 1 (its value does not change the cost).
      "DP-SGD": train.Trainer(model, optimizer, sampler,
                              dp.DPGradient(0.1, 1.0, float(b))),
  }
  train_KxT = jnp.tile(jnp.arange(n, dtype=jnp.int32), (k, 1))
  keys = train.model_keys(np.arange(k * 3).reshape(-1, 3))
  runs = {}
  for name, trainer in trainers.items():
    start = time.perf_counter()
    state = trainer.init(keys, x_N[0])
    state, _ = trainer.run(state, train_KxT, x_N, y_N, args.steps)
    jax.block_until_ready(state)
    print(f"{name}: compiled and warmed up in"
          f" {time.perf_counter() - start:.0f}s", flush=True)
    runs[name] = lambda t=trainer, s=state: t.run(s, train_KxT, x_N, y_N,
                                                  args.steps)
  best = dict.fromkeys(runs, float("inf"))
  for _ in range(args.repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(run())
      best[name] = min(best[name], time.perf_counter() - start)

  params = sum(leaf.size for leaf in jax.tree.leaves(jax.eval_shape(
      model.init, jax.random.key(0), x_N[:1])))
  print(f"\nRoBERTa {args.layers} layers, width {args.hidden}, {args.heads}"
        f" heads, vocabulary {args.vocab} ({params / 1e6:.1f}M parameters),"
        f" {args.length} tokens, compute {dtype}; K = {k} models, batch {b}"
        f" per model, Adam; devices: {jax.devices()}")
  print(f"{'step':<10}{'s/step':>10}{'examples/s/model':>18}"
        f"{'examples/s (all K)':>20}")
  for name, secs in best.items():
    per_step = secs / args.steps
    print(f"{name:<10}{per_step:>10.3f}{b / per_step:>18.1f}"
          f"{k * b / per_step:>20.1f}")
  print(f"\nDP / non-DP step cost: {best['DP-SGD'] / best['non-DP']:.2f}")


if __name__ == "__main__":
  main()
