"""LoRA adapters leave vlm-gym: adapter directories, `--to peft` and merged `--to hf`.

A tiny random HF model of each family (fp32) is converted to a model_dir; random adapters
with nonzero b (so they move the logits) are saved next to it. The PEFT export, loaded
with `peft.PeftModel.from_pretrained` on the same HF base, and the merged HF export, loaded
with plain transformers, must give vlm-gym's adapted logits (image in the input) within
the fp32 tolerance; PEFT must adapt exactly the modules vlm-gym adapted (Qwen2.5-VL's
decoder and vision tower both have `mlp.{gate,up,down}_proj`). Then the one-line errors and
the fingerprint's reach.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures.hf_families import family_hf_config
from fixtures.hf_models import (
    IMAGE_TOKEN_ID,
    TEXT_CONFIGS,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    build_hf_model,
    hf_config,
)
from vlmgym_convert import hf_to_jax
from vlmgym_convert.cli import main
from vlmgym_model import (
    AdapterError,
    check_base,
    forward,
    load_adapters,
    load_model,
    model_fingerprint,
    param_specs,
    save_adapters,
)
from vlmgym_model.adapters import SAMPLE_BYTES, SAMPLE_STRIDE
from vlmgym_model.lora import (
    LoraConfig,
    LoraPair,
    adapter_specs,
    flatten_adapters,
    with_adapters,
)

GRID = (1, 4, 8)  # one image: 32 patches, 8 merged tokens


@dataclasses.dataclass
class Base:
    family: str
    hf_cls: Any
    hf_dir: Path
    model_dir: Path
    config: Any
    params: Any
    hf_model: Any
    inputs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    hf_logits: np.ndarray  # the base model's, for "the adapters do something"


def _inputs(patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = int(np.prod(GRID)) // 4
    row = [*rng.integers(0, 240, 3), VISION_START_TOKEN_ID, *[IMAGE_TOKEN_ID] * n]
    row += [VISION_END_TOKEN_ID, *rng.integers(0, 240, 5)]
    ids = np.array([row], np.int32)
    pixels = rng.normal(size=(int(np.prod(GRID)), 6 * patch * patch)).astype(np.float32)
    return ids, np.ones_like(ids), pixels, np.array([GRID], np.int64)


def hf_logits(model: Any, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    ids, mask, pixels, grids = inputs
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            mm_token_type_ids=torch.as_tensor((ids == IMAGE_TOKEN_ID).astype(np.int64)),
            pixel_values=torch.as_tensor(pixels),
            image_grid_thw=torch.as_tensor(grids),
        )
    return out.logits.float().numpy()


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def base(request, tmp_path_factory) -> Base:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    config = (
        family_hf_config(family) if family == "qwen3_vl" else hf_config(TEXT_CONFIGS["tied_gqa2"])
    )
    model = build_hf_model(config)
    model.save_pretrained(root / "hf")
    hf_to_jax(root / "hf", root / "jax", progress=False)
    ours, params = load_model(root / "jax", dtype=jnp.float32)
    inputs = _inputs(ours.vision.patch_size)
    logits = hf_logits(model, inputs)
    return Base(family, type(model), root / "hf", root / "jax", ours, params, model, inputs, logits)


def random_adapters(base: Base, cfg: LoraConfig, seed: int = 1) -> dict[str, LoraPair]:
    """a ~ U(+-1/sqrt(fan_in)) (PEFT's init) and b ~ N(0, 0.1^2), not PEFT's b = 0: the
    adapters must move the logits. Numpy draws: no JAX compile per shape."""
    rng = np.random.default_rng(seed)
    out = {}
    flat = {"text.embed": np.asarray(base.params.text.embed)}
    for path, spec in sorted(adapter_specs(param_specs(base.config), cfg).items()):
        if not isinstance(spec, LoraPair):  # trained whole: the base's, moved
            out[path] = flat[path] + (0.05 * rng.normal(size=spec.shape)).astype(np.float32)
            continue
        bound = 1 / np.sqrt(np.prod(spec.a.shape[1:-1]))
        a = rng.uniform(-bound, bound, spec.a.shape).astype(np.float32)
        out[path] = LoraPair(a, (0.1 * rng.normal(size=spec.b.shape)).astype(np.float32))
    return out


def our_logits(base: Base, adapters: dict[str, LoraPair], cfg: LoraConfig) -> np.ndarray:
    weights = with_adapters(base.params, adapters, cfg)
    return np.asarray(forward(weights, base.config, *base.inputs))


def export_peft(base: Base, adapter_dir: Path, out: Path) -> Any:
    """`--to peft`, then PEFT on a fresh copy of the HF base."""
    import peft

    args = ["--to", "peft", "--model_dir", str(base.model_dir), "--adapter_dir", str(adapter_dir)]
    assert main([*args, "--hf_dir", str(out)]) == 0
    hf_base = base.hf_cls.from_pretrained(base.hf_dir, dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(hf_base, out).eval()


def lora_modules(model: Any) -> set[str]:
    prefix = "base_model.model."
    names = {n for n, _ in model.named_modules() if n.endswith(".lora_A")}
    return {n.removeprefix(prefix).removesuffix(".lora_A") for n in names}


def expected_modules(base: Base, adapters: dict[str, LoraPair]) -> set[str]:
    from vlmgym_convert.peft_export import adapter_rules, module_template

    pairs = sorted(p for p, v in adapters.items() if isinstance(v, LoraPair))
    rules = adapter_rules(base.config, pairs)
    return {
        module_template(rule).format(i=i)
        for path, rule in rules.items()
        for i in range(adapters[path].a.shape[0])
    }


def check_close(ours: np.ndarray, theirs: np.ndarray, base: Base, tol: dict) -> str:
    """Assert the logits agree and differ from the base model's; a line for `-s` runs."""
    diff = float(np.abs(ours - theirs).max())
    moved = float(np.abs(theirs - base.hf_logits).max())
    assert diff <= tol["float32"], f"max abs logit diff {diff}"
    assert moved > 0.1, "the adapters changed nothing"
    return f"max abs logit diff {diff:.2e} (the adapters moved the logits by up to {moved:.2f})"


# Both families: the decoder's attention and MLP; Qwen2.5-VL also the vision tower, rsLoRA;
# both also their embeddings trained whole (PEFT's modules_to_save): tied to the output layer
# in the Qwen2.5-VL model, untied in the Qwen3-VL one.
LORA = {
    "qwen2_5_vl": LoraConfig(4, 8.0, ("attention", "mlp", "vision", "embed"), use_rslora=True),
    "qwen3_vl": LoraConfig(4, 8.0, ("attention", "mlp", "embed")),
}


@pytest.fixture(scope="module")
def lora(base, tmp_path_factory) -> tuple[Path, dict[str, LoraPair], LoraConfig, Any]:
    """Random adapters (`LORA`), saved, and vlm-gym's logits with them (one compile each)."""
    cfg = LORA[base.family]
    adapters = random_adapters(base, cfg)
    adapter_dir = save_adapters(
        tmp_path_factory.mktemp("adapters") / "lora", adapters, cfg, base.model_dir
    )
    return adapter_dir, adapters, cfg, our_logits(base, adapters, cfg)


def test_peft_export_matches_ours(base, lora, tmp_path, tol):
    adapter_dir, adapters, cfg, ours = lora
    model = export_peft(base, adapter_dir, tmp_path / "peft")
    meta = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (meta["r"], meta["lora_alpha"], meta["use_rslora"]) == (4, 8.0, cfg.use_rslora)
    assert (meta["peft_type"], meta["lora_dropout"], meta["bias"]) == ("LORA", 0.0, "none")
    assert lora_modules(model) == expected_modules(base, adapters)
    if "embed" in cfg.targets:
        assert meta["modules_to_save"] == ["embed_tokens"]
        assert meta["ensure_weight_tying"] == base.config.text.tie_word_embeddings
    diff = check_close(ours, hf_logits(model, base.inputs), base, tol)
    print(f"{base.family} {cfg.targets} via PEFT: {diff}")


def test_merged_hf_export_matches_ours(base, lora, tmp_path, tol):
    adapter_dir, _, _, ours = lora
    out = tmp_path / "merged"
    args = ["--to", "hf", "--model_dir", str(base.model_dir), "--adapter_dir", str(adapter_dir)]
    assert main([*args, "--hf_dir", str(out)]) == 0
    model = base.hf_cls.from_pretrained(out, dtype=torch.float32).eval()
    diff = check_close(ours, hf_logits(model, base.inputs), base, tol)
    print(f"{base.family} merged --to hf: {diff}")


@pytest.mark.parametrize("groups", [("attention", "mlp"), ("vision",)])
def test_target_regex_matches_exactly_the_adapted_modules(base, groups):
    """PEFT's own matcher on every module of the HF model: the decoder's `mlp.up_proj` and
    Qwen2.5-VL's vision `mlp.up_proj` are told apart, in both directions."""
    from peft.config import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from vlmgym_convert.peft_export import peft_config

    cfg = LoraConfig(rank=2, targets=groups)
    adapters = adapter_specs(param_specs(base.config), cfg)
    peft_cfg = PeftConfig.from_peft_type(**peft_config(base.config, cfg, adapters, "base"))
    names = [n for n, _ in base.hf_model.named_modules()]
    matched = {n for n in names if check_target_module_exists(peft_cfg, n)}
    assert matched == expected_modules(base, adapters)
    tower = "model.visual." if groups == ("vision",) else "model.language_model."
    assert matched and all(n.startswith(tower) for n in matched)


def test_peft_without_adapters_is_an_error(base, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--to", "peft", "--model_dir", str(base.model_dir), "--hf_dir", str(tmp_path)])
    assert err.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--to peft needs --adapter_dir" in message and "trained without LoRA" in message


@pytest.mark.parametrize("to", ["peft", "hf"])
def test_adapters_of_another_base_are_refused(base, lora, tmp_path, capsys, to):
    other = tmp_path / "other"
    shutil.copytree(base.model_dir, other)
    check_base(load_adapters(lora[0]), other)  # a byte copy is the same base
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")
    args = ["--to", to, "--model_dir", str(other), "--adapter_dir", str(lora[0])]
    assert main([*args, "--hf_dir", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "adapters were trained on base" in lines[0]
    assert str(base.model_dir.absolute()) in lines[0] and str(other.absolute()) in lines[0]
    assert not (tmp_path / "out").exists(), "a refused export must write nothing"


def test_adapters_that_do_not_fit_the_base_are_refused(base, tmp_path, capsys):
    cfg = LoraConfig(rank=2, targets=("q_proj",))
    L, D = base.config.text.num_hidden_layers, base.config.text.hidden_size
    N, H = base.config.text.num_attention_heads, base.config.text.head_dim
    wrong = {"text.layers.q_proj": LoraPair(np.ones((L, D + 1, 2)), np.ones((L, 2, N, H)))}
    adapter_dir = save_adapters(tmp_path / "lora", wrong, cfg, base.model_dir)
    args = ["--to", "peft", "--model_dir", str(base.model_dir), "--adapter_dir", str(adapter_dir)]
    assert main([*args, "--hf_dir", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'text.layers.q_proj' has a, b shapes" in lines[0]


def test_save_load_round_trip(base, lora, tmp_path):
    adapter_dir, adapters, cfg, _ = lora
    ckpt = load_adapters(adapter_dir)
    assert ckpt.cfg == cfg and ckpt.base_model_dir == str(base.model_dir.absolute())
    assert ckpt.base_fingerprint == model_fingerprint(base.model_dir)
    assert sorted(ckpt.adapters) == sorted(adapters)
    for path, want in flatten_adapters(adapters).items():
        got = flatten_adapters(ckpt.adapters)[path]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.asarray(want))
    meta = json.loads((adapter_dir / "lora.json").read_text())
    assert set(meta) == {"rank", "alpha", "targets", "use_rslora", "base_model_dir",
                         "base_fingerprint", "format_version"}  # fmt: skip
    copy = tmp_path / "copy"
    shutil.copytree(adapter_dir, copy)
    with pytest.raises(FileExistsError):
        save_adapters(copy, adapters, cfg, base.model_dir)
    one = {"text.layers.q_proj": adapters["text.layers.q_proj"]}
    save_adapters(copy, one, LoraConfig(rank=4, targets=("q_proj",)), base.model_dir, force=True)
    assert sorted(load_adapters(copy).adapters) == ["text.layers.q_proj"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"], "temporary siblings left"


def _corrupt(adapter_dir: Path, how: str) -> None:
    meta = adapter_dir / "lora.json"
    if how == "no lora.json":
        meta.unlink()
    elif how == "lora.json not JSON":
        meta.write_text('{"rank": 4,')
    elif how in ("bad rank", "rslora not a bool"):
        raw = json.loads(meta.read_text())
        raw.update({"rank": 0} if how == "bad rank" else {"use_rslora": "no"})
        meta.write_text(json.dumps(raw))
    elif how == "no arrays":
        shutil.rmtree(adapter_dir / "arrays")
    elif how == "corrupt arrays":
        (adapter_dir / "arrays" / "_METADATA").write_text("{not json")


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("no lora.json", "has no lora.json: not an adapter directory"),
        ("lora.json not JSON", "is not valid JSON"),
        ("bad rank", "rank must be a positive integer"),
        ("rslora not a bool", "use_rslora must be true or false"),
        ("no arrays", "has no arrays/ checkpoint"),
        ("corrupt arrays", "cannot read the adapter arrays"),
    ],
)
def test_broken_adapter_directories_are_one_line_errors(lora, tmp_path, how, message):
    broken = tmp_path / "broken"
    shutil.copytree(lora[0], broken)
    _corrupt(broken, how)
    with pytest.raises(AdapterError, match=message) as err:
        load_adapters(broken)
    assert "\n" not in str(err.value)


def test_fingerprint_sees_config_and_weight_bytes(base, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(base.model_dir, model_dir)
    before = model_fingerprint(model_dir)
    assert before == model_fingerprint(base.model_dir)
    files = [p for p in (model_dir / "params").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[min(len(data) // 2, SAMPLE_BYTES - 1)] ^= 1  # one bit of a sampled weight byte
    largest.write_bytes(bytes(data))
    flipped = model_fingerprint(model_dir)
    assert flipped != before
    config = model_dir / "config.json"
    config.write_text(config.read_text().replace("1e-06", "1e-05"))
    assert model_fingerprint(model_dir) not in (before, flipped)


def test_fingerprint_samples_large_files(tmp_path):
    """A 64 MiB stride: a byte in a sampled window counts, one between windows does not
    (the documented blind spot of a cheap fingerprint)."""
    (tmp_path / "params").mkdir()
    (tmp_path / "config.json").write_text("{}")
    blob = tmp_path / "params" / "blob"
    with blob.open("wb") as f:
        f.truncate(2 * SAMPLE_STRIDE + 3 * SAMPLE_BYTES)  # sparse: nothing is written

    def poke(offset: int) -> str:
        with blob.open("r+b") as f:
            f.seek(offset)
            f.write(b"\x01")
        return model_fingerprint(tmp_path)

    before = model_fingerprint(tmp_path)
    in_window = poke(SAMPLE_STRIDE + 10)
    assert in_window != before
    assert poke(SAMPLE_STRIDE // 2) == in_window
    with pytest.raises(FileNotFoundError, match="is not a model directory"):
        model_fingerprint(tmp_path / "params")
