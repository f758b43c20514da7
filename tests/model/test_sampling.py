"""The sampling engine on a tiny random model: log-probs, sampling statistics, stops, compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_model import Qwen2_5_VLConfig, init_random_params
from vlmgym_model.qwen2_5_vl.decoding import _write_slot, prefill
from vlmgym_model.qwen2_5_vl.model import ModelInputs, forward_tokens
from vlmgym_model.sampling import Sampler, SamplingParams
from vlmgym_model.sampling_math import categorical_inverse_cdf, cdf_chunk, sample_tokens

RAW = {
    "model_type": "qwen2_5_vl",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
    "image_token_id": 60,
    "video_token_id": 61,
    "vision_start_token_id": 62,
    "vision_end_token_id": 63,
    "eos_token_id": 1,
    "vision_config": {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_heads": 2,
        "out_hidden_size": 32,
        "fullatt_block_indexes": [0],
    },
}


@pytest.fixture(scope="module")
def model():
    config = Qwen2_5_VLConfig.from_hf_dict(RAW)
    params = init_random_params(config, jax.random.key(0), scale=0.3)
    return config, params


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model[0], stop_token_ids=[1], length_buckets=(16, 32))


def prompts(rng, lengths, T=None):
    T = T or max(lengths)
    ids = np.zeros((len(lengths), T), np.int32)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, T - n :] = rng.integers(2, 60, n)
        mask[b, T - n :] = 1
    return ids, mask


def test_logprobs_equal_teacher_forced_forward(model, sampler, tol):
    config, params = model
    ids, mask = prompts(np.random.default_rng(0), [9, 5])
    sp = SamplingParams(max_new_tokens=10, temperature=0.8, top_k=20, num_samples=3)
    with jax.default_matmul_precision("highest"):
        gen = sampler.generate_ids(params, ids, mask, sp, jax.random.key(1), decode_text=False)
        for b in range(2):
            prompt = ids[b][mask[b] == 1]
            for s in gen.samples[b]:
                seq = np.concatenate([prompt, s.tokens])[None]
                pos = np.broadcast_to(np.arange(seq.shape[1]), (3, 1, seq.shape[1]))
                inputs = ModelInputs(ids=seq, segment_ids=np.ones_like(seq), positions=pos)
                logits = forward_tokens(params, inputs, config=config)
                logits = np.asarray(logits)[0]
                logp = jax.nn.log_softmax(logits[len(prompt) - 1 : -1], axis=-1)
                ref = np.take_along_axis(np.asarray(logp), s.tokens[:, None], axis=-1)[:, 0]
                np.testing.assert_allclose(s.logprobs, ref, atol=tol["float32"], rtol=0)
                # the sampled-from distribution is tempered and filtered: it differs
                assert not np.allclose(s.sampling_logprobs, s.logprobs, atol=1e-3)


def test_group_samples_share_the_prompt_cache(model):
    """A prompt's keys and values are stored once for its samples, not copied to each."""
    config, params = model
    P, T, n, N = 2, 7, 3, 5
    x = jax.random.normal(jax.random.key(0), (P, T, config.text.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(T), (3, P, T))
    logits, cache = prefill(
        params.text, config, x, jnp.ones((P, T), jnp.int32), pos, N, num_samples=n
    )
    K, H = config.text.num_key_value_heads, config.text.head_dim
    assert logits.shape == (P, config.text.vocab_size)
    assert len(cache.prompt_k) == len(cache.k) == config.text.num_hidden_layers
    assert cache.prompt_k[0].shape == cache.prompt_v[0].shape == (P, K, T, H)
    assert cache.k[0].shape == cache.v[0].shape == (P * n, K, N, H)


def test_same_key_same_samples_other_key_other_samples(model, sampler):
    _, params = model
    ids, mask = prompts(np.random.default_rng(2), [6, 6])
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=2)
    a = sampler.generate_ids(params, ids, mask, sp, jax.random.key(5), decode_text=False)
    b = sampler.generate_ids(params, ids, mask, sp, jax.random.key(5), decode_text=False)
    c = sampler.generate_ids(params, ids, mask, sp, jax.random.key(6), decode_text=False)
    flat = lambda g: np.concatenate([s.tokens for grp in g.samples for s in grp])  # noqa: E731
    np.testing.assert_array_equal(flat(a), flat(b))
    assert not np.array_equal(flat(a), flat(c))
    # the samples of one group differ from each other
    assert not np.array_equal(a.samples[0][0].tokens, a.samples[0][1].tokens)


def test_stop_tokens_end_rows_independently(model):
    config, params = model
    ids, mask = prompts(np.random.default_rng(3), [7, 4, 6])
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    free = Sampler(config, stop_token_ids=[0], length_buckets=(16,))
    ref = free.generate_ids(params, ids, mask, greedy, jax.random.key(0), decode_text=False)
    row0 = ref.samples[0][0].tokens
    assert len(row0) == 12 and ref.samples[0][0].finish_reason == "length"
    stop = int(row0[3])
    first = int(np.flatnonzero(row0 == stop)[0])
    stopping = Sampler(config, stop_token_ids=[stop], length_buckets=(16,))
    gen = stopping.generate_ids(params, ids, mask, greedy, jax.random.key(0), decode_text=False)
    s0 = gen.samples[0][0]
    assert s0.finish_reason == "stop"
    np.testing.assert_array_equal(s0.tokens, row0[: first + 1])  # stop token is the last one
    assert len(s0.logprobs) == len(s0.tokens) == s0.length
    for b in (1, 2):
        other = ref.samples[b][0].tokens
        got = gen.samples[b][0]
        hit = np.flatnonzero(other == stop)
        expected = other[: hit[0] + 1] if hit.size else other
        np.testing.assert_array_equal(got.tokens, expected)
        assert got.finish_reason == ("stop" if hit.size else "length")


def test_no_recompilation_within_buckets(model):
    config, params = model
    s = Sampler(config, stop_token_ids=[1], length_buckets=(16, 32), batch_buckets=(4, 8))
    sp = SamplingParams(max_new_tokens=4, temperature=1.0, num_samples=2)
    rng = np.random.default_rng(4)
    for lengths in ([5, 9], [12, 3, 7], [16], [2, 2, 2, 2]):
        ids, mask = prompts(rng, lengths)
        s.generate_ids(params, ids, mask, sp, jax.random.key(0), decode_text=False)
    assert s.compilations == {"prefill": 1, "decode": 1}
    ids, mask = prompts(rng, [20])  # the next length bucket
    s.generate_ids(params, ids, mask, sp, jax.random.key(0), decode_text=False)
    assert s.compilations == {"prefill": 2, "decode": 2}


def test_prompt_longer_than_buckets_is_refused(model):
    config, params = model
    s = Sampler(config, stop_token_ids=[1], length_buckets=(16,))
    ids, mask = prompts(np.random.default_rng(0), [17])
    with pytest.raises(ValueError, match="prompt length 17 exceeds the largest bucket 16"):
        s.generate_ids(params, ids, mask, SamplingParams(max_new_tokens=2), jax.random.key(0))


# ---------------------------------------------------------------- sampling statistics

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
DRAWS = 40_000


def expected_probs(temperature, top_k=0, top_p=1.0, min_p=0.0):
    """Independent numpy statement of the filters."""
    x = LOGITS / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = np.ones_like(p, bool)
    if top_k:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    if min_p:
        keep &= p >= min_p * p.max()
    q = np.where(keep, p, 0)
    q /= q.sum()
    if top_p < 1:
        order = np.argsort(-q)
        mass_before = np.cumsum(q[order]) - q[order]
        keep2 = np.zeros_like(keep)
        keep2[order] = mass_before < top_p
        q = np.where(keep2, q, 0)
        q /= q.sum()
    return q


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=1.0),
        dict(temperature=0.5),
        dict(temperature=1.7),
        dict(temperature=1.0, top_k=3),
        dict(temperature=1.0, top_p=0.7),
        dict(temperature=1.3, min_p=0.2),
        dict(temperature=0.9, top_k=5, top_p=0.8),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_sampled_frequencies_match_the_distribution(kw):
    q = expected_probs(**kw)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, len(LOGITS)))
    tokens, policy_lp, sampled_lp = sample_tokens(
        jax.random.key(0),
        logits,
        jnp.float32(kw["temperature"]),
        jnp.float32(kw.get("top_p", 1.0)),
        jnp.float32(kw.get("min_p", 0.0)),
        greedy=False,
        top_k=kw.get("top_k", 0),
        use_top_p="top_p" in kw,
        use_min_p="min_p" in kw,
    )
    counts = np.bincount(np.asarray(tokens), minlength=len(LOGITS))
    assert counts[q == 0].sum() == 0, "a filtered token was sampled"
    support = q > 0
    expected = q[support] * DRAWS
    chi2 = (((counts[support] - expected) ** 2) / expected).sum()
    # 99.9% quantile of chi-square with up to 7 degrees of freedom is 24.3
    assert chi2 < 24.3, (counts, expected)
    tok = np.asarray(tokens)
    np.testing.assert_allclose(np.asarray(sampled_lp), np.log(q[tok]), atol=1e-5)
    log_softmax = LOGITS - np.log(np.exp(LOGITS).sum())
    np.testing.assert_allclose(np.asarray(policy_lp), log_softmax[tok], atol=1e-5)


@pytest.mark.parametrize("chunk", [512, None], ids=["padded", "divisor"])
def test_inverse_cdf_across_chunks(chunk):
    """A vocabulary of several CDF chunks: frequencies, -inf entries, and the ends of [0, 1)."""
    V = 1300
    support = np.array([3, 511, 512, 1030, 1299])  # chunk edges on both sides
    logits = np.full(V, -np.inf, np.float32)
    logits[support] = [0.0, 1.0, 0.5, -0.5, 0.2]
    q = np.exp(logits[support]) / np.exp(logits[support]).sum()
    uniform = jax.random.uniform(jax.random.key(0), (DRAWS,))
    batch = jnp.broadcast_to(jnp.asarray(logits), (DRAWS, V))
    tokens, log_mass = jax.jit(categorical_inverse_cdf, static_argnums=2)(batch, uniform, chunk)
    counts = np.bincount(np.asarray(tokens), minlength=V)
    assert counts.sum() == counts[support].sum(), "an entry of probability 0 was drawn"
    chi2 = (((counts[support] - q * DRAWS) ** 2) / (q * DRAWS)).sum()
    assert chi2 < 18.5, counts[support]  # 99.9% quantile, 4 degrees of freedom
    np.testing.assert_allclose(
        np.asarray(log_mass)[0], np.log(np.exp(logits[support]).sum()), rtol=1e-6
    )
    # the ends of [0, 1) land on the first and the last entry with probability > 0
    ends = jnp.asarray([0.0, np.nextafter(np.float32(1), np.float32(0))], jnp.float32)
    first_last, _ = categorical_inverse_cdf(jnp.asarray(np.stack([logits] * 2)), ends, chunk)
    np.testing.assert_array_equal(np.asarray(first_last), [3, 1299])


def test_cdf_chunk_divides_the_vocabulary_when_it_can():
    assert cdf_chunk(151936) == 128  # Qwen2.5's vocabulary: 2**7 * 1187
    assert cdf_chunk(1300) == 65
    assert cdf_chunk(65536) == 256
    assert cdf_chunk(1187) == 512  # prime: padded


def test_greedy_takes_the_argmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
    tokens, _, sampled_lp = sample_tokens(
        jax.random.key(0),
        logits,
        jnp.float32(0),
        jnp.float32(1),
        jnp.float32(0),
        greedy=True,
        top_k=0,
        use_top_p=False,
        use_min_p=False,
    )
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), axis=-1))
    assert not np.asarray(sampled_lp).any()


def test_invalid_sampling_params():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_write_is_exact_and_stays_in_its_dtype(dtype):
    """`_write_slot` writes one slot; a bf16 cache is never converted to f32 as a whole
    (XLA's CPU backend does that for a bf16 dynamic-update-slice, on every token)."""
    cache = jnp.arange(3 * 2 * 5 * 4, dtype=jnp.float32).reshape(3, 2, 5, 4).astype(dtype)
    update = jnp.full((3, 2, 1, 4), -1.5, jnp.float32)
    write = jax.jit(_write_slot)
    got = np.asarray(write(cache, update, jnp.int32(2)).astype(jnp.float32))
    want = np.array(cache.astype(jnp.float32))
    want[:, :, 2] = -1.5
    np.testing.assert_array_equal(got, want)
    hlo = write.lower(cache, update, jnp.int32(2)).compile().as_text()
    assert "f32[3,2,5,4]" not in hlo or dtype == jnp.float32, hlo
    if dtype == jnp.bfloat16:  # the counter-check: the plain update converts the buffer
        plain = jax.jit(
            lambda c, u, i: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (0, 0, i, 0))
        )
        assert "f32[3,2,5,4]" in plain.lower(cache, update, jnp.int32(2)).compile().as_text()
