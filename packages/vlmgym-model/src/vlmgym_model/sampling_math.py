"""What to sample (`SamplingParams`) and the sampler's per-token maths, on float32 logits
[B, V]: temperature and the top-k,
top-p and min-p filters (`filter_logits`), drawing a token with both its untempered and its
sampling log-prob (`sample_tokens`), and an exact categorical draw by inverse CDF over
vocabulary chunks (`categorical_inverse_cdf`). `vlmgym_model.sampling` runs them inside its
decode loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature=0` is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    num_samples: int = 1  # samples per prompt (a GRPO group)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(
    logits: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    *,
    top_k: int,
    use_top_p: bool,
    use_min_p: bool,
) -> jax.Array:
    """Tempered, filtered logits (filtered entries are -inf). logits: float32[B, V]."""
    x = logits / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(x, top_k)[0][:, -1:]  # [B, 1]
        x = jnp.where(x < kth, -jnp.inf, x)
    if use_min_p:
        probs = jax.nn.softmax(x, axis=-1)
        threshold = min_p * jnp.max(probs, axis=-1, keepdims=True)
        x = jnp.where(probs < threshold, -jnp.inf, x)
    if use_top_p:
        order = jnp.argsort(-x, axis=-1)  # [B, V]
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass
        # strictly before it is below top_p.
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < top_p
        keep = (
            jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        )
        x = jnp.where(keep, x, -jnp.inf)
    return x


def sample_tokens(
    key: jax.Array,
    logits: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    *,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
    use_min_p: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one token per row.

    Args:
      key: one PRNG key, or one key per row (typed keys of shape [B]); with per-row keys a
        row's draw depends on its own key only, not on the rest of the batch.

    Returns:
      tokens int32[B], their untempered log-probs float32[B], and their log-probs under the
      distribution sampled from float32[B] (0 for greedy).
    """
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)  # [B, 1]
    if greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        policy_lp = _take(logits, tokens) - _logsumexp(logits, top)
        return tokens, policy_lp, jnp.zeros(tokens.shape, jnp.float32)
    if key.ndim == 0:
        uniform = jax.random.uniform(key, (logits.shape[0],))
    else:
        uniform = jax.vmap(lambda k: jax.random.uniform(k, ()))(key)

    def draw(x: jax.Array, x_top: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        tokens, log_mass = categorical_inverse_cdf(x, uniform, top=x_top)
        return tokens, _take(x, tokens) - log_mass, log_mass

    def tempered() -> tuple[jax.Array, jax.Array, jax.Array]:
        filtered = filter_logits(
            logits,
            temperature,
            top_p,
            min_p,
            top_k=top_k,
            use_top_p=use_top_p,
            use_min_p=use_min_p,
        )
        # Every filter keeps the largest logit, and dividing by T > 0 keeps the order: the
        # filtered maximum is the untempered one over T (the same float, rounding being
        # monotone), so it needs no pass of its own.
        tokens, sampled_lp, _ = draw(filtered, top / jnp.maximum(temperature, 1e-6))
        return tokens, sampled_lp, _logsumexp(logits, top)

    def untempered() -> tuple[jax.Array, jax.Array, jax.Array]:
        # T == 1 and nothing filtered: the sampled distribution is the policy, and one pass
        # over the vocabulary gives both the draw and the policy's normaliser.
        return draw(logits, top)

    if top_k or use_top_p or use_min_p:
        tokens, sampled_lp, policy_lse = tempered()
    else:
        tokens, sampled_lp, policy_lse = jax.lax.cond(temperature == 1.0, untempered, tempered)
    return tokens, _take(logits, tokens) - policy_lse, sampled_lp


def _logsumexp(x: jax.Array, top: jax.Array) -> jax.Array:
    """logsumexp over the last axis given its max `top` [B, 1] (finite)."""
    return top[:, 0] + jnp.log(jnp.sum(jnp.exp(x - top), axis=-1))


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, index[:, None], axis=-1)[:, 0]


def _first_true(x: jax.Array) -> jax.Array:
    return jnp.argmax(x, axis=-1).astype(jnp.int32)


def _last_true(x: jax.Array) -> jax.Array:
    return (x.shape[-1] - 1 - jnp.argmax(x[..., ::-1], axis=-1)).astype(jnp.int32)


def cdf_chunk(V: int, lo: int = 64, hi: int = 1024) -> int:
    """The first-level chunk for a vocabulary of V: a divisor of V in [lo, hi] nearest
    sqrt(V) (no padding copy), else 512 (the logits are padded)."""
    divisors = [d for d in range(lo, min(hi, V) + 1) if V % d == 0]
    if not divisors:
        return 512
    return min(divisors, key=lambda d: abs(d * d - V))


def categorical_inverse_cdf(
    logits: jax.Array,
    uniform: jax.Array,
    chunk: int | None = None,
    *,
    top: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Draw one index per row from softmax(logits) by inverting its CDF at `uniform`.

    One uniform number per row instead of `jax.random.categorical`'s Gumbel noise over the
    whole vocabulary: for 64 rows x 152k logits on CPU, drawing 10M random numbers per token
    cost more than the rest of the sampling. The CDF is searched in two levels: the masses
    of chunks of the vocabulary (one fused pass: no probability array is written), then the
    chosen chunk, whose probabilities are recomputed. The index is clamped to entries of
    non-zero probability, so a filtered (-inf) entry is never drawn, whatever the rounding.

    Args:
      logits: float32[B, V]; -inf entries have probability 0 (at least one is finite).
      uniform: float32[B] in [0, 1).
      chunk: first-level chunk size (default `cdf_chunk(V)`); a chunk that does not divide
        V pads a copy of the logits.
      top: float32[B, 1], the row maxima of `logits` when the caller has them.

    Returns:
      int32[B] indices, and float32[B] log of the normaliser: log-prob of index i is
      logits[i] - it.
    """
    B, V = logits.shape
    chunk = cdf_chunk(V) if chunk is None else chunk
    if top is None:
        top = jnp.max(logits, axis=-1, keepdims=True)
    n_chunks = -(-V // chunk)
    z = logits - top  # [B, V], <= 0
    if n_chunks * chunk != V:
        z = jnp.pad(z, ((0, 0), (0, n_chunks * chunk - V)), constant_values=-jnp.inf)
    z = z.reshape(B, n_chunks, chunk)
    mass = jnp.sum(jnp.exp(z), axis=-1)  # [B, n_chunks], unnormalised
    cum = jnp.cumsum(mass, axis=-1)
    total = cum[:, -1]
    target = uniform * total
    c = jnp.sum(cum <= target[:, None], axis=-1).astype(jnp.int32)  # first cum > target
    nonzero = mass > 0
    c = jnp.clip(c, _first_true(nonzero), _last_true(nonzero))
    within = jnp.exp(jnp.take_along_axis(z, c[:, None, None], axis=1)[:, 0])  # [B, chunk]
    rest = target - _take(cum - mass, c)
    j = jnp.sum(jnp.cumsum(within, axis=-1) <= rest[:, None], axis=-1).astype(jnp.int32)
    nonzero = within > 0
    j = jnp.clip(j, _first_true(nonzero), _last_true(nonzero))
    return c * chunk + j, top[:, 0] + jnp.log(total)
