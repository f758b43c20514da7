"""The results file as a table for a terminal: one block per section."""

from __future__ import annotations

from typing import Any

GIB = 2**30


def _num(x: Any, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    return "-" if x is None else f"{x * scale:{fmt}}{unit}"


def _status_line(name: str, section: dict[str, Any]) -> str | None:
    """A line for a section that did not finish, else None."""
    status = section.get("status")
    if status == "ok":
        return None
    why = section.get("error") or section.get("reason") or ""
    return f"{name}: {status} {why}".rstrip()


def kernels_block(section: dict[str, Any]) -> list[str]:
    lines = [
        f"kernels (pallas impl {section.get('pallas_impl')}, tolerance "
        f"{section.get('tolerance')} x max(1, |ref|))",
        f"  {'kernel':<16}{'impl':<12}{'ms':>10}{'TFLOP/s':>10}{'max|err|':>11}  ok",
    ]
    for kernel, result in section.items():
        if not isinstance(result, dict):
            continue
        if "impls" not in result:
            why = result.get("error") or result.get("skipped")
            lines.append(f"  {kernel:<16}{why}")
            continue
        for impl, r in result["impls"].items():
            head = f"  {kernel:<16}{impl:<12}"
            if "ms" not in r:
                lines.append(head + str(r.get("error") or r.get("skipped"))[:100])
                continue
            ok = "yes" if r["ok"] else "NO"
            lines.append(
                head + f"{r['ms']:>10.3f}{r['tflops']:>10.4g}{r['max_abs_err']:>11.2e}  {ok}"
            )
    return lines


def sampler_block(section: dict[str, Any]) -> list[str]:
    shape = section["shape"]
    share = section["roofline_share"]
    return [
        f"sampler ({shape['model']}, {section['rows']} rows, {shape['prompt_len']}-token "
        f"prompts, {shape['new_tokens']} new, impl {section['impl']})",
        f"  decode {section['decode_tokens_per_s']:.0f} tokens/s in {section['decode_s']:.2f} s;"
        f" {section['bytes_per_step']['total'] / 1e9:.2f} GB/step ->"
        f" {section['achieved_bytes_per_s'] / 1e12:.2f} TB/s,"
        f" roofline share {_num(share, '.1%')}",
    ]


def grpo_block(section: dict[str, Any]) -> list[str]:
    shape, mem = section["shape"], section["memory"]
    compiled = mem["compiled"] or {}
    return [
        f"grpo step ({shape['model']}, {shape['rows']} rows x ({shape['prompt_len']} + "
        f"{shape['new_tokens']}) tokens, impl {section['impl']})",
        f"  step {section['step_s']:.3f} s (compile {section['compile_s']:.0f} s),"
        f" {section['model_tflops_per_s']:.4g} model TFLOP/s, MFU {_num(section['mfu'], '.1%')}",
        f"  peak memory: measured {_num(mem['measured_peak_bytes'], '.1f', 1 / GIB, ' GiB')},"
        f" XLA analysis {_num(compiled.get('peak'), '.1f', 1 / GIB, ' GiB')},"
        f" --plan {_num(mem['plan_peak_bytes'], '.1f', 1 / GIB, ' GiB')}",
    ]


BLOCKS = {"kernels": kernels_block, "sampler": sampler_block, "grpo": grpo_block}


def format_table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"== GPU check: {meta['device_kind']} ({meta['backend']}), jax {meta['jax_version']}"
        + (" [smoke]" if meta["smoke"] else "")
    ]
    for name, section in results["sections"].items():
        line = _status_line(name, section)
        lines.extend([line] if line else BLOCKS[name](section))
    return "\n".join(lines)
