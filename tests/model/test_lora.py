"""LoRA adapters (`vlmgym_model.lora`): step 0 is the base model, the low-rank path equals
the merged weight, every target reaches the forward pass, bad settings are one-line errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_model import Qwen2_5_VLConfig, forward, init_random_params, param_specs
from vlmgym_model.lora import (
    LoraConfig,
    LoraPair,
    flatten_adapters,
    init_adapters,
    merge_adapters,
    unflatten_adapters,
    with_adapters,
)
from vlmgym_model.tiny import tiny_config_dict

VOCAB = {f"w{i}": i for i in range(30)}
for _name in ("<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|video_pad|>",
              "<|vision_start|>", "<|vision_end|>"):  # fmt: skip
    VOCAB[_name] = len(VOCAB)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def model(request):
    config = Qwen2_5_VLConfig.from_hf_dict(tiny_config_dict(VOCAB, family=request.param))
    params = init_random_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    merge = config.vision.spatial_merge_size
    grid = np.array([[1, 2 * merge, 2 * merge]])
    n_tokens = int(grid.prod()) // merge**2
    ids = rng.integers(0, 30, (2, 12)).astype(np.int32)
    ids[0, 2 : 2 + n_tokens] = config.image_token_id
    pixels = rng.normal(size=(int(grid.prod()), config.vision.patch_dim)).astype(np.float32)
    return config, params, (ids, None, pixels, grid)


def _randomise(adapters, seed: int = 1, scale: float = 0.05):
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(adapters)))
    return {
        p: LoraPair(pair.a, scale * jax.random.normal(next(keys), pair.b.shape))
        for p, pair in adapters.items()
    }


def test_zero_init_is_the_base_model(model, tol):
    config, params, inputs = model
    cfg = LoraConfig(rank=4, alpha=8, targets=("all",))
    adapters = init_adapters(param_specs(config), cfg, jax.random.key(1))
    assert all(float(jnp.abs(p.b).max()) == 0 and float(jnp.abs(p.a).max()) > 0
               for p in adapters.values())  # fmt: skip
    base = forward(params, config, *inputs)
    adapted = forward(with_adapters(params, adapters, cfg), config, *inputs)
    # b = 0 adds exact zeros; only XLA's fusion of the different program can move a bit
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(base), atol=tol["float32"])


def test_low_rank_path_equals_merged_weights(model, tol):
    config, params, inputs = model
    cfg = LoraConfig(rank=4, alpha=8, targets=("all",))
    adapters = _randomise(init_adapters(param_specs(config), cfg, jax.random.key(1)))
    adapted = forward(with_adapters(params, adapters, cfg), config, *inputs)
    merged = forward(merge_adapters(params, adapters, cfg), config, *inputs)
    base = forward(params, config, *inputs)
    assert float(jnp.abs(adapted - base).max()) > 1e-2  # the adapters do something
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(merged), atol=tol["float32"])


@pytest.mark.parametrize("target", ["q_proj", "o_proj", "down_proj", "vision.qkv_proj",
                                    "vision.o_proj", "vision.up_proj"])  # fmt: skip
def test_each_target_reaches_the_forward_pass(model, target):
    config, params, inputs = model
    cfg = LoraConfig(rank=2, alpha=2, targets=(target,))
    adapters = _randomise(init_adapters(param_specs(config), cfg, jax.random.key(2)), scale=1.0)
    assert len(adapters) == 1
    out = forward(with_adapters(params, adapters, cfg), config, *inputs)
    assert float(jnp.abs(out - forward(params, config, *inputs)).max()) > 1e-3


def test_flat_round_trip_and_shapes(model):
    config, _, _ = model
    cfg = LoraConfig(rank=3, targets=("attention", "mlp"))
    adapters = init_adapters(param_specs(config), cfg, jax.random.key(0))
    L, D = config.text.num_hidden_layers, config.text.hidden_size
    N, H = config.text.num_attention_heads, config.text.head_dim
    assert adapters["text.layers.q_proj"].a.shape == (L, D, 3)
    assert adapters["text.layers.q_proj"].b.shape == (L, 3, N, H)
    assert adapters["text.layers.o_proj"].a.shape == (L, N, H, 3)
    assert not any(p.startswith("vision") for p in adapters)
    back = unflatten_adapters(flatten_adapters(adapters))
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    assert LoraConfig(rank=8, alpha=16).scale == 2.0
    assert LoraConfig(rank=16, alpha=16, use_rslora=True).scale == 4.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=-3), "rank must be a positive integer"),
        (dict(rank=4, alpha=0.0), "alpha must be a positive"),
        (dict(rank=4, targets=("qproj",)), "unknown LoRA target 'qproj'"),
        (dict(rank=4, targets=()), "no LoRA targets"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_unpaired_tensor_is_an_error():
    with pytest.raises(ValueError, match="lacks its b tensor"):
        unflatten_adapters({"text.layers.q_proj.a": np.zeros((1, 2, 2))})


def test_decode_layouts_agree_with_adapters(model, tol):
    """The sampler's two decode layouts (CPU copies with LoRA merged per layer; the stacked
    weights with LoRA unmerged) sample the same tokens with the same log-probs."""
    from vlmgym_model import Sampler, SamplingParams

    config, params, (ids, _, pixels, grid) = model
    cfg = LoraConfig(rank=4, alpha=8, targets=("attention", "mlp"))
    weights = with_adapters(params, _randomise(init_adapters(param_specs(config), cfg,
                                                             jax.random.key(5))), cfg)  # fmt: skip
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, num_samples=2)
    out = {}
    for layout in ("copies", "stacked"):
        sampler = Sampler(config, stop_token_ids=[config.text.vocab_size - 1], decode_layout=layout,
                          length_buckets=(16,))  # fmt: skip
        gen = sampler.generate_ids(
            weights,
            ids,
            np.ones_like(ids),
            sp,
            jax.random.key(0),
            pixel_values=pixels,
            image_grid_thw=grid,
            decode_text=False,
        )
        out[layout] = [s for group in gen.samples for s in group]
    for a, b in zip(out["copies"], out["stacked"], strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=tol["float32"])
