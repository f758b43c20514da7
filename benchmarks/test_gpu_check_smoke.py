"""The GPU check (`benchmarks/gpu/run.sh`) end to end in its smoke mode, in a subprocess:
tiny shapes on whatever backend JAX has here (Pallas through its interpreter off a GPU).

It asserts that every section ran, that the kernels match their reference, and that the
numbers each section reports are there; it sets no speed threshold. About a minute on
2 CPU cores.

Run: uv run pytest benchmarks/test_gpu_check_smoke.py -q
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

RUN_SH = Path(__file__).parent / "gpu" / "run.sh"
KERNELS = ("flash_forward", "flash_backward", "decode", "vision_windows")


def _errors(tree: Any, path: str = "") -> list[str]:
    """The path of every "error" entry in the results, at any depth."""
    if not isinstance(tree, dict):
        return []
    found = [f"{path}/error: {tree['error']}"] if "error" in tree else []
    for key, value in tree.items():
        found += _errors(value, f"{path}/{key}")
    return found


def test_gpu_check_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        ["bash", str(RUN_SH), "--smoke", f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log
    results = json.loads(out.read_text())
    sections = results["sections"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(
        ("kernels", "sampler", "grpo"), "ok"
    ), log
    assert _errors(results) == []
    assert results["meta"]["smoke"] is True and results["meta"]["jax_version"]

    for kernel in KERNELS:
        impls = sections["kernels"][kernel]["impls"]
        measured = {name: r for name, r in impls.items() if "skipped" not in r}
        assert {"pallas", "xla", "sdpa_xla"} <= set(measured), (kernel, impls)
        for name, r in measured.items():
            assert r["ok"], (kernel, name, r)
            assert r["tflops"] > 0 and r["ms"] > 0

    sampler = sections["sampler"]
    assert sampler["all_rows_full_length"]
    assert sampler["compilations"] == {"prefill": 1, "decode": 1}
    assert sampler["decode_tokens_per_s"] > 0 and sampler["bytes_per_step"]["total"] > 0

    grpo = sections["grpo"]
    assert grpo["skipped_updates"] == 0 and grpo["step_s"] > 0
    assert grpo["memory"]["compiled"]["peak"] > 0
    assert grpo["tokens"] == grpo["shape"]["rows"] * (
        grpo["shape"]["prompt_len"] + grpo["shape"]["new_tokens"]
    )
    assert "== GPU check" in proc.stdout and str(out) in proc.stdout
