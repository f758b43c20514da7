"""Evaluation: sample completions for an environment's tasks, score them, report metrics.

Outputs in `output_dir`:
- `eval_key.json`: what produced the outputs: the model's identity (the caller's, e.g. its
  fingerprint, env name and kwargs, dtype), the sampling settings, the environment's class
  and size, and a hash of the task list. A rerun into the same directory resumes only when
  its key is the same; otherwise it is refused (`EvalOutputError`) unless `overwrite`.
- `records.jsonl`: one line per (task, sample): prompt, image reference, completion,
  parsed answer, reward, info; with `max_turns` > 1, one per episode with every turn
  (text, tool calls, reward, returned image sizes: `eval_turns`). Read back on a rerun
  with the same key: finished tasks are skipped, so an interrupted evaluation resumes
  where it stopped.
- `metrics.json`: the environment's own metrics (`Env.metrics` over each task's first
  sample), plus reward mean, and pass@k / mean@k with several samples per task.
- plots: the environment's own (`Env.plots`; osv5m draws a world scatter of guesses
  against truths and a distance histogram), else a reward histogram.

Deterministic for a fixed seed: task order, sampling keys and batches depend only on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from vlmgym_envs import Env, SkipTask
from vlmgym_envs.data.archives import DataError
from vlmgym_model import Sampler, SamplingParams

from vlmgym_train.eval_turns import episode_records, turn_metrics
from vlmgym_train.jsonable import atomic_write_text, jsonable


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    max_eval_tasks: int | None = None  # None: the whole split
    num_samples: int = 1
    num_generation_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8  # tasks per sampler call
    progress: bool = False
    # stop when more than this fraction of the tasks (once 20 were tried) cannot be read
    max_skip_fraction: float = 0.1
    # >1: whole multi-turn episodes (tool calls, feedback), recorded per turn (eval_turns)
    max_turns: int = 1


class EvalOutputError(ValueError):
    """The output directory holds another evaluation's outputs."""


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, float]
    records: list[dict[str, Any]]


def _prompt_text(messages: list[dict[str, Any]]) -> str:
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
            continue
        for block in content or []:
            if block.get("type") == "text":
                parts.append(str(block.get("text", "")))
            elif block.get("type") == "image":
                parts.append("<image>")
    return "\n".join(parts)


def _image_reference(state: Any, task: int) -> str:
    for attr in ("id", "identifier", "image_id", "path"):
        value = getattr(state, attr, None)
        if value is not None:
            return str(value)
    return f"task:{task}"


# --------------------------------------------------------------------------- metrics


def _success(record: dict[str, Any]) -> bool:
    """A sample counts for pass@k when the env says it is correct, else when reward >= 1."""
    info = record["info"]
    if "correct" in info:
        return bool(info["correct"])
    return float(record["reward"]) >= 1.0


def compute_metrics(env: Env, records: list[dict[str, Any]], num_samples: int) -> dict[str, float]:
    """The env's metrics over first samples, plus reward stats and pass@k with k samples.

    Records of tasks the env could not show (`"skipped": reason`) are counted
    (`tasks_skipped`, `skipped/<reason>`) and left out of everything else."""
    skipped = [r for r in records if "skipped" in r]
    records = [r for r in records if "skipped" not in r]
    if not records:
        raise ValueError("no evaluation records to compute metrics from")
    first = [r for r in records if r["sample"] == 0]
    metrics = dict(env.metrics(first))
    metrics["reward/mean"] = float(np.mean([r["reward"] for r in records]))
    metrics["tasks"] = float(len(first))
    metrics.update(turn_metrics(records))
    if skipped:
        metrics["tasks_skipped"] = float(len(skipped))
        for reason in sorted({r["skipped"] for r in skipped}):
            metrics[f"skipped/{reason}"] = float(sum(r["skipped"] == reason for r in skipped))
    if num_samples > 1:
        by_task: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            by_task[r["task"]].append(r)
        metrics[f"pass@{num_samples}"] = float(
            np.mean([any(_success(r) for r in rs) for rs in by_task.values()])
        )
        metrics[f"mean@{num_samples}"] = float(
            np.mean([np.mean([_success(r) for r in rs]) for rs in by_task.values()])
        )
        metrics[f"best_reward@{num_samples}"] = float(
            np.mean([max(r["reward"] for r in rs) for rs in by_task.values()])
        )
    return metrics


# --------------------------------------------------------------------------- the loop


def _load_existing(path: Path) -> list[dict[str, Any]]:
    """Records of a previous partial run; a half-written last line is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


OUTPUT_FILES = ("eval_key.json", "records.jsonl", "metrics.json")


def eval_key(env: Env, cfg: EvalConfig, tasks: list[int], identity: Any) -> dict[str, Any]:
    """What an evaluation's outputs depend on (see the module docstring), as JSON."""
    settings = {
        k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "batch_size")
    }
    digest = hashlib.sha256(json.dumps(tasks).encode()).hexdigest()[:16]
    return jsonable(
        {
            "identity": identity,
            "sampling": settings,
            "env_class": f"{type(env).__module__}.{type(env).__qualname__}",
            "env_size": len(env),
            "tasks": {"count": len(tasks), "sha256": digest},
        }
    )


def _differences(saved: Any, now: Any, stem: str = "") -> list[str]:
    """Dotted names of the entries that differ between two JSON values."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [
            d
            for k in sorted(set(saved) | set(now))
            for d in _differences(saved.get(k), now.get(k), f"{stem}{k}.")
        ]
    return [] if saved == now else [stem.rstrip(".") or "key"]


def _check_key(out: Path, key: dict[str, Any], overwrite: bool) -> None:
    """Claim `out` for the evaluation `key`: resume when it is ours, refuse another's."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    key_file, records = out / "eval_key.json", out / "records.jsonl"
    if key_file.is_file():
        try:
            saved = json.loads(key_file.read_text())
        except json.JSONDecodeError:
            saved = None
        if saved != key:
            differ = _differences(saved, key) if isinstance(saved, dict) else ["unreadable"]
            raise EvalOutputError(
                f"{out} holds another evaluation's outputs (it differs in: "
                f"{', '.join(differ)}); choose another --output_dir or pass --overwrite"
            )
    elif records.is_file() and records.stat().st_size:
        raise EvalOutputError(
            f"{records} was written by an evaluation of unknown settings; choose another "
            "--output_dir or pass --overwrite"
        )
    atomic_write_text(key_file, json.dumps(key, indent=2, sort_keys=True) + "\n")


def _resume(out: Path, num_samples: int) -> tuple[list[dict[str, Any]], set[int]]:
    """Records of the tasks a previous run of this evaluation finished, and those tasks.

    The records file is rewritten without partly sampled tasks, so appends continue from
    a clean file.
    """
    previous = _load_existing(out / "records.jsonl")
    counts: dict[int, int] = defaultdict(int)
    for r in previous:  # a skipped task's one record completes it
        counts[r["task"]] += num_samples if "skipped" in r else 1
    done = {t for t, c in counts.items() if c >= num_samples}
    records = [r for r in previous if r["task"] in done]
    atomic_write_text(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return records, done


def _task_records(env: Env, task: int, state: Any, obs: Any, group: list[Any]) -> list[dict]:
    """One record per sample of a task: its completion, the env's verdict, its info."""
    results = env.step_many([state] * len(group), [s.text for s in group])
    records = []
    for j, (sample, result) in enumerate(zip(group, results, strict=True)):
        info = jsonable(result.info)
        records.append(
            {
                "task": int(task),
                "sample": j,
                "prompt": _prompt_text(obs.messages),
                "image": _image_reference(state, int(task)),
                "completion": sample.text,
                "parsed": info.get("parsed", info.get("answer")),
                "reward": float(result.reward),
                "finish_reason": sample.finish_reason,
                "length": sample.length,
                "info": info,
                "state": jsonable(state),
            }
        )
    return records


def _reset(env: Env, batch: list[int]) -> tuple[list[int], list[Any], list[dict[str, Any]]]:
    """Reset each task: the positions in `batch` of those the env could show, their
    (state, observation), and a record for each it could not (`SkipTask`)."""
    readable, resets, unreadable = [], [], []
    for i, task in enumerate(batch):
        try:
            resets.append(env.reset(task))
            readable.append(i)
        except SkipTask as err:
            unreadable.append(
                {"task": int(task), "sample": 0, "skipped": err.reason, "error": str(err)}
            )
    return readable, resets, unreadable


def _check_skips(records: list[dict[str, Any]], limit: float) -> None:
    """Stop when more than `limit` of the tasks tried (once 20 were) could not be read."""
    tried = len({r["task"] for r in records})
    skipped = sum("skipped" in r for r in records)
    if tried >= 20 and skipped > limit * tried:
        reasons = sorted({r["skipped"] for r in records if "skipped" in r})
        raise DataError(
            f"{skipped} of {tried} tasks could not be read ({', '.join(reasons)}), more than "
            f"--max_skip_fraction {limit}; check the dataset (records.jsonl names each)"
        )


def evaluate(
    params: Any,
    sampler: Sampler,
    env: Env,
    cfg: EvalConfig,
    output_dir: str | Path | None = None,
    *,
    identity: Any = None,
    overwrite: bool = False,
) -> EvalResult:
    """Evaluate `params` on `env`; write records, metrics and plots to `output_dir`.

    identity: JSON describing the model (and anything else the results depend on that
    `cfg` does not hold), recorded in `eval_key.json`.
    With an `output_dir` that holds a killed run of the same evaluation (same key), the
    tasks it finished are kept and the rest are sampled: the result equals an
    uninterrupted run's. Another evaluation's outputs there raise `EvalOutputError`
    (unless `overwrite`, which deletes them first).
    """
    total = len(env) if cfg.max_eval_tasks is None else min(len(env), cfg.max_eval_tasks)
    if total < 1:
        raise ValueError("the environment has no tasks to evaluate")
    tasks = np.random.default_rng(cfg.seed).permutation(len(env))[:total].tolist()
    out = Path(output_dir) if output_dir is not None else None
    records: list[dict[str, Any]] = []
    done: set[int] = set()
    if out is not None:
        _check_key(out, eval_key(env, cfg, tasks, identity), overwrite)
        records, done = _resume(out, cfg.num_samples)
    sampling = SamplingParams(
        max_new_tokens=cfg.num_generation_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        num_samples=cfg.num_samples,
    )
    todo = [t for t in tasks if t not in done]
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=total - len(todo), desc="eval", file=sys.stderr)
    start = time.perf_counter()
    sink = (out / "records.jsonl").open("a") if out is not None else None
    try:
        for b0 in range(0, len(todo), cfg.batch_size):
            batch = todo[b0 : b0 + cfg.batch_size]
            # One key per task: a task's samples never depend on how tasks were batched, so
            # a resumed evaluation reproduces the uninterrupted one.
            base = jax.random.key(cfg.seed)
            key = jax.vmap(lambda t, base=base: jax.random.fold_in(base, t))(jnp.asarray(batch))
            # (indexed by the batch's readable tasks below)
            readable, resets, unreadable = _reset(env, batch)
            new = unreadable
            if readable and cfg.max_turns > 1:
                shown = [batch[i] for i in readable]
                new = new + episode_records(
                    env, sampler, params, shown, [tasks.index(t) for t in shown], sampling,
                    base, max_turns=cfg.max_turns, prompt_text=_prompt_text,
                    image_reference=_image_reference,
                )  # fmt: skip
            elif readable:
                messages = [obs.messages for _, obs in resets]
                gen = sampler.generate(params, messages, sampling, key[np.asarray(readable)])
                shown = [batch[i] for i in readable]
                for task, (state, obs), group in zip(shown, resets, gen.samples, strict=True):
                    new = new + _task_records(env, task, state, obs, group)
            records.extend(new)
            if sink is not None:
                sink.write("".join(json.dumps(r) + "\n" for r in new))
                sink.flush()
            _check_skips(records, cfg.max_skip_fraction)
            if bar is not None:
                bar.update(len(batch))
                skips = sum("skipped" in r for r in records)
                if skips:
                    bar.set_postfix(unreadable=skips)
    finally:
        if sink is not None:
            sink.close()
        if bar is not None:
            bar.close()
    records.sort(key=lambda r: (tasks.index(r["task"]), r["sample"]))
    metrics = compute_metrics(env, records, cfg.num_samples)
    metrics["eval_seconds"] = time.perf_counter() - start
    if out is not None:
        stable = {k: v for k, v in metrics.items() if k != "eval_seconds"}
        text = json.dumps(stable, indent=2, sort_keys=True) + "\n"
        atomic_write_text(out / "metrics.json", text)
        write_plots(env, records, out)
    return EvalResult(metrics=metrics, records=records)


# --------------------------------------------------------------------------- plots


def write_plots(env: Env, records: list[dict[str, Any]], out: Path) -> list[Path]:
    """The env's own plots of the first samples (`Env.plots`); a reward histogram of every
    sample when it draws none."""
    records = [r for r in records if "skipped" not in r]
    written = env.plots([r for r in records if r["sample"] == 0], out)
    if written:
        return written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist([r["reward"] for r in records], bins=20, color="tab:blue")
    ax.set_xlabel("reward")
    ax.set_ylabel("samples")
    ax.set_title(f"reward histogram ({type(env).__name__})")
    fig.savefig(out / "reward_hist.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [out / "reward_hist.png"]
