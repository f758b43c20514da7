"""Qwen2.5-VL architecture configs, read from (and written back to) HF `config.json`.

Two layouts of `config.json` occur in the wild and both load here:

* the flat one of the published checkpoints (Qwen/Qwen2.5-VL-*-Instruct): text fields at
  the top level, `vision_config` nested (with `in_chans`), and
  `rope_scaling: {"type": "mrope", "mrope_section": [16, 24, 24]}`;
* the nested one that transformers 5 writes: text fields under `text_config`, rotary
  settings under `rope_parameters` (or `rope_scaling`).

The configs hold architecture only: no mesh, no dtype policy, no training settings.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A `config.json` that does not describe a Qwen2.5-VL model we can build."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder: GQA attention with q/k/v biases, SwiGLU MLP, RMSNorm, mRoPE."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128_000
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0,
                f"text config: {name} must be a positive int, got {value!r}",
            )
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"text config: hidden_size={self.hidden_size} is not divisible by "
            f"num_attention_heads={self.num_attention_heads}",
        )
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"text config: num_attention_heads={self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={self.num_key_value_heads} (GQA needs whole groups)",
        )
        _require(
            self.head_dim % 2 == 0, f"text config: head_dim={self.head_dim} must be even for RoPE"
        )
        _require(
            len(self.mrope_section) == 3 and all(s >= 0 for s in self.mrope_section),
            f"text config: mrope_section must hold three non-negative ints (t, h, w), "
            f"got {self.mrope_section!r}",
        )
        _require(
            sum(self.mrope_section) == self.head_dim // 2,
            f"text config: mrope_section {list(self.mrope_section)} sums to "
            f"{sum(self.mrope_section)}, but head_dim // 2 = {self.head_dim // 2} rotary "
            "frequencies need a section each",
        )
        _require(self.rope_theta > 0, f"text config: rope_theta must be > 0, got {self.rope_theta}")
        _require(self.rms_norm_eps > 0, "text config: rms_norm_eps must be > 0")
        _require(
            self.hidden_act == "silu",
            f"text config: hidden_act={self.hidden_act!r} is not supported (Qwen2 uses 'silu')",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen2.5-VL vision tower: ViT with 2D RoPE, window attention and a 2x2 merger."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    out_hidden_size: int = 3584
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2.0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # the 2D vision rotary's base (HF: rope_parameters.rope_theta)

    def __post_init__(self) -> None:
        for name in (
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "in_channels",
            "out_hidden_size",
            "patch_size",
            "spatial_merge_size",
            "temporal_patch_size",
            "window_size",
        ):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0,
                f"vision config: {name} must be a positive int, got {value!r}",
            )
        _require(
            self.hidden_size % self.num_heads == 0,
            f"vision config: hidden_size={self.hidden_size} is not divisible by "
            f"num_heads={self.num_heads}",
        )
        _require(
            self.head_dim % 4 == 0,
            f"vision config: head_dim={self.head_dim} must be a multiple of 4 for 2D RoPE",
        )
        unit = self.patch_size * self.spatial_merge_size
        _require(
            self.window_size % unit == 0,
            f"vision config: window_size={self.window_size} must be a multiple of "
            f"patch_size * spatial_merge_size = {unit}",
        )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        _require(
            not bad,
            f"vision config: fullatt_block_indexes {bad} are outside the {self.depth} blocks",
        )
        _require(
            self.hidden_act == "silu",
            f"vision config: hidden_act={self.hidden_act!r} is not supported (Qwen2.5-VL uses "
            "'silu')",
        )
        _require(
            self.rope_theta > 0, f"vision config: rope_theta must be > 0, got {self.rope_theta}"
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Inputs of the Conv3d patch embedding: C * T * p * p (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LLM token (4)."""
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Merged units per window side: window_size / patch_size / spatial_merge_size (4)."""
        return self.window_size // self.patch_size // self.spatial_merge_size


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    """A whole Qwen2.5-VL model: text decoder, vision tower and special token ids."""

    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645

    def __post_init__(self) -> None:
        _require(
            self.vision.out_hidden_size == self.text.hidden_size,
            f"vision out_hidden_size={self.vision.out_hidden_size} must equal the text "
            f"hidden_size={self.text.hidden_size}: the merger feeds the decoder directly",
        )
        for name in ("image_token_id", "video_token_id", "vision_start_token_id"):
            value = getattr(self, name)
            _require(
                0 <= value < self.text.vocab_size,
                f"{name}={value} is outside the vocabulary (vocab_size={self.text.vocab_size})",
            )

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> Qwen2_5_VLConfig:
        """Build from the dict of an HF `config.json`, flat or nested layout."""
        _require(isinstance(raw, Mapping), "config.json must hold a JSON object")
        model_type = raw.get("model_type")
        _require(
            model_type in (None, "qwen2_5_vl"),
            f"config.json has model_type={model_type!r}; vlm-gym builds 'qwen2_5_vl' models",
        )
        text_raw: dict[str, Any] = dict(raw)
        nested = raw.get("text_config")
        if isinstance(nested, Mapping):
            # transformers 5 writes the text fields under text_config; top-level values (when
            # present, e.g. tie_word_embeddings) are only used where text_config lacks them.
            text_raw.update({k: v for k, v in nested.items() if v is not None})
        text = _text_config_from_hf(text_raw)
        vision_raw = raw.get("vision_config")
        _require(
            isinstance(vision_raw, Mapping),
            "config.json has no vision_config object; is this a Qwen2.5-VL checkpoint?",
        )
        vision = _vision_config_from_hf(vision_raw)
        ids: dict[str, Any] = {}
        for name in (
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
            "bos_token_id",
            "eos_token_id",
        ):
            value = raw.get(name, text_raw.get(name))
            if value is not None:
                ids[name] = tuple(value) if isinstance(value, list) else value
        return cls(text=text, vision=vision, **ids)

    @classmethod
    def from_file(cls, path: str | Path) -> Qwen2_5_VLConfig:
        """Read `config.json` (or the `config.json` inside a model directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        try:
            return cls.from_hf_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    # ------------------------------------------------------------------ writing

    def to_hf_dict(self) -> dict[str, Any]:
        """The published flat layout, which every transformers version since 4.49 loads."""
        t, v = self.text, self.vision
        out: dict[str, Any] = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "tie_word_embeddings": t.tie_word_embeddings,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": t.hidden_act,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_config": {
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "in_channels": v.in_channels,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": v.tokens_per_second,
                "hidden_act": v.hidden_act,
            },
        }
        if v.rope_theta != VisionConfig.rope_theta:
            # Written only when it differs from the default every transformers version assumes.
            out["vision_config"]["rope_parameters"] = {
                "rope_type": "axial",
                "rope_theta": v.rope_theta,
            }
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            out["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
        return out


def _pick(raw: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    return default


def _text_config_from_hf(raw: Mapping[str, Any]) -> TextConfig:
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
        f"rope type {rope_type!r} is not supported (Qwen2.5-VL uses mrope)",
    )
    section = rope.get("mrope_section")
    _require(
        section is not None,
        "text config has no mrope_section (expected rope_scaling.mrope_section, e.g. [16, 24, 24])",
    )
    theta = _pick(rope, "rope_theta", default=None)
    if theta is None:
        theta = _pick(raw, "rope_theta", default=1_000_000.0)
    num_heads = raw["num_attention_heads"]
    explicit_head_dim = raw.get("head_dim")
    if explicit_head_dim is not None:
        _require(
            explicit_head_dim * num_heads == raw["hidden_size"],
            f"head_dim={explicit_head_dim} * num_attention_heads={num_heads} != hidden_size="
            f"{raw['hidden_size']}; Qwen2.5-VL ties head_dim to hidden_size / heads",
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
    )


def _vision_config_from_hf(raw: Mapping[str, Any]) -> VisionConfig:
    defaults = VisionConfig()
    hidden = _pick(raw, "hidden_size", "embed_dim", default=defaults.hidden_size)
    rope = _pick(raw, "rope_parameters", "rope_scaling", default={}) or {}
    _require(isinstance(rope, Mapping), f"vision rope_parameters must be an object, got {rope!r}")
    theta = _pick(rope, "rope_theta", default=None)
    if theta is None:
        theta = _pick(raw, "rope_theta", default=defaults.rope_theta)
    return VisionConfig(
        depth=_pick(raw, "depth", default=defaults.depth),
        hidden_size=hidden,
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
        rope_theta=float(theta),
    )
