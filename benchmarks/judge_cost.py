"""What a model judge costs, against the policy's own sampling in the same run.

Not a test (pytest does not collect it): a script. With the real-weights checkpoint of
`tests/fixtures/real_model.py` as both the policy and the judge, it times

1. the policy sampling `--group` completions of `--tokens` tokens for one prompt (the
   reference: what one GRPO group costs to roll out), and
2. `vlmgym_train.judge.ModelJudge` scoring those completions (one batched greedy call),

after a warm-up call of each (compilation excluded), and prints both and their ratio.

    uv run python benchmarks/judge_cost.py
    uv run python benchmarks/judge_cost.py --group 16 --tokens 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--judge_tokens", type=int, default=16, help="verdict tokens")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import jax
    import jax.numpy as jnp
    from fixtures.real_model import real_model_dirs
    from vlmgym_model import Processor, Sampler, SamplingParams, load_model
    from vlmgym_train.judge import ModelJudge

    model_dir = real_model_dirs().model_dir
    config, params = load_model(model_dir, dtype=getattr(jnp, args.dtype))
    sampler = Sampler(config, Processor.from_model_dir(model_dir))
    question = "In one sentence, why is the sky blue?"
    prompt = [[{"role": "user", "content": question}]]
    sampling = SamplingParams(max_new_tokens=args.tokens, temperature=1.0, num_samples=args.group)
    judge = ModelJudge(
        model_dir, rubric="Is the explanation correct and clear?", dtype=args.dtype,
        max_new_tokens=args.judge_tokens,
    )  # fmt: skip

    def rollout(seed: int) -> list[str]:
        gen = sampler.generate(params, prompt, sampling, jax.random.key(seed))
        return [s.text for s in gen.samples[0]]

    def judged(texts: list[str]) -> list[float]:
        return judge(texts, question=[question] * len(texts))

    judged(rollout(0))  # warm-up: compiles both
    t0 = time.perf_counter()
    texts = rollout(1)
    t_rollout = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = judged(texts)
    t_judge = time.perf_counter() - t0
    print(f"policy: {args.group} x {args.tokens} tokens in {t_rollout:.2f} s")
    print(f"judge:  {args.group} verdicts of <= {args.judge_tokens} tokens in {t_judge:.2f} s "
          f"({t_judge / args.group:.2f} s each); ratio judge / rollout = "
          f"{t_judge / t_rollout:.2f}")  # fmt: skip
    print(f"scores: {[round(s, 2) for s in scores]}; unparsed {judge.unparsed} of {judge.judged}")


if __name__ == "__main__":
    main()
