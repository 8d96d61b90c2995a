r"""MICO's CIFAR-10 CNN convolutions one by one, each way `conv` runs them.

  python -m benchmarks.conv_layers

For each convolution of `models.CNN` (batch `--batch`, 32x32x3 images) times
a jitted forward + backward pass (output, input and kernel gradients) by
`lax.conv_general_dilated` (XLA:CPU's own kernel), by patches times kernel,
and for the 3x3 stride-1 ones by Winograd F(2x2, 3x3) and F(4x4, 3x3),
interleaved (fastest of `--repeats`); and the largest error of each output
and gradient against `lax` at `Precision.HIGHEST`, absolute and as a share of
the largest value. "chosen" marks what `conv.conv_general_dilated` takes on
CPU. Random inputs and PyTorch-scaled kernels.
"""

import argparse
import functools
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from mico_jax import conv

# (input spatial, channels in, channels out, kernel, stride, padding): the
# layers of `models.CNN` on 32x32 images (max pool 3 s1 before the second).
_LAYERS = {"conv1": (32, 3, 128, 8, 2, ((3, 3), (3, 3))),
           "conv2": (14, 128, 256, 3, 1, "VALID"),
           "conv3": (12, 256, 256, 3, 1, "VALID")}
_NHWC = ("NHWC", "HWIO", "NHWC")


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=8)
  parser.add_argument("--layers", default="conv1,conv2,conv3")
  return parser.parse_args()


def _ways(kernel: int, stride: int, padding) -> dict:
  """Each way to compute the layer: `(x, w, precision) -> y`."""
  strides = (stride, stride)
  ways = {
      "lax": lambda x, w, p: lax.conv_general_dilated(
          x, w, strides, padding, dimension_numbers=_NHWC, precision=p),
      # pylint: disable-next=protected-access
      "patches": lambda x, w, p: conv._patches_times_kernel(
          x, w, (strides, padding), p)}
  if conv.winograd_tile((9, 9), (kernel,) * 2, strides, "VALID"):
    for m in (2, 4):
      ways[f"F({m}x{m})"] = functools.partial(
          lambda x, w, p, m: conv.winograd(x, w, padding, m, p), m=m)
  return ways


def main():
  args = _parse()
  print(f"batch {args.batch}; fastest of {args.repeats}, interleaved;"
        f" {jax.devices()}, jax {jax.__version__}")
  print(f"{'layer':<7}{'way':<10}{'ms fwd+bwd':>11}{'vs lax':>8}  max error"
        " (abs / of largest): output, input grad, kernel grad")
  for name in args.layers.split(","):
    size, c_in, c_out, kernel, stride, padding = _LAYERS[name]
    key_x, key_w, key_g = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(key_x, (args.batch, size, size, c_in))
    w = jax.random.uniform(key_w, (kernel, kernel, c_in, c_out), minval=-1,
                           maxval=1) / np.sqrt(kernel * kernel * c_in)
    ways = _ways(kernel, stride, padding)
    exact = jax.jit(lambda x, w: jax.vjp(
        lambda x, w: ways["lax"](x, w, lax.Precision.HIGHEST), x, w))
    y_exact, vjp_exact = exact(x, w)
    g = jax.random.normal(key_g, y_exact.shape)
    expected = (y_exact, *vjp_exact(g))
    steps, errors = {}, {}
    for way, f in ways.items():
      step = jax.jit(lambda x, w, g, f=f: (lambda y, vjp: (y, *vjp(g)))(
          *jax.vjp(lambda x, w: f(x, w, None), x, w)))
      got = jax.block_until_ready(step(x, w, g))
      errors[way] = [(float(jnp.abs(a - b).max()),
                      float(jnp.abs(a - b).max() / jnp.abs(b).max()))
                     for a, b in zip(got, expected)]
      steps[way] = step
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(args.repeats):
      for way, step in steps.items():
        start = time.perf_counter()
        jax.block_until_ready(step(x, w, g))
        best[way] = min(best[way], time.perf_counter() - start)
    tile = conv.winograd_tile((size, size), (kernel,) * 2, (stride,) * 2,
                              padding)
    chosen = f"F({tile}x{tile})" if tile else "patches"
    for way in steps:
      mark = " (chosen)" if way == chosen else ""
      print(f"{name:<7}{way:<10}{best[way] * 1e3:>11.1f}"
            f"{best['lax'] / best[way]:>7.2f}x  "
            + ", ".join(f"{a:.1e} / {r:.1e}" for a, r in errors[way]) + mark)


if __name__ == "__main__":
  main()
