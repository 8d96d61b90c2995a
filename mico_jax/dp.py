"""DP-SGD for a stack of models: Poisson batches, clipping, Gaussian noise.

One DP-SGD step of one model (vmapped over K models by the `Trainer`):
  1. `PoissonSampler`: each of the model's n training points joins the batch
     independently with probability q; the batch is padded to a fixed
     `capacity` with a mask, so shapes are static.
  2. `clipped_grad_sum`: each example's gradient is scaled to L2 norm <= C and
     the results summed, without materialising per-example gradients for dense
     and convolution layers ("ghost norms", below).
     `chunked_clipped_grad_sum` runs it on a head of rows that holds most
     batches whole, then in small chunks up to the batch's last row, so the
     padding costs little compute; the capacity, and so the accounting, is
     unchanged.
  3. `DPGradient`: adds N(0, σ²C²) to every coordinate, from the model's own
     per-step key, and divides by the *expected* batch size q·n (as Opacus
     does), so any optax optimizer then applies the update.
`calibrate` turns a `DPConfig` (ε, δ, C) and a recipe into q, steps, capacity
and σ, using `mico_jax.accounting` (dp-accounting's PLD accountant).

Ghost norms. For a dense layer z = a W + b with input a_b `[P, I]` and output
gradient g_b = ∂loss_b/∂z_b `[P, O]` (P positions; 1 for an MLP), the
per-example weight gradient is a_bᵀ g_b, so its squared norm is
||a_b||²·||g_b||² when P = 1 and <a_b a_bᵀ, g_b g_bᵀ> in general (ghost
norms), or ||a_bᵀ g_b||² from the instantiated per-example gradient, per
layer whichever costs fewer FLOPs (P·(D + O) against D·O: "mixed ghost
clipping"); the bias gradient is Σ_p g_bp. A convolution is a dense layer on
its unfolded input patches, and is computed so during the DP forward pass
(on CPU as `conv.conv_general_dilated` computes it: Winograd for 3x3
stride-1 ones);
its norms come from its input's Gram matrix where that is cheaper
(`_by_input_gram`: no patches; its clipped sum is then the layer's own
kernel gradient at the reweighted g, Winograd's on CPU), else its per-example
kernel gradients are instantiated (`_instantiate`) unless too large, and
give both its norms and its clipped sum Σ_b w_b a_bᵀ g_b.
The g_b come from one backward pass to zero perturbations added to each
layer's output (flax method interception, so models need no hooks). The
clipped sum of weight gradients is then Σ_b w_b a_bᵀ g_b with
w_b = min(1, C/||grad_b||): one matrix product per layer with the
reweighted g and the forward pass's a, so a DP step costs about one plain
step. `nn.Embed` and `nn.LayerNorm` layers are covered too (see
`_per_example_norm_sq`; their clipped sum is the layer's VJP at the
reweighted g), so a transformer needs no fallback. Parameters outside these
layers (or in layers called in unsupported ways) fall back to per-example
gradients by `vmap(grad)`, for those parameters only. Both paths
assume each example's output depends on that example alone (no batch norm) and
that a covered layer's parameters are used only through its `__call__`.

Truncation. Batches that would exceed `capacity` keep their first `capacity`
points in list order. `calibrate` sizes the capacity so that an overflow
anywhere in training has probability p with (1 + e^ε)·p <= 1e-3·δ on the
larger neighbour (n + 1 points, which overflows more often than n), and
accounts for it with the generic bound (`accounting.delta_with_overflow`):
σ is calibrated to δ' = δ − (1 + e^ε)·p, so the truncated mechanism is
(ε, δ)-DP. (dp-accounting's exact truncated event assumes a uniformly random
truncation, which the sampler below does not do.)
"""

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, NamedTuple

import flax.linen as nn
from flax import traverse_util
from flax.linen import linear
import jax
import jax.numpy as jnp
import numpy as np

from mico_jax import accounting
from mico_jax import conv
from mico_jax.models import cross_entropy

PyTree = Any

# Share of δ spent on the (generic-bound) chance that a batch overflows.
OVERFLOW_DELTA_SHARE = 1e-3
# What the clipping bound depends on (ghost norms, the reweighted VJPs, the
# weighted sums) runs at full float32 precision: at default precision GPUs
# use TF32 and TPUs bfloat16 passes, and an example's contribution could
# exceed C by ~1e-3 to ~1e-2 relative.
_FULL = jax.lax.Precision.HIGHEST


class DPError(ValueError):
  """Privacy parameters that cannot work; the message says which and why."""


def _check(name: str, value, ok: Callable[[float], bool], want: str) -> None:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or
      not ok(value)):
    raise DPError(f"{name} must be {want}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """The privacy of a DP-SGD recipe: target (ε, δ), clipping norm C, rate rule.

  MICO: ε = 10 (`hi`) or 4 (`lo`), δ = 1e-5, C = 2.6 (0.1 for SST-2).
  `sample_rate_rule` says how the Poisson rate q follows from n and the batch
  size B; both rules take ceil(n / B) steps per epoch:
    "steps": q = 1 / ceil(n / B), Opacus's `1 / len(train_loader)` in MICO's
      `train_cifar10.py` and `train_purchase100.py`;
    "batch": q = B / n, as MICO's `train_sst2.py` (`sampling_probability`).
  """

  epsilon: float
  delta: float = 1e-5
  clip_norm: float = 2.6
  sample_rate_rule: str = "steps"

  def __post_init__(self):
    try:
      accounting.validate_dp(self.epsilon, self.delta, self.clip_norm)
    except ValueError as e:
      raise DPError(str(e)) from None
    if self.sample_rate_rule not in ("steps", "batch"):
      raise DPError(f"sample_rate_rule must be 'steps' or 'batch', got"
                    f" {self.sample_rate_rule!r}")


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """DP-SGD's parameters for one recipe on n training points, as accounted.

  Attributes:
    dataset_size: n, each model's training points.
    sample_rate: q, by the config's `sample_rate_rule`.
    steps: DP-SGD steps the recipe takes.
    capacity: padded batch size.
    clip_norm: C.
    noise_multiplier: σ; the noise standard deviation is σC.
    delta: the target δ, overflow included.
    poisson_delta: δ' at which the untruncated mechanism is accounted.
  """

  dataset_size: int
  sample_rate: float
  steps: int
  capacity: int
  clip_norm: float
  noise_multiplier: float
  delta: float
  poisson_delta: float

  @property
  def expected_batch_size(self) -> float:
    return self.sample_rate * self.dataset_size

  def epsilon(self, steps: int | None = None) -> float:
    """ε spent after `steps` steps (default: all), at `delta`."""
    return accounting.epsilon(self.noise_multiplier, self.poisson_delta,
                              self.sample_rate,
                              self.steps if steps is None else steps)

  def check_steps(self, steps_run: int) -> None:
    """Raises unless training ran exactly the steps accounted for."""
    if steps_run != self.steps:
      raise RuntimeError(
          f"DP-SGD ran {steps_run} steps, but its privacy was accounted for"
          f" {self.steps}: the epsilon reported would be wrong")


@functools.lru_cache(maxsize=64)
def calibrate(config: DPConfig, dataset_size: int, batch_size: int,
              epochs: int) -> Mechanism:
  """Sample rate, steps, capacity and σ for a recipe, as MICO sets them.

  MICO: q by `config.sample_rate_rule` (1 / ceil(n / batch_size) or
  batch_size / n), steps = epochs · ceil(n / batch_size), and the expected
  batch size q·n. σ comes from the PLD accountant; cached, since it takes
  seconds at MICO's sizes.

  Args:
    config: target ε, δ and C.
    dataset_size: n, each model's training points.
    batch_size: the recipe's (expected) batch size.
    epochs: the recipe's epochs.

  Raises:
    DPError: if no σ reaches the target.
  """
  steps_per_epoch = math.ceil(dataset_size / batch_size)
  sample_rate = (1 / steps_per_epoch if config.sample_rate_rule == "steps"
                 else min(batch_size / dataset_size, 1.0))
  steps = epochs * steps_per_epoch
  eps, delta = config.epsilon, config.delta
  try:
    # Overflow budget p with (1 + e^ε) p <= share·δ, in logs for large ε.
    log_budget = (math.log(OVERFLOW_DELTA_SHARE * delta) - eps -
                  math.log1p(math.exp(-eps)))
    # The add-one neighbour has n + 1 points, and overflows more often.
    capacity = accounting.batch_capacity(
        dataset_size + 1, sample_rate, steps,
        max(math.exp(log_budget), 1e-300))
    overflow = accounting.overflow_probability(dataset_size + 1, sample_rate,
                                               steps, capacity)
    extra = accounting.delta_with_overflow(eps, delta / 2, overflow) - delta / 2
    if extra > OVERFLOW_DELTA_SHARE * delta:  # float limits at a huge ε
      capacity, extra = dataset_size + 1, 0.0
    poisson_delta = delta - extra
    sigma = accounting.noise_multiplier(eps, poisson_delta, sample_rate, steps)
  except ValueError as e:
    raise DPError(f"cannot calibrate DP-SGD to (epsilon={eps}, delta={delta})"
                  f" with q={sample_rate:.4g} over {steps} steps: {e}") from e
  return Mechanism(dataset_size, sample_rate, steps, capacity,
                   config.clip_norm, sigma, delta, poisson_delta)


def _bernoulli_thresholds(probabilities: list[float]) -> np.ndarray:
  """Each probability p as a 64-bit threshold round(p·2⁶⁴), in two uint32s.

  A uniform 64-bit word w is below the threshold with probability p, up to
  2⁻⁶⁴ and the float64 rounding of p. Returns `[2, len(probabilities)]`: high
  words, then low words.
  """
  thresholds = [min(round(p * 2.0**64), 2**64 - 1) for p in probabilities]
  return np.array([[t >> 32 for t in thresholds],
                   [t & 0xFFFFFFFF for t in thresholds]], np.uint32)


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
  """Poisson sampling of one model's training list, padded to `capacity`.

  Each step, every position of the list joins the batch independently with
  probability `sample_rate` q. The positions are running sums of geometric
  gaps (a Bernoulli process sampled by its gaps), at O(capacity) cost per
  step instead of O(n) coin flips or an O(n log n) shuffle. Stateless: each
  step uses the step's key.

  Exactness. A gap is 1 + X with P(X >= t) = (1 - q)^t. X's binary digits
  are independent: P(X = Σ_k b_k 2^k) ∝ Π_k r_k^{b_k} with r_k = (1 - q)^{2^k},
  so digit k is 1 with probability r_k / (1 + r_k). Each digit is drawn by
  comparing a uniform 64-bit word with a threshold computed on the host in
  float64; no transcendental function runs on the device, so the draw is the
  same on CPU, GPU and TPU, and needs no `jax_enable_x64`. Digits whose
  probability is below 2⁻⁶⁴ are dropped, and the digits at or above the
  first power of two past the list's end are one event, "X >= 2^k": the gap
  is past the end. Each digit compares a 32-bit word of its own and, on a
  tie (probability 2⁻³²), a low word shared by the gap's digits, so every
  inclusion is an independent Bernoulli(q) up to ~2⁻⁶⁰ and float64 rounding.
  (A float32 inverse CDF is not: its uniforms lie on a 2⁻²³ grid, so at
  q = 1/293 no gap exceeds 4,664 and long gaps are off by up to 100%.)

  Attributes:
    num_points: n, the length of the training list.
    sample_rate: q, in (0, 1].
    capacity: padded batch size; beyond it the lowest positions are kept.
    epoch_steps: steps per epoch (the recipe's ceil(n / B)); 0: round(1 / q).
  """

  num_points: int
  sample_rate: float
  capacity: int
  epoch_steps: int = 0

  def __post_init__(self):
    _check("sample_rate", self.sample_rate, lambda v: 0 < v <= 1, "in (0, 1]")
    _check("num_points", self.num_points, lambda v: v >= 1, ">= 1")
    _check("capacity", self.capacity, lambda v: v >= 1, ">= 1")

  @property
  def steps_per_epoch(self) -> int:
    """Steps in which each point is sampled once on average (or as given)."""
    return self.epoch_steps or max(1, round(1 / self.sample_rate))

  @functools.cached_property
  def _digits(self) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds of X's binary digits and of the event "past the end".

    Returns (digit thresholds `[2, D]`, past-the-end threshold `[2, 1]`), as
    `_bernoulli_thresholds`; digit k of D is X's digit k.
    """
    log_rho = (math.log1p(-self.sample_rate) if self.sample_rate < 1 else
               -math.inf)
    # X >= 2^end_bit puts the gap past the end: 1 + X > n.
    end_bit = self.num_points.bit_length()
    probabilities = []
    for k in range(end_bit):
      r = math.exp(log_rho * 2.0**k)
      if r / (1 + r) < 2.0**-64:
        break  # so are the digits above
      probabilities.append(r / (1 + r))
    past_end = math.exp(log_rho * 2.0**end_bit)
    return (_bernoulli_thresholds(probabilities),
            _bernoulli_thresholds([past_end]))

  def digit_probabilities(self) -> tuple[np.ndarray, float]:
    """What `sample` draws: P(digit k of X is 1) for each digit drawn, and
    P(gap past the end), from the 64-bit thresholds it compares with."""
    digits, past_end = (t.astype(np.float64) for t in self._digits)
    as_float = lambda t: t[0] * 2.0**-32 + t[1] * 2.0**-64
    return as_float(digits), float(as_float(past_end)[0])

  def init(self, key: jax.Array) -> tuple[()]:
    del key
    return ()

  def sample(self, state, key, step):
    digits, past_end = self._digits
    num_digits = digits.shape[1]
    # One 32-bit word per digit and for "past the end", and a shared low word.
    # `jax.random.bits` with threefry's original layout (`_random_bits`).
    words = _random_bits(jax.random.fold_in(key, step),
                         self.capacity * (num_digits + 2)).reshape(
                             self.capacity, num_digits + 2)
    low = words[:, -1:]

    def below(high, threshold):
      high_t, low_t = threshold[0][None], threshold[1][None]
      return (high < high_t) | ((high == high_t) & (low < low_t))

    powers = jnp.left_shift(1, jnp.arange(num_digits, dtype=jnp.int32))
    x = jnp.sum(jnp.where(below(words[:, :num_digits], digits),
                          powers[None], 0), 1)
    end = self.num_points + 1
    # Past the end is as good as n + 1, which keeps the sums int32-safe.
    gaps = jnp.where(below(words[:, num_digits:-1], past_end)[:, 0], end,
                     jnp.minimum(x + 1, end))
    # Saturating running sum: past the end is past the end, with no overflow.
    ends = jax.lax.associative_scan(
        lambda a, b: jnp.minimum(a + b, end), gaps)
    positions = ends - 1
    mask = positions < self.num_points
    return state, jnp.where(mask, positions, 0), mask


# Ghost norms.


class _Call(NamedTuple):
  """One call of a dense or convolution layer during the forward pass."""

  path: tuple[str, ...]
  module: nn.Module  # unbound copy, to re-apply the layer alone
  supported: bool


def _as_tuple(value, rank: int, default: int = 1) -> tuple[int, ...]:
  if value is None:
    return (default,) * rank
  if isinstance(value, int):
    return (value,) * rank
  return tuple(value)


def _conv_padding(module: nn.Conv, rank: int):
  padding = linear.canonicalize_padding(module.padding, rank)
  return padding if padding in ("SAME", "VALID") or not isinstance(
      padding, str) else None


def _supported(module: nn.Module, inputs: jax.Array, batch: int,
               kwargs: dict[str, Any]) -> bool:
  if type(module) in _PER_EXAMPLE_LAYERS:
    return _per_example_supported(module, inputs, batch, kwargs)
  if inputs.ndim < 2 or inputs.shape[0] != batch:
    return False
  if type(module) is nn.Dense:  # pylint: disable=unidiomatic-typecheck
    return True
  rank = len(_as_tuple(module.kernel_size, 1))
  undilated = all(d == 1 for d in (*_as_tuple(module.input_dilation, rank),
                                   *_as_tuple(module.kernel_dilation, rank)))
  return (rank <= 3 and inputs.ndim == rank + 2 and undilated and
          module.feature_group_count == 1 and module.shared_weights and
          module.mask is None and _conv_padding(module, rank) is not None)


def _tapped_apply(apply_fn: Callable, params: PyTree, x: jax.Array,
                  perturbs: list[jax.Array] | None, calls: list[_Call]):
  """Applies the model, recording each dense/conv call's input and output.

  The i-th such call's output gets `perturbs[i]` added, so the gradient with
  respect to `perturbs` is the loss gradient with respect to layer outputs.
  Appends one `_Call` per call to `calls`. A supported convolution is
  computed as its input patches times the kernel (or by Winograd's
  transforms: `_conv_output`): its backward pass is then matrix products
  and slices, which XLA:CPU runs at matmul speed inside loops and under
  `vmap`, where its convolution gradients are ~10x slower or worse. Its
  recorded input is the layer's input (`_rows` unfolds it where needed).
  """
  inputs, outputs = [], []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or
        type(module) not in (nn.Dense, nn.Conv) + _PER_EXAMPLE_LAYERS):
      return next_fun(*args, **kwargs)
    layer_input = args[0] if args else kwargs["inputs"]
    supported = _supported(module, layer_input, x.shape[0], kwargs)
    if supported and type(module) is nn.Conv:  # pylint: disable=unidiomatic-typecheck
      out = _conv_output(module, layer_input,
                         module.get_variable("params", "kernel"))
      if module.use_bias:
        bias = module.get_variable("params", "bias")
        out = out + bias.reshape((1,) * (out.ndim - 1) + bias.shape)
    else:
      out = next_fun(*args, **kwargs)
    if perturbs is not None:
      out = out + perturbs[len(outputs)]
    calls.append(_Call(module.path, module.clone(parent=None), supported))
    inputs.append(layer_input)
    outputs.append(out)
    return out

  with nn.intercept_methods(interceptor):
    logits = apply_fn(params, x)
  return logits, inputs, outputs


def _geometry(module: nn.Conv) -> tuple[tuple[int, ...], tuple[int, ...],
                                         Any]:
  """A supported convolution's kernel size, strides and padding."""
  kernel = _as_tuple(module.kernel_size, 1)
  rank = len(kernel)
  return (kernel, _as_tuple(module.strides, rank),
          _conv_padding(module, rank))


def _unfold(module: nn.Conv, inputs: jax.Array) -> jax.Array:
  """A convolution's input patches `[B, *out_spatial, D]` (`conv.unfold`),
  features in the kernel's order: the convolution is these patches times
  the kernel reshaped to `[D, O]`."""
  return conv.unfold(inputs, *_geometry(module))


def _rows(module: nn.Module, layer_input: jax.Array) -> jax.Array:
  """A recorded layer input as the rows `[B, P, D]` its kernel multiplies."""
  if type(module) is nn.Conv:  # pylint: disable=unidiomatic-typecheck
    layer_input = _unfold(module, layer_input)
  return layer_input.reshape(layer_input.shape[0], -1, layer_input.shape[-1])


def _conv(module: nn.Conv, inputs: jax.Array, kernel: jax.Array,
          precision=None) -> jax.Array:
  """The convolution `conv.conv_general_dilated` computes (on CPU: Winograd
  or patches times kernel, with their written-out backward passes)."""
  _, strides, padding = _geometry(module)
  return conv.conv_general_dilated(
      inputs, kernel, strides, padding, precision=precision,
      dimension_numbers=conv.channels_last(kernel.ndim - 2))


def _conv_output(module: nn.Conv, inputs: jax.Array,
                 kernel: jax.Array) -> jax.Array:
  """A supported convolution's output in the DP pass: `_conv` on CPU, its
  patches times the kernel elsewhere (matrix products under `vmap`)."""
  def by_patches(inputs, kernel):
    return jnp.einsum("b...d,do->b...o", _unfold(module, inputs),
                      kernel.reshape(-1, kernel.shape[-1]))

  return jax.lax.platform_dependent(
      inputs, kernel, default=by_patches,
      cpu=lambda inputs, kernel: _conv(module, inputs, kernel))


# Largest per-example kernel gradients `[B, D, O]` instantiated at once.
_INSTANTIATE_FLOATS = 2**26


def _instantiate(module: nn.Module, a_BxPxD: jax.Array,
                 g_BxPxO: jax.Array) -> bool:
  """Whether a layer's clipped sum comes from its per-example gradients.

  A convolution's per-example kernel gradients a_bᵀ g_b cost what its
  batch's kernel gradient costs, and give both the norms and (weighted) the
  clipped sum, where ghost norms cost P²(D + O) per example and the clipped
  sum another P·D·O: always fewer FLOPs, at B·D·O floats of memory.
  """
  batch, p, d = a_BxPxD.shape
  return (type(module) is nn.Conv and p > 1 and  # pylint: disable=unidiomatic-typecheck
          batch * d * g_BxPxO.shape[-1] <= _INSTANTIATE_FLOATS)


def _by_input_gram(module: nn.Module, calls: int, x: jax.Array,
                   g_BxPxO: jax.Array) -> bool:
  """Whether a convolution's norms come from its input's Gram matrix
  (`conv.patch_gram`, S padded input positions) and its clipped sum from
  its own kernel gradient (Winograd's on CPU), never from its patches:
  where S²·C + P²·O (the two Gram matrices) costs fewer FLOPs than the
  per-example gradients (P·D·O), within their memory bound."""
  if type(module) is not nn.Conv or calls != 1:  # pylint: disable=unidiomatic-typecheck
    return False
  kernel, strides, padding = _geometry(module)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:-1], kernel, strides, padding)
  s = math.prod(n + lo + hi for n, (lo, hi) in zip(x.shape[1:-1], padding))
  batch, p, o = g_BxPxO.shape
  c = x.shape[-1]
  return (s * s * c + p * p * o < p * math.prod(kernel) * c * o and
          batch * s * s <= _INSTANTIATE_FLOATS)


def _conv_kernel_gradient(module: nn.Conv, x: jax.Array, kernel: jax.Array,
                          g: jax.Array) -> jax.Array:
  """Σ_b of the convolution's kernel gradients at output gradients `g`."""
  return jax.vjp(lambda k: _conv(module, x, k, _FULL), kernel)[1](g)[0]


def _sum_sq(v_BxD: jax.Array) -> jax.Array:
  """Σ_d v_bd² `[B]`, as a batched dot: XLA:CPU sends a row sum of squares
  to a library reduction that took longer in the MLP's DP step
  (benchmarks/RESULTS.md)."""
  return jnp.einsum("bd,bd->b", v_BxD, v_BxD, precision=_FULL)


def _kernel_norm_sq(a_BxPxD: jax.Array, g_BxPxO: jax.Array) -> jax.Array:
  """Squared norms of the per-example kernel gradients a_bᵀ g_b, cheaply."""
  _, p, d = a_BxPxD.shape
  o = g_BxPxO.shape[-1]
  if p == 1:
    return _sum_sq(a_BxPxD[:, 0]) * _sum_sq(g_BxPxO[:, 0])
  if p * (d + o) <= d * o:
    gram_a = jnp.einsum("bpd,bqd->bpq", a_BxPxD, a_BxPxD, precision=_FULL)
    gram_g = jnp.einsum("bpo,bqo->bpq", g_BxPxO, g_BxPxO, precision=_FULL)
    return jnp.sum(gram_a * gram_g, (1, 2))
  return jnp.sum(jnp.einsum("bpd,bpo->bdo", a_BxPxD, g_BxPxO,
                            precision=_FULL) ** 2, (1, 2))


def _kernel_gradient(a_RxD: jax.Array, g_RxO: jax.Array) -> jax.Array:
  """`a_RxDᵀ g_RxO` `[D, O]`: a dense layer's kernel gradient over R rows.

  On CPU as `(g_RxOᵀ a_RxD)ᵀ` with `g_RxOᵀ` materialised: XLA:CPU sends a
  product to its fast kernel library (YNNPACK) only when the left operand
  contracts its last axis; `a_RxDᵀ g_RxO` contracts the rows of both, and
  runs on a generic kernel. `g` is the smaller operand to transpose, and
  the barriers keep XLA from folding the transposes back into the product.
  The same sum, its rows added in another order (benchmarks/RESULTS.md:
  the DP step up to 6% faster; the plain step's gradient is left as JAX
  computes it, where this was slower at K = 64).
  """
  def rows_last(a, g):
    g_OxR = jax.lax.optimization_barrier(g.T)
    return jax.lax.optimization_barrier(
        jnp.matmul(g_OxR, a, precision=_FULL)).T

  def in_place(a, g):
    return jax.lax.dot_general(a, g, (((0,), (0,)), ((), ())),
                               precision=_FULL)

  return jax.lax.platform_dependent(a_RxD, g_RxO, cpu=rows_last,
                                    default=in_place)


# Embeddings and LayerNorms: covered by the same interception. An embedding's
# per-example gradient is a scatter of the output gradients g_bp into the rows
# of the example's ids, so ||grad_b||² = Σ_{p,q: id_p = id_q} <g_bp, g_bq>, a
# Gram matrix masked by id equality (never the [V, D] gradient). A LayerNorm's
# parameters are few: its per-example gradients come from a vmapped VJP of the
# layer alone. Either way the clipped sum is the layer's VJP at the reweighted
# g, as for dense layers.
_PER_EXAMPLE_LAYERS = (nn.Embed, nn.LayerNorm)


def _per_example_supported(module: nn.Module, inputs: jax.Array, batch: int,
                           kwargs: dict[str, Any]) -> bool:
  if inputs.ndim < 1 or inputs.shape[0] != batch:
    return False
  if isinstance(module, nn.Embed):
    return True
  # Each example normalised on its own: no batch axis, no cross-device stats.
  axes = {a % inputs.ndim for a in _as_tuple(module.reduction_axes, 1)}
  features = {a % inputs.ndim for a in _as_tuple(module.feature_axes, 1)}
  return (inputs.ndim >= 2 and 0 not in axes | features and
          module.axis_name is None and kwargs.get("mask") is None)


def _layer_params(params: PyTree, path: tuple[str, ...]) -> PyTree:
  layer_params = params["params"]
  for name in path:
    layer_params = layer_params[name]
  return layer_params


def _per_example_norm_sq(module: nn.Module, layer_params: PyTree,
                         inputs: list[jax.Array],
                         g_outputs: list[jax.Array]) -> jax.Array:
  """Squared norms `[B]` of an embedding's or a LayerNorm's per-example
  gradients, summed over the layer's calls."""
  batch = inputs[0].shape[0]
  if isinstance(module, nn.Embed):
    ids_BxP = jnp.concatenate([i.reshape(batch, -1) for i in inputs], 1)
    g_BxPxD = jnp.concatenate(
        [g.reshape(batch, -1, g.shape[-1]) for g in g_outputs],
        1).astype(jnp.float32)
    same_BxPxP = ids_BxP[:, :, None] == ids_BxP[:, None, :]
    gram_BxPxP = jnp.einsum("bpd,bqd->bpq", g_BxPxD, g_BxPxD,
                            precision=_FULL)
    return jnp.sum(jnp.where(same_BxPxP, gram_BxPxP, 0), (1, 2))

  def grads_one(x_one, g_one):
    return jax.vjp(lambda p: module.apply({"params": p}, x_one[None]),
                   layer_params)[1](g_one[None])[0]

  grads_B = jax.tree.map(lambda *g: sum(g), *[
      jax.vmap(grads_one)(x, g) for x, g in zip(inputs, g_outputs)])
  return sum(jnp.sum(g.reshape(batch, -1).astype(jnp.float32) ** 2, 1)
             for g in jax.tree.leaves(grads_B))


def _output_gradients(apply_fn, params, x, y):
  """Per-example losses; each dense/conv call, its input and ∂loss_b/∂z_b."""
  calls = []
  _, _, out_shapes = jax.eval_shape(
      lambda p, x: _tapped_apply(apply_fn, p, x, None, calls), params, x)

  def loss_sum(perturbs):
    logits, layer_inputs, _ = _tapped_apply(apply_fn, params, x, perturbs, [])
    losses = cross_entropy(logits, y)
    # Examples are independent, so ∂(Σ loss)/∂z_b = ∂loss_b/∂z_b.
    return losses.sum(), (losses, layer_inputs)

  zeros = [jnp.zeros(s.shape, s.dtype) for s in out_shapes]
  (_, (losses_B, inputs)), g_outputs = jax.value_and_grad(
      loss_sum, has_aux=True)(zeros)
  return losses_B, calls, inputs, g_outputs


def clipped_grad_sum(apply_fn: Callable, params: PyTree, x: jax.Array,
                     y: jax.Array, mask: jax.Array, clip_norm: float,
                     method: str = "ghost"
                     ) -> tuple[jax.Array, PyTree, jax.Array]:
  """Σ_b mask_b · clip(∇loss_b, C) for one model, and the norms it clipped.

  Args:
    apply_fn: `(params, x_Bx...) -> logits_BxC`, e.g. `model.apply`.
    params: one model's variables.
    x: inputs `[B, ...]`.
    y: integer labels `[B]`.
    mask: bool `[B]`; masked examples contribute nothing.
    clip_norm: C.
    method: "ghost" (ghost norms where layers allow, `vmap(grad)` elsewhere)
      or "naive" (`vmap(grad)` everywhere; the reference).

  Returns:
    (per-example losses `[B]`, the clipped sum shaped like `params`,
    per-example gradient norms `[B]` before clipping).
  """
  if method not in ("ghost", "naive"):
    raise ValueError(f"method must be 'ghost' or 'naive', got {method!r}")
  batch = x.shape[0]
  losses_B, calls, inputs, g_outputs = None, [], [], []
  if method == "ghost":
    losses_B, calls, inputs, g_outputs = _output_gradients(apply_fn, params,
                                                           x, y)

  # A layer is covered only if every call of it is supported.
  unsupported = {c.path for c in calls if not c.supported}
  by_path: dict[tuple[str, ...], list[int]] = {}
  for i, c in enumerate(calls):
    if c.path not in unsupported:
      by_path.setdefault(c.path, []).append(i)

  norm_sq_B = jnp.zeros(batch, jnp.float32)
  a_g = {}  # path -> (a `[B, P, D]`, g `[B, P, O]`)
  x_g = {}  # path -> (the convolution's input, its output gradient)
  kernels_B = {}  # path -> instantiated per-example kernel gradients
  for path, idx in by_path.items():
    module = calls[idx[0]].module
    if type(module) in _PER_EXAMPLE_LAYERS:
      norm_sq_B += _per_example_norm_sq(
          module, _layer_params(params, path), [inputs[i] for i in idx],
          [g_outputs[i] for i in idx])
      continue
    # Calls of one layer share its weights: their positions add up. Norms
    # in float32 whatever the compute dtype: clipping must be exact.
    g = jnp.concatenate(
        [g_outputs[i].reshape(batch, -1, g_outputs[i].shape[-1])
         for i in idx], 1).astype(jnp.float32)
    if module.use_bias:
      norm_sq_B += _sum_sq(g.sum(1))
    if _by_input_gram(module, len(idx), inputs[idx[0]], g):
      x_in = inputs[idx[0]].astype(jnp.float32)
      gram_a = conv.patch_gram(x_in, *_geometry(module), _FULL)
      gram_g = jnp.einsum("bpo,bqo->bpq", g, g, precision=_FULL)
      norm_sq_B += jnp.sum(gram_a * gram_g, (1, 2))
      x_g[path] = x_in, g_outputs[idx[0]].astype(jnp.float32)
      continue
    a = jnp.concatenate([_rows(calls[i].module, inputs[i]) for i in idx],
                        1).astype(jnp.float32)
    a_g[path] = a, g
    if _instantiate(module, a, g):
      kernels_B[path] = jnp.einsum("bpd,bpo->bdo", a, g, precision=_FULL)
      norm_sq_B += jnp.sum(kernels_B[path] ** 2, (1, 2))
    else:
      norm_sq_B += _kernel_norm_sq(a, g)

  # Other parameters by per-example gradients of those leaves only.
  flat = traverse_util.flatten_dict(params)
  covered = {("params",) + path for path in by_path}
  rest = {k: v for k, v in flat.items() if k[:-1] not in covered}
  rest_grads_B = {}
  if rest:
    def loss_one(rest_params, x_one, y_one):
      full = traverse_util.unflatten_dict({**flat, **rest_params})
      return cross_entropy(apply_fn(full, x_one[None]), y_one[None])[0]

    rest_losses_B, rest_grads_B = jax.vmap(
        jax.value_and_grad(loss_one), in_axes=(None, 0, 0))(rest, x, y)
    losses_B = rest_losses_B if losses_B is None else losses_B
    norm_sq_B += sum(jnp.sum(g.reshape(batch, -1) ** 2, 1)
                     for g in rest_grads_B.values())

  norm_B = jnp.sqrt(norm_sq_B)
  weight_B = jnp.where(mask, jnp.minimum(
      1.0, clip_norm / jnp.maximum(norm_B, 1e-30)), 0.0)

  grads = {k: jnp.tensordot(weight_B, g, 1, precision=_FULL)
           for k, g in rest_grads_B.items()}
  for path, (a, g) in a_g.items():
    name = ("params",) + path
    # Σ_b w_b a_bᵀ g_b, from the forward pass's a and the reweighted g.
    g = g * weight_B[:, None, None]
    if path in kernels_B:
      kernel = jnp.tensordot(weight_B, kernels_B[path], 1, precision=_FULL)
    else:
      # As one 2-D product over the rows (b, p): an einsum over both axes
      # makes XLA:CPU copy a transposed `a` first.
      kernel = _kernel_gradient(a.reshape(-1, a.shape[-1]),
                                g.reshape(-1, g.shape[-1]))
    grads[name + ("kernel",)] = kernel.reshape(flat[name + ("kernel",)].shape)
    if calls[by_path[path][0]].module.use_bias:
      grads[name + ("bias",)] = g.sum((0, 1))
  for path, (x_in, g) in x_g.items():
    name = ("params",) + path
    module = calls[by_path[path][0]].module
    g = g * weight_B.reshape((batch,) + (1,) * (g.ndim - 1))
    grads[name + ("kernel",)] = _conv_kernel_gradient(
        module, x_in, flat[name + ("kernel",)].astype(jnp.float32), g)
    if module.use_bias:
      grads[name + ("bias",)] = g.sum(tuple(range(g.ndim - 1)))
  for path, idx in by_path.items():
    if path in a_g or path in x_g:
      continue
    # An embedding's or LayerNorm's clipped sum: its VJP at the reweighted g.
    layer_grads = [
        jax.vjp(lambda p, i=i: calls[i].module.apply({"params": p}, inputs[i]),
                _layer_params(params, path))[1](
                    (g_outputs[i] * weight_B.reshape(
                        (batch,) + (1,) * (g_outputs[i].ndim - 1))).astype(
                            g_outputs[i].dtype))[0]
        for i in idx]
    total = jax.tree.map(lambda *leaves: sum(leaves), *layer_grads)
    for name, leaf in traverse_util.flatten_dict(total).items():
      grads[("params",) + path + name] = leaf
  return losses_B, traverse_util.unflatten_dict(grads), norm_B


def chunked_clipped_grad_sum(apply_fn: Callable, params: PyTree,
                             x_N: jax.Array, y_N: jax.Array,
                             idx_B: jax.Array, mask_B: jax.Array,
                             clip_norm: float, chunk_size: int,
                             head_size: int = 0, method: str = "ghost"
                             ) -> tuple[jax.Array, PyTree]:
  """`clipped_grad_sum` of the batch `x_N[idx_B]`, a head and then chunks.

  Clipping is per example, so the clipped sums of the first `head_size` rows
  and of the following `chunk_size`-row chunks add up to the whole batch's.
  Chunks after the last unmasked row are skipped: a Poisson batch fills a
  prefix of its capacity, so most of the padding costs no compute (under
  `vmap` over models, the loop runs until every model's batch is done). The
  rows are gathered per chunk, for the same reason.

  Args:
    apply_fn: `(params, x_Bx...) -> logits_BxC`.
    params: one model's variables.
    x_N: the pool's inputs `[N, ...]`.
    y_N: the pool's integer labels `[N]`.
    idx_B: the batch's rows of the pool.
    mask_B: bool; masked examples contribute nothing.
    clip_norm: C.
    chunk_size: rows per chunk after the head.
    head_size: rows computed in one block whatever the mask (`DPGradient`:
      most batches fit in it).
    method: "ghost" or "naive" (see `clipped_grad_sum`).

  Returns:
    (the sum of the unmasked examples' losses, the clipped sum shaped like
    `params`).
  """
  capacity = idx_B.shape[0]
  head = min(head_size, capacity)
  chunk = min(chunk_size, capacity - head)

  def block(start, size, skip):
    """Loss sum and clipped sum of rows [start, start + size), but `skip`."""
    mask_c = (jax.lax.dynamic_slice_in_dim(mask_B, start, size) &
              (start + jnp.arange(size) >= skip))
    idx_c = jax.lax.dynamic_slice_in_dim(idx_B, start, size)
    losses_c, grads_c, _ = clipped_grad_sum(
        apply_fn, params, x_N[idx_c], y_N[idx_c], mask_c, clip_norm, method)
    return jnp.sum(jnp.where(mask_c, losses_c, 0)), grads_c

  if head:
    loss_sum, grads = block(0, head, 0)
  else:
    loss_sum, grads = (jnp.zeros((), jnp.float32),
                       jax.tree.map(jnp.zeros_like, params))
  if not chunk:
    return loss_sum, grads
  end = jnp.max(jnp.where(mask_B, jnp.arange(1, capacity + 1), 0))

  def body(carry):
    first, loss_sum, grads = carry
    # The last chunk may overlap the one before; its repeated rows are masked.
    loss_c, grads_c = block(jnp.minimum(first, capacity - chunk), chunk, first)
    return (first + chunk, loss_sum + loss_c,
            jax.tree.map(jnp.add, grads, grads_c))

  _, loss_sum, grads = jax.lax.while_loop(
      lambda c: c[0] < end, body, (jnp.int32(head), loss_sum, grads))
  return loss_sum, grads


# Threefry-2x32's rotations, for rounds 1-4 and 5-8 of each 8 (Random123).
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(key_2: jax.Array, x0: jax.Array, x1: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 (20 rounds) of the counter pairs (x0, x1) under `key_2`.

  The hash `jax.random` uses, written out round by round: XLA:CPU fuses it
  into one loop over the counters, where JAX's own CPU lowering runs its
  five 4-round blocks as a `while` loop, each block a pass over memory.
  """
  ks = (key_2[0], key_2[1], key_2[0] ^ key_2[1] ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for block in range(5):
    for r in _THREEFRY_ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
    x0 = x0 + ks[(block + 1) % 3]
    x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def _random_bits(key: jax.Array, size: int) -> jax.Array:
  """`size` uint32 words, bit for bit `jax.random.bits(key, (size,))` with
  threefry's original (non-partitionable) counter layout.

  That layout hashes the counter pairs (i, i + ceil(size / 2)) and keeps
  both words, so each hash gives two words (the partitionable layout one).
  Only the compiled form differs from `jax.random`'s (see `_threefry2x32`):
  the numbers, and so their law and their secrecy, are the same (for sizes
  below 2³² − 1, which `jax.random` draws in one block).
  """
  if size >= 2**32 - 1:
    raise ValueError(f"cannot draw {size} words in one block")
  half = -(-size // 2)
  counts = jnp.arange(half, dtype=jnp.uint32)
  # An odd size pads the counters with one 0, as `jax.random` does.
  upper = jnp.where(counts + half < size, counts + half, 0).astype(jnp.uint32)
  return jnp.concatenate(_threefry2x32(jax.random.key_data(key), counts,
                                       upper))[:size]


def _normal(key: jax.Array, size: int) -> jax.Array:
  """`size` float32 N(0, 1) draws: `jax.random.normal(key, (size,))` with
  threefry's original layout, bit for bit (uniform in (-1, 1) from the top
  23 bits, then sqrt(2)·erfinv, as `jax.random` does)."""
  floats = jax.lax.bitcast_convert_type(
      (_random_bits(key, size) >> np.uint32(9)) | np.uint32(0x3F800000),
      jnp.float32) - 1
  low = np.nextafter(np.float32(-1), np.float32(0))
  uniform = jnp.maximum(low, floats * (np.float32(1) - low) + low)
  return np.float32(np.sqrt(2)) * jax.lax.erf_inv(uniform)


def add_noise(grads: PyTree, key: jax.Array, stddev: float) -> PyTree:
  """`grads` plus independent N(0, stddev²) on every coordinate.

  Drawn as `jax.random.normal` with threefry's original (non-partitionable)
  counter layout, which hashes one counter pair per two values instead of
  one per value (`_normal`: the same numbers, compiled into one fused loop
  on CPU, where the draw is a large share of a DP step). Each model draws
  from its own key, so under `vmap` the models axis shards as before.
  """
  leaves, treedef = jax.tree.flatten(grads)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      g + stddev * _normal(k, g.size).reshape(g.shape).astype(g.dtype)
      for g, k in zip(leaves, keys)])


@dataclasses.dataclass(frozen=True)
class DPGradient:
  """DP-SGD's gradient, with `train.mean_gradient`'s signature.

  `(apply_fn, params, x_N, y_N, idx_B, mask_B, key) -> (mean loss,
  (Σ clipped + noise) / expected batch size)`; the result feeds any optax
  optimizer.

  Attributes:
    clip_norm: C.
    noise_multiplier: σ; noise N(0, σ²C²) per coordinate.
    expected_batch_size: q·n, the divisor (fixed, so the noise scale is).
    method: "ghost" or "naive" (see `clipped_grad_sum`).
    chunk_size: rows per chunk after the head (see
      `chunked_clipped_grad_sum`); small enough that the last chunk wastes
      little, large enough that each runs efficiently.
    head_sds: the head ends this many sqrt(mean)s past the mean batch size
      (see `head_size`).
  """

  clip_norm: float
  noise_multiplier: float
  expected_batch_size: float
  method: str = "ghost"
  chunk_size: int = 32
  head_sds: float = 1.0

  @property
  def head_size(self) -> int:
    """Rows computed in one block: the batch's mean plus `head_sds`
    sqrt(mean).

    A batch size is Binomial(n, q), whose sd is below sqrt(q·n), so the
    default head (+1) holds ~84% of batches whole and the rest run a chunk
    or two: a chunk's row costs ~1.7x a head row of the Purchase-100 MLP on
    CPU (smaller products, the loop), where this beat heads at mean - 3 sd,
    at the mean or mean + 2 sd, and chunks of 16 or 64. Where a chunk row
    costs a head row (a CNN's rows, in chunks of 8), a head nearly every
    batch fills (-3) computes fewer rows (benchmarks/RESULTS.md).
    """
    mean = self.expected_batch_size
    return max(0, math.floor(mean + self.head_sds * math.sqrt(mean)))

  def __call__(self, apply_fn: Callable, params: PyTree, x_N: jax.Array,
               y_N: jax.Array, idx_B: jax.Array, mask_B: jax.Array,
               key: jax.Array) -> tuple[jax.Array, PyTree]:
    loss_sum, grads = chunked_clipped_grad_sum(
        apply_fn, params, x_N, y_N, idx_B, mask_B, self.clip_norm,
        self.chunk_size, self.head_size, self.method)
    noisy = add_noise(grads, key, self.noise_multiplier * self.clip_norm)
    loss = loss_sum / jnp.maximum(mask_B.sum(), 1)
    return loss, jax.tree.map(lambda g: g / self.expected_batch_size, noisy)
