"""Qwen-VL configs to and from the `config.json` layouts in the wild, per family.

Published checkpoints write the text fields flat (Qwen2-VL, Qwen2.5-VL) or under
`text_config` (Qwen3-VL), rotary settings under `rope_scaling` or `rope_parameters`, and
Qwen2-VL's vision width as `embed_dim` (its `hidden_size` is the merger's output). Each
family's defaults are transformers' own where a field is left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vlmgym_model.qwen2_5_vl.config import (
    Qwen2_5_VLConfig,
    TextConfig,
    VisionConfig,
    _require,
)


@dataclasses.dataclass(frozen=True)
class HFNaming:
    """The HF module names that differ between families for the same architecture part
    (the converter's table reads them, so it needs no family branches)."""

    vision_fc: str  # prefix of the two-layer vision MLP: "fc" (fc1, fc2) or "linear_fc"
    merger_norm: str  # the merger's norm: "ln_q" or "norm"
    merger_fc: tuple[str, str]  # the merger's two Linears
    nested: bool  # published tensors live under model.language_model. / model.visual.


HF_NAMING = {
    "qwen2_vl": HFNaming("fc", "ln_q", ("mlp.0", "mlp.2"), nested=False),
    "qwen2_5_vl": HFNaming("fc", "ln_q", ("mlp.0", "mlp.2"), nested=False),
    "qwen3_vl": HFNaming("linear_fc", "norm", ("linear_fc1", "linear_fc2"), nested=True),
}


def _pick(raw: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    return default


# Each family's mRoPE defaults where config.json leaves them out (transformers' own).
_MROPE_DEFAULTS = {"qwen2_vl": (16, 24, 24), "qwen2_5_vl": (16, 24, 24), "qwen3_vl": (24, 20, 20)}


def text_config_from_hf(raw: Mapping[str, Any], family: str) -> TextConfig:
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        if raw.get(k) is None
    ]
    _require(not missing, f"text config is missing required fields: {', '.join(missing)}")
    rope = _pick(raw, "rope_parameters", "rope_scaling", default={}) or {}
    _require(isinstance(rope, Mapping), f"rope_scaling must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "mrope"))
    _require(
        rope_type in ("mrope", "default"),
        f"rope type {rope_type!r} is not supported (Qwen-VL models use mrope)",
    )
    section = rope.get("mrope_section", _MROPE_DEFAULTS[family])
    qwen3 = family == "qwen3_vl"
    theta = _pick(rope, "rope_theta", default=None)
    if theta is None:
        theta = _pick(raw, "rope_theta", default=500_000.0 if qwen3 else 1_000_000.0)
    num_heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    if qwen3:
        head_dim = head_dim or 128  # transformers' Qwen3-VL default
    elif head_dim is not None:
        _require(
            head_dim * num_heads == raw["hidden_size"],
            f"head_dim={head_dim} * num_attention_heads={num_heads} != hidden_size="
            f"{raw['hidden_size']}; {family} ties head_dim to hidden_size / heads",
        )
    return TextConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=_pick(raw, "num_key_value_heads", default=num_heads),
        rms_norm_eps=float(_pick(raw, "rms_norm_eps", default=1e-6)),
        rope_theta=float(theta),
        mrope_section=tuple(int(s) for s in section),
        tie_word_embeddings=bool(_pick(raw, "tie_word_embeddings", default=False)),
        max_position_embeddings=int(_pick(raw, "max_position_embeddings", default=128_000)),
        hidden_act=_pick(raw, "hidden_act", default="silu"),
        head_dim=int(head_dim or 0),
        attention_bias=bool(_pick(raw, "attention_bias", default=not qwen3)),
        qk_norm=qwen3,
        mrope_interleaved=bool(rope.get("mrope_interleaved", qwen3)),
    )


def _vision_rope_theta(raw: Mapping[str, Any]) -> float:
    rope = _pick(raw, "rope_parameters", "rope_scaling", default={}) or {}
    _require(isinstance(rope, Mapping), f"vision rope_parameters must be an object, got {rope!r}")
    theta = _pick(rope, "rope_theta", default=None)
    if theta is None:
        theta = _pick(raw, "rope_theta", default=VisionConfig.rope_theta)
    return float(theta)


def _qwen2_5_vision(raw: Mapping[str, Any]) -> VisionConfig:
    defaults = VisionConfig()
    return VisionConfig(
        depth=_pick(raw, "depth", default=defaults.depth),
        hidden_size=_pick(raw, "hidden_size", "embed_dim", default=defaults.hidden_size),
        intermediate_size=_pick(raw, "intermediate_size", default=defaults.intermediate_size),
        num_heads=_pick(raw, "num_heads", default=defaults.num_heads),
        in_channels=_pick(raw, "in_channels", "in_chans", default=defaults.in_channels),
        out_hidden_size=_pick(raw, "out_hidden_size", default=defaults.out_hidden_size),
        patch_size=_pick(raw, "patch_size", "spatial_patch_size", default=defaults.patch_size),
        spatial_merge_size=_pick(raw, "spatial_merge_size", default=defaults.spatial_merge_size),
        temporal_patch_size=_pick(raw, "temporal_patch_size", default=defaults.temporal_patch_size),
        window_size=_pick(raw, "window_size", default=defaults.window_size),
        fullatt_block_indexes=tuple(
            _pick(raw, "fullatt_block_indexes", default=defaults.fullatt_block_indexes)
        ),
        tokens_per_second=float(
            _pick(raw, "tokens_per_second", default=defaults.tokens_per_second)
        ),
        hidden_act=_pick(raw, "hidden_act", default=defaults.hidden_act),
        rope_theta=_vision_rope_theta(raw),
    )


def _qwen2_vision(raw: Mapping[str, Any]) -> VisionConfig:
    """Qwen2-VL: the tower's width is `embed_dim`; `hidden_size` is the merger's output."""
    width = int(_pick(raw, "embed_dim", default=1280))
    return VisionConfig(
        depth=_pick(raw, "depth", default=32),
        hidden_size=width,
        intermediate_size=int(width * _pick(raw, "mlp_ratio", default=4)),
        num_heads=_pick(raw, "num_heads", default=16),
        in_channels=_pick(raw, "in_channels", "in_chans", default=3),
        out_hidden_size=_pick(raw, "hidden_size", default=3584),
        patch_size=_pick(raw, "patch_size", "spatial_patch_size", default=14),
        spatial_merge_size=_pick(raw, "spatial_merge_size", default=2),
        temporal_patch_size=_pick(raw, "temporal_patch_size", default=2),
        window_size=0,
        fullatt_block_indexes=(),
        hidden_act=_pick(raw, "hidden_act", default="quick_gelu"),
        rope_theta=_vision_rope_theta(raw),
        norm="layer",
    )


def _qwen3_vision(raw: Mapping[str, Any]) -> VisionConfig:
    return VisionConfig(
        depth=_pick(raw, "depth", default=27),
        hidden_size=_pick(raw, "hidden_size", default=1152),
        intermediate_size=_pick(raw, "intermediate_size", default=4304),
        num_heads=_pick(raw, "num_heads", default=16),
        in_channels=_pick(raw, "in_channels", "in_chans", default=3),
        out_hidden_size=_pick(raw, "out_hidden_size", default=3584),
        patch_size=_pick(raw, "patch_size", default=16),
        spatial_merge_size=_pick(raw, "spatial_merge_size", default=2),
        temporal_patch_size=_pick(raw, "temporal_patch_size", default=2),
        window_size=0,
        fullatt_block_indexes=(),
        hidden_act=_pick(raw, "hidden_act", default="gelu_pytorch_tanh"),
        rope_theta=_vision_rope_theta(raw),
        norm="layer",
        patch_bias=True,
        num_position_embeddings=_pick(raw, "num_position_embeddings", default=2304),
        deepstack_visual_indexes=tuple(_pick(raw, "deepstack_visual_indexes", default=(8, 16, 24))),
    )


VISION_READERS = {
    "qwen2_vl": _qwen2_vision,
    "qwen2_5_vl": _qwen2_5_vision,
    "qwen3_vl": _qwen3_vision,
}


def _vision_common(v: VisionConfig) -> dict[str, Any]:
    return {
        "depth": v.depth,
        "num_heads": v.num_heads,
        "in_chans": v.in_channels,
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "temporal_patch_size": v.temporal_patch_size,
        "hidden_act": v.hidden_act,
    }


def _write_qwen2_5_vision(v: VisionConfig) -> dict[str, Any]:
    return {
        **_vision_common(v),
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "out_hidden_size": v.out_hidden_size,
        "spatial_patch_size": v.patch_size,
        "window_size": v.window_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes),
        # an int where it is one: transformers 5's strict config class wants an int
        "tokens_per_second": int(v.tokens_per_second)
        if float(v.tokens_per_second).is_integer()
        else v.tokens_per_second,
    }


def _write_qwen2_vision(v: VisionConfig) -> dict[str, Any]:
    _require(
        v.intermediate_size % v.hidden_size == 0,
        f"Qwen2-VL writes the vision MLP as embed_dim * mlp_ratio: {v.intermediate_size} is "
        f"not a multiple of {v.hidden_size}",
    )
    return {
        **_vision_common(v),
        "embed_dim": v.hidden_size,
        "hidden_size": v.out_hidden_size,
        "mlp_ratio": v.intermediate_size // v.hidden_size,
        "spatial_patch_size": v.patch_size,
    }


def _write_qwen3_vision(v: VisionConfig) -> dict[str, Any]:
    return {
        **_vision_common(v),
        "model_type": "qwen3_vl_vision",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "out_hidden_size": v.out_hidden_size,
        "num_position_embeddings": v.num_position_embeddings,
        "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
    }


VISION_WRITERS = {
    "qwen2_vl": _write_qwen2_vision,
    "qwen2_5_vl": _write_qwen2_5_vision,
    "qwen3_vl": _write_qwen3_vision,
}


def write_hf_dict(config: Qwen2_5_VLConfig) -> dict[str, Any]:
    """`config` as the family's published `config.json` (see `Qwen2_5_VLConfig.to_hf_dict`)."""

    t = config.text
    text = {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "tie_word_embeddings": t.tie_word_embeddings,
        "max_position_embeddings": t.max_position_embeddings,
        "hidden_act": t.hidden_act,
        "attention_dropout": 0.0,
    }
    ids: dict[str, Any] = {
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
    }
    if config.bos_token_id is not None:
        ids["bos_token_id"] = config.bos_token_id
    if config.eos_token_id is not None:
        eos = config.eos_token_id
        ids["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
    architecture = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen3_vl": "Qwen3VLForConditionalGeneration",
    }[config.model_type]
    head = {"architectures": [architecture], "model_type": config.model_type}
    vision = VISION_WRITERS[config.model_type](config.vision)
    if config.vision.rope_theta != VisionConfig.rope_theta:
        # Written only when it differs from the default every transformers version assumes.
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": config.vision.rope_theta}
    if config.model_type != "qwen3_vl":
        mrope = {"type": "mrope", "mrope_section": list(t.mrope_section)}
        return {
            **head,
            **text,
            "rope_scaling": mrope,
            "use_sliding_window": False,
            **ids,
            "vision_config": vision,
        }
    text.update(
        model_type="qwen3_vl_text",
        head_dim=t.head_dim,
        attention_bias=t.attention_bias,
        rope_scaling={
            "rope_type": "default",
            "mrope_section": list(t.mrope_section),
            "mrope_interleaved": t.mrope_interleaved,
        },
        **ids,
    )
    return {
        **head,
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": t.tie_word_embeddings,
        **ids,
    }
