"""vlm-gym LoRA adapters -> a PEFT LoRA checkpoint that `peft.PeftModel` loads on HF's model.

    OUT/adapter_config.json         r, lora_alpha, use_rslora, target_modules (a regex), ...
    OUT/adapter_model.safetensors   base_model.model.<module>.lora_A.weight  [r, in]
                                    base_model.model.<module>.lora_B.weight  [out, r]

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(HF_BASE)
    model = peft.PeftModel.from_pretrained(base, OUT)   # logits equal vlm-gym's adapted model

Per layer i, a weight W [in..., out...] adapted by a [L, in..., r] and b [L, r, out...]
adds scale * a[i] @ b[i]; HF's Linear W_hf [out, in] adds scale * lora_B @ lora_A, so
lora_A = a[i] flattened to [in, r] and transposed, lora_B = b[i] flattened to [r, out] and
transposed: the `linear` rule of `mapping` applied to each factor as if it were a weight.
Module names come from that table too, in transformers' module tree (`module_hf_name`:
every family nests the decoder under `model.language_model.` and the vision tower under
`model.visual.`). `target_modules` is a regex of exactly the adapted modules, so the
decoder's `mlp.up_proj` never matches the vision tower's `mlp.up_proj` (Qwen2.5-VL names
both alike), nor the other way round.

Weights trained whole (the `embed` and `lm_head` targets) are PEFT's `modules_to_save`: the
whole HF tensor under `base_model.model.<module>.weight`; with tied embeddings,
`ensure_weight_tying` makes PEFT tie the output layer to the trained embedding, as vlm-gym
ties it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from vlmgym_model.checkpoint import commit_staged, discard_staged
from vlmgym_model.integrity import temp_sibling, write_text_atomic
from vlmgym_model.lora import LoraConfig, LoraPair
from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig

from vlmgym_convert.convert import (
    ConversionError,
    check_output_dir,
    load_export_adapters,
    parse_dtype,
)
from vlmgym_convert.mapping import Rule, hf_shape, module_hf_name, rules, to_hf
from vlmgym_convert.safetensors_io import write_safetensors

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def adapter_rules(config: Qwen2_5_VLConfig, paths: list[str]) -> dict[str, Rule]:
    """{adapted weight path: its `linear` rule in the family's HF table}."""
    table = {r.ours: r for r in rules(config) if r.kind == "linear" and r.layered}
    missing = [p for p in paths if p not in table]
    if missing:
        raise ConversionError(f"no HF Linear module corresponds to the adapted weights {missing}")
    return {p: table[p] for p in paths}


def module_template(rule: Rule) -> str:
    """The adapted Linear's module name in transformers' tree, with "{i}" for the layer."""
    return module_hf_name(rule.hf.removesuffix(".weight"))


def target_modules_regex(templates: list[str]) -> str:
    """A regex that PEFT `re.fullmatch`es against module names: exactly these modules."""
    alternatives = [r"\d+".join(re.escape(part) for part in t.split("{i}")) for t in templates]
    return "(?:" + "|".join(sorted(alternatives)) + ")"


def whole_rules(config: Qwen2_5_VLConfig, paths: list[str]) -> dict[str, Rule]:
    """{path of a weight trained whole: its rule in the family's HF table}."""
    table = {r.ours: r for r in rules(config) if not r.layered}
    missing = [p for p in paths if p not in table]
    if missing:
        raise ConversionError(f"no HF module corresponds to the trained weights {missing}")
    return {p: table[p] for p in paths}


def _split(adapters: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(paths of adapted weights, paths of weights trained whole), sorted."""
    pairs = sorted(p for p, v in adapters.items() if isinstance(v, LoraPair))
    return pairs, sorted(p for p in adapters if p not in pairs)


def peft_tensors(
    config: Qwen2_5_VLConfig, adapters: dict[str, Any], dtype: np.dtype
) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT tensor name, array) for every layer of every adapter: lora_A [r, in] and
    lora_B [out, r], per layer, cast to `dtype`; then each weight trained whole."""
    pairs, whole = _split(adapters)
    for path, rule in whole_rules(config, whole).items():
        arr = np.asarray(adapters[path])
        hf = np.ascontiguousarray(to_hf(rule, arr, hf_shape(rule, arr.shape, config)), dtype)
        yield f"base_model.model.{module_hf_name(rule.hf.removesuffix('.weight'))}.weight", hf
        if path == "text.embed" and config.text.tie_word_embeddings:
            yield "base_model.model.lm_head.weight", hf  # PEFT ties lm_head's copy to it
    table = adapter_rules(config, pairs)
    for path, rule in table.items():
        a, b = np.asarray(adapters[path].a), np.asarray(adapters[path].b)
        b_rule = dataclasses.replace(rule, n_in=1)  # b [r, out...]: one input axis
        for i in range(a.shape[0]):
            module = "base_model.model." + module_template(rule).format(i=i)
            lora_a = to_hf(rule, a[i], hf_shape(rule, a[i].shape, config))  # [r, in]
            lora_b = to_hf(b_rule, b[i], hf_shape(b_rule, b[i].shape, config))  # [out, r]
            yield f"{module}.lora_A.weight", np.ascontiguousarray(lora_a, dtype)
            yield f"{module}.lora_B.weight", np.ascontiguousarray(lora_b, dtype)


def peft_config(
    config: Qwen2_5_VLConfig, cfg: LoraConfig, adapters: dict[str, Any], base_model: str | None
) -> dict[str, Any]:
    """adapter_config.json for PEFT's LoRA (what `peft.LoraConfig` reads; defaults elsewhere).

    task_type is null: PEFT then wraps the model as a plain `PeftModel`, whose forward passes
    images through; `auto_mapping` names HF's class so `AutoPeftModel` can rebuild the base.
    """
    pairs, whole = _split(adapters)
    templates = [module_template(r) for r in adapter_rules(config, pairs).values()]
    saved = [
        module_hf_name(r.hf.removesuffix(".weight")).rsplit(".", 1)[-1]
        for r in whole_rules(config, whole).values()
    ]
    family = config.model_type
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "auto_mapping": {
            "base_model_class": config.to_hf_dict()["architectures"][0],
            "parent_library": f"transformers.models.{family}.modeling_{family}",
        },
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "use_rslora": cfg.use_rslora,
        "target_modules": target_modules_regex(templates),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": saved or None,
        "ensure_weight_tying": bool(saved) and config.text.tie_word_embeddings,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def jax_to_peft(
    model_dir: str | Path,
    adapter_dir: str | Path,
    hf_dir: str | Path,
    *,
    dtype: str | None = None,
    base_model_name_or_path: str | None = None,
    force: bool = False,
) -> Path:
    """Export the adapters in `adapter_dir` (trained on `model_dir`) as a PEFT checkpoint.

    Args:
      dtype: dtype of the written tensors; default float32 (the adapters' own).
      base_model_name_or_path: written to adapter_config.json (the hub id or HF directory
        of the base model); default: `model_dir`.
      force: write into an `hf_dir` that holds something (both files are written under
        temporary names first, then renamed over the old ones).

    Raises:
      AdapterError, ConversionError (ValueErrors): unreadable adapters, a base whose
      fingerprint differs from the one the adapters were trained on, mis-shaped adapters.
    """
    model_dir, hf_dir = Path(model_dir), Path(hf_dir)
    check_output_dir(hf_dir, force, [model_dir, Path(adapter_dir)])
    config = Qwen2_5_VLConfig.from_file(model_dir / "config.json")
    ckpt = load_export_adapters(model_dir, adapter_dir, config)
    target = parse_dtype(dtype) or np.dtype(np.float32)
    base = base_model_name_or_path or str(model_dir.absolute())
    hf_dir.mkdir(parents=True, exist_ok=True)
    staged = {PEFT_WEIGHTS: temp_sibling(hf_dir / PEFT_WEIGHTS)}
    try:
        write_safetensors(staged[PEFT_WEIGHTS], peft_tensors(config, ckpt.adapters, target))
        meta = peft_config(config, ckpt.cfg, ckpt.adapters, base)
        staged[PEFT_CONFIG] = temp_sibling(hf_dir / PEFT_CONFIG)
        write_text_atomic(staged[PEFT_CONFIG], json.dumps(meta, indent=2) + "\n")
    except BaseException:
        discard_staged(staged)
        raise
    commit_staged(staged, hf_dir)
    return hf_dir
