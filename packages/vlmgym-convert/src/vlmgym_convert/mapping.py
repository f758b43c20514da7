"""The one table between HF tensor names and vlm-gym weight names, with both directions,
for every family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the rules follow the config's switches).

Each rule names an HF tensor (with `{i}` for a layer index), the vlm-gym weight it fills
(layer-stacked weights get one HF tensor per layer) and how the layout changes:

* `copy`: the same array (embeddings, norms).
* `flat`: a 1-D HF tensor reshaped (biases: [N*H] -> [N, H]).
* `linear`: a torch Linear weight [out, in] transposed to vlm-gym's [in..., out...]; the
  rule records how many leading vlm-gym dims are the input (e.g. o_proj [N, H, D] has 2).
* `conv`: the Conv3d patch embedding [E, C, T, p, p] as a matmul [C*T*p*p, E].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig

Kind = Literal["copy", "flat", "linear", "conv"]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF name, with "{i}" for the layer index when `layered`
    ours: str  # dotted vlm-gym weight name
    kind: Kind
    n_in: int = 1  # for `linear`: leading input dims of the vlm-gym layout
    layered: bool = False

    def hf_names(self, num_layers: int) -> list[str]:
        return [self.hf.format(i=i) for i in range(num_layers)] if self.layered else [self.hf]


def _text_rules(config: Qwen2_5_VLConfig) -> list[Rule]:
    t = "model.layers.{i}."
    out = [
        Rule("model.embed_tokens.weight", "text.embed", "copy"),
        Rule("model.norm.weight", "text.norm", "copy"),
        Rule(t + "input_layernorm.weight", "text.layers.input_norm", "copy", layered=True),
        Rule(t + "self_attn.q_proj.weight", "text.layers.q_proj", "linear", layered=True),
        Rule(t + "self_attn.k_proj.weight", "text.layers.k_proj", "linear", layered=True),
        Rule(t + "self_attn.v_proj.weight", "text.layers.v_proj", "linear", layered=True),
        Rule(t + "self_attn.o_proj.weight", "text.layers.o_proj", "linear", 2, layered=True),
        Rule(t + "post_attention_layernorm.weight", "text.layers.post_norm", "copy", layered=True),
        Rule(t + "mlp.gate_proj.weight", "text.layers.gate_proj", "linear", layered=True),
        Rule(t + "mlp.up_proj.weight", "text.layers.up_proj", "linear", layered=True),
        Rule(t + "mlp.down_proj.weight", "text.layers.down_proj", "linear", layered=True),
    ]
    if config.text.attention_bias:
        out += [
            Rule(t + f"self_attn.{x}_proj.bias", f"text.layers.{x}_bias", "flat", layered=True)
            for x in "qkv"
        ]
    if config.text.qk_norm:
        out += [
            Rule(t + f"self_attn.{x}_norm.weight", f"text.layers.{x}_norm", "copy", layered=True)
            for x in "qk"
        ]
    if not config.text.tie_word_embeddings:
        out.append(Rule("lm_head.weight", "text.lm_head", "linear"))
    return out


def _linear(hf: str, ours: str, layered: bool = False, n_in: int = 1) -> list[Rule]:
    """A Linear's weight and bias (`x_proj` -> `x_bias`, otherwise `x` -> `x_bias`)."""
    bias = ours.removesuffix("_proj") + "_bias"
    return [
        Rule(hf + ".weight", ours, "linear", n_in, layered=layered),
        Rule(hf + ".bias", bias, "copy", layered=layered),
    ]


def _vision_rules(config: Qwen2_5_VLConfig) -> list[Rule]:
    vc = config.vision
    v = "visual.blocks.{i}."
    out = [
        Rule("visual.patch_embed.proj.weight", "vision.patch_embed", "conv"),
        Rule(v + "norm1.weight", "vision.blocks.norm1", "copy", layered=True),
        Rule(v + "attn.qkv.weight", "vision.blocks.qkv_proj", "linear", layered=True),
        Rule(v + "attn.qkv.bias", "vision.blocks.qkv_bias", "flat", layered=True),
        Rule(v + "attn.proj.weight", "vision.blocks.o_proj", "linear", 2, layered=True),
        Rule(v + "attn.proj.bias", "vision.blocks.o_bias", "copy", layered=True),
        Rule(v + "norm2.weight", "vision.blocks.norm2", "copy", layered=True),
    ]
    if vc.norm == "layer":
        out += [
            Rule(v + f"norm{n}.bias", f"vision.blocks.norm{n}_bias", "copy", layered=True)
            for n in (1, 2)
        ]
    names = config.hf_naming
    if vc.gated_mlp:  # Qwen2.5-VL's SwiGLU; otherwise fc1 -> act -> fc2
        for x in ("gate", "up", "down"):
            out += _linear(v + f"mlp.{x}_proj", f"vision.blocks.{x}_proj", layered=True)
    else:
        out += _linear(v + f"mlp.{names.vision_fc}1", "vision.blocks.up_proj", layered=True)
        out += _linear(v + f"mlp.{names.vision_fc}2", "vision.blocks.down_proj", layered=True)
    if vc.patch_bias:
        out.append(Rule("visual.patch_embed.proj.bias", "vision.patch_bias", "copy"))
    if vc.num_position_embeddings:
        out.append(Rule("visual.pos_embed.weight", "vision.pos_embed", "copy"))
    m = "visual.merger."
    out += [
        Rule(m + f"{names.merger_norm}.weight", "vision.merger_norm", "copy"),
        *_linear(m + names.merger_fc[0], "vision.merger_fc1"),
        *_linear(m + names.merger_fc[1], "vision.merger_fc2"),
    ]
    if vc.norm == "layer":
        out.append(Rule(m + f"{names.merger_norm}.bias", "vision.merger_norm_bias", "copy"))
    d = "visual.deepstack_merger_list.{i}."
    if vc.deepstack_visual_indexes:
        out += [
            Rule(d + "norm.weight", "vision.deepstack.norm", "copy", layered=True),
            Rule(d + "norm.bias", "vision.deepstack.norm_bias", "copy", layered=True),
            *_linear(d + "linear_fc1", "vision.deepstack.fc1", layered=True),
            *_linear(d + "linear_fc2", "vision.deepstack.fc2", layered=True),
        ]
    return out


def rules(config: Qwen2_5_VLConfig) -> list[Rule]:
    """Every tensor of a checkpoint of the config's family, in the canonical HF naming
    (`model.layers...`, `visual...`; see `canonical_hf_name` and `published_hf_name`)."""
    return _text_rules(config) + _vision_rules(config)


def published_hf_name(name: str, config: Qwen2_5_VLConfig) -> str:
    """The name a canonical tensor has in the family's published checkpoints: Qwen3-VL's
    are under `model.language_model.` and `model.visual.`; older families keep the
    canonical names (transformers 5 maps them when loading)."""
    return module_hf_name(name) if config.hf_naming.nested else name


def module_hf_name(name: str) -> str:
    """A canonical name as transformers (>= 4.52) names the module or parameter, in every
    family: the decoder under `model.language_model.`, the vision tower under
    `model.visual.` (`canonical_hf_name` is the inverse)."""
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    if name.startswith("visual."):
        return "model." + name
    return name


def canonical_hf_name(name: str) -> str:
    """Map transformers>=4.52 module names to the published checkpoint names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual.") :]
    return name


def hf_shape(rule: Rule, ours: tuple[int, ...], config: Qwen2_5_VLConfig) -> tuple[int, ...]:
    """The HF tensor shape that corresponds to one (per-layer) vlm-gym weight shape."""
    if rule.kind == "copy":
        return ours
    if rule.kind == "flat":
        return (math.prod(ours),)
    if rule.kind == "linear":
        return (math.prod(ours[rule.n_in :]), math.prod(ours[: rule.n_in]))
    vc = config.vision
    return (ours[1], vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size)


def to_ours(rule: Rule, arr: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    """HF layout -> vlm-gym layout (shapes already checked)."""
    if rule.kind in ("copy", "flat"):
        return arr.reshape(ours)
    if rule.kind == "linear":
        return arr.T.reshape(ours)
    return arr.reshape(arr.shape[0], -1).T


def to_hf(rule: Rule, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """vlm-gym layout -> HF layout `shape`."""
    if rule.kind in ("copy", "flat"):
        return arr.reshape(shape)
    if rule.kind == "linear":
        return arr.reshape(shape[1], shape[0]).T
    return arr.T.reshape(shape)
