"""The evaluation harness on the tiny preset: metrics, outputs, determinism, resume."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import vlmgym_envs
from fixtures.datasets import write_osv5m
from vlmgym_envs.geoguessr.metrics import osv5m_metrics
from vlmgym_model import Processor, Sampler, load_model
from vlmgym_train.eval_cli import main as eval_main
from vlmgym_train.evaluate import (
    EvalConfig,
    EvalOutputError,
    compute_metrics,
    evaluate,
    write_plots,
)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    config, params = load_model(tiny_model_dir, dtype=jnp.float32)
    sampler = Sampler(config, Processor.from_model_dir(tiny_model_dir), length_buckets=(64, 128))
    return config, params, sampler


def run(model, env, out, identity=None, overwrite=False, **kw):
    _, params, sampler = model
    cfg = EvalConfig(num_generation_tokens=4, batch_size=4, **kw)
    return evaluate(params, sampler, env, cfg, out, identity=identity, overwrite=overwrite)


def test_another_evaluations_outputs_are_refused_not_reused(model, tmp_path):
    env = vlmgym_envs.make("shapes")
    first = run(model, env, tmp_path, identity={"model": "a"}, max_eval_tasks=4)
    records = (tmp_path / "records.jsonl").read_text()
    for identity, kw, differs in [
        ({"model": "b"}, {}, "identity.model"),
        ({"model": "a"}, {"temperature": 1.0}, "sampling.temperature"),
        ({"model": "a"}, {"max_eval_tasks": 3}, "sampling.max_eval_tasks, tasks.count"),
    ]:
        with pytest.raises(EvalOutputError, match=differs):
            run(model, env, tmp_path, identity=identity, **{"max_eval_tasks": 4, **kw})
        assert (tmp_path / "records.jsonl").read_text() == records  # untouched
    # the same evaluation resumes (nothing left to do); outputs of unknown origin are refused
    again = run(model, env, tmp_path, identity={"model": "a"}, max_eval_tasks=4)
    assert again.metrics["reward/mean"] == first.metrics["reward/mean"]
    (tmp_path / "eval_key.json").unlink()
    with pytest.raises(EvalOutputError, match="unknown settings"):
        run(model, env, tmp_path, identity={"model": "a"}, max_eval_tasks=4)
    other = run(model, env, tmp_path, identity={"model": "b"}, overwrite=True, max_eval_tasks=2)
    assert other.metrics["tasks"] == 2.0
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2


def test_shapes_metrics_equal_the_envs_scoring(model, tmp_path):
    env = vlmgym_envs.make("shapes", preset="medium")
    result = run(model, env, tmp_path, max_eval_tasks=10, num_samples=3, temperature=1.0)
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(records) == 30
    assert json.loads((tmp_path / "metrics.json").read_text())["tasks"] == 10
    assert (tmp_path / "reward_hist.png").stat().st_size > 0
    # re-score every first completion with the env itself
    correct: dict[str, list[bool]] = {}
    for r in records:
        state, _ = env.reset(r["task"])
        step = env.step(state, r["completion"])
        assert step.reward == r["reward"]
        if r["sample"] == 0:
            correct.setdefault(step.info["kind"], []).append(bool(step.info["correct"]))
    for kind, values in correct.items():
        assert result.metrics[f"accuracy/{kind}"] == pytest.approx(np.mean(values))
    by_task: dict[int, list[float]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r["reward"])
    assert result.metrics["best_reward@3"] == pytest.approx(
        np.mean([max(v) for v in by_task.values()])
    )


def test_same_seed_same_metrics_and_resume(model, tmp_path):
    env = vlmgym_envs.make("shapes")
    a = run(model, env, tmp_path / "a", max_eval_tasks=8, num_samples=2, temperature=1.0, seed=3)
    b = run(model, env, tmp_path / "b", max_eval_tasks=8, num_samples=2, temperature=1.0, seed=3)
    assert {k: v for k, v in a.metrics.items() if k != "eval_seconds"} == {
        k: v for k, v in b.metrics.items() if k != "eval_seconds"
    }
    # cut the output mid-way (with a half-written line) and resume
    path = tmp_path / "b" / "records.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    c = run(model, env, tmp_path / "b", max_eval_tasks=8, num_samples=2, temperature=1.0, seed=3)
    assert c.metrics["reward/mean"] == a.metrics["reward/mean"]
    assert len(path.read_text().splitlines()) == 16
    assert [r["completion"] for r in c.records] == [r["completion"] for r in a.records]


def test_osv5m_metrics_and_plots(model, tmp_path):
    data = tmp_path / "osv"
    data.mkdir()
    write_osv5m(data)
    env = vlmgym_envs.make("osv5m", data_dir=data, split="test")
    result = run(model, env, tmp_path / "out", max_eval_tasks=4)
    records = result.records
    lat = [r["info"]["parsed"]["latitude"] for r in records]
    lon = [r["info"]["parsed"]["longitude"] for r in records]
    ref = osv5m_metrics(
        [math.nan if v is None else v for v in lat],
        [math.nan if v is None else v for v in lon],
        [r["state"]["truth"]["latitude"] for r in records],
        [r["state"]["truth"]["longitude"] for r in records],
    )
    for k, v in ref.items():
        assert result.metrics[k] == pytest.approx(v, nan_ok=True), k
    assert (tmp_path / "out" / "world_scatter.png").stat().st_size > 0
    assert (tmp_path / "out" / "distance_hist.png").stat().st_size > 0


def test_eval_cli_prints_a_table(tiny_model_dir, tmp_path, capsys):
    code = eval_main([
        f"--model_dir={tiny_model_dir}", "--env_name=shapes", "--max_eval_tasks=4",
        "--num_generation_tokens=3", "--dtype=float32", f"--output_dir={tmp_path}",
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy/color" in out and "reward/mean" in out
    assert json.loads((tmp_path / "metrics.json").read_text())["tasks"] == 4


class _Echo(vlmgym_envs.Env[int]):
    """An env from outside the package: its own metric and plot reach the evaluator."""

    def __len__(self) -> int:
        return 3

    def reset(self, idx: int):
        return idx, vlmgym_envs.Observation([vlmgym_envs.user_message(f"say {idx}")])

    def step(self, state: int, text: str):
        return vlmgym_envs.StepResult(reward=float(str(state) in text), done=True)

    def metrics(self, records):
        return {"echo/tasks_seen": float(len({r["task"] for r in records}))}

    def plots(self, records, out_dir):
        path = out_dir / "echo.txt"
        path.write_text(f"{len(records)}\n")
        return [path]


def test_the_env_supplies_its_metrics_and_plots(tmp_path):
    records = [
        {"task": t, "sample": s, "reward": 1.0 if s == 0 else 0.0, "info": {}, "state": t}
        for t in range(3)
        for s in range(2)
    ]
    metrics = compute_metrics(_Echo(), records, num_samples=2)
    assert metrics["echo/tasks_seen"] == 3 and metrics["pass@2"] == 1.0
    assert write_plots(_Echo(), records, tmp_path) == [tmp_path / "echo.txt"]
    assert (tmp_path / "echo.txt").read_text() == "3\n"  # first samples only
    # an env without plots of its own gets the reward histogram
    plain = vlmgym_envs.make("shapes", preset="easy")
    assert write_plots(plain, records, tmp_path) == [tmp_path / "reward_hist.png"]


def test_eval_cli_on_a_standard_task_reports_accuracy_format_and_pass_at_k(
    tiny_model_dir, tmp_path, capsys
):
    from fixtures.datasets import write_geometry3k

    write_geometry3k(tmp_path / "geo3k", split="test")
    code = eval_main([
        f"--model_dir={tiny_model_dir}", "--env_name=geometry3k",
        f'--env_kwargs={{"path": "{tmp_path / "geo3k"}"}}', "--split=test",
        "--num_samples=2", "--temperature=1.0", "--num_generation_tokens=4",
        "--dtype=float32", f"--output_dir={tmp_path / 'out'}",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("accuracy", "format_rate", "pass@2", "mean@2", "reward/mean"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    assert metrics["tasks"] == 3
    records = [
        json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().split("\n") if x
    ]
    assert len(records) == 6 and all("format_ok" in r["info"] for r in records)
