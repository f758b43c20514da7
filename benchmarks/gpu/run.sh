#!/usr/bin/env bash
# The prepared GPU check. On a machine with an NVIDIA GPU it finishes in under 8 minutes and
# writes benchmarks/results/<YYYY-MM-DD>-<gpu>.json plus a table on stdout: the Pallas
# attention kernels, sampler decode throughput and one GRPO step at the 3B shape (see
# benchmarks/gpu/check.py). Run it from anywhere; it works in the repository root.
#
#   bash benchmarks/gpu/run.sh                  # GPU machine
#   bash benchmarks/gpu/run.sh --smoke          # any machine: tiny shapes, CPU is fine
#   (or VLMGYM_GPU_CHECK_SMOKE=1); other flags go to check.py: --sections, --out, --impl,
#   --budget_s, --plan.
#
# Which Python runs it: the first of these that qualifies (a GPU run needs one whose
# jax.default_backend() is "gpu"; a smoke run takes any that imports jax):
#   1. $VLMGYM_PYTHON, when set;
#   2. .venv/bin/python, the uv environment. `uv sync --extra cuda12` gives it CUDA jax
#      where a registry is reachable. It is called directly, not through `uv run`, so no
#      sync undoes the install below;
#   3. python3 on the PATH: a GPU image's Python with CUDA jax, optax, numpy, pillow,
#      tokenizers and jinja2 (this workplace's H200 image has them all).
# Our own packages are not installed: kernels/src and packages/*/src go on PYTHONPATH.
#
# Carrying the environment: this repository's .venv is CPU-only and several GB (torch), so
# do not carry it to a GPU machine. Build it there (`uv sync --extra cuda12`), or carry
# nothing and let 3. run the check from source. If no candidate has a GPU backend but
# nvidia-smi sees a GPU and .venv and uv exist, one offline `uv pip install 'jax[cuda12]'`
# into .venv is tried (it works only from uv's cache); failing that the script prints one
# line and exits 3.
#
# Time: check.py skips sections that cannot finish within --budget_s (400 s) and writes
# the results file after every section; `timeout` below ends the run at 455 s regardless.
#
# Then, on a GPU run only (not --smoke), benchmarks/async_rollouts.py times --max_staleness
# 0 against 1 (scenarios slow_reward and long_tail on the tiny preset; also real, at the
# 0.5B shape, when a real-weights model_dir is here: $VLMGYM_ASYNC_MODEL_DIR, else the
# newest ${VLMGYM_CACHE:-~/.cache/vlmgym}/real-weights/v*/model) and adds its results to
# the same file under "async_rollouts", after each scenario. Both runs share one `timeout`
# of 110 s ($VLMGYM_GPU_ASYNC_TIMEOUT_S; 0 skips them), so the script ends within 10 minutes.
# The exit status is check.py's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

smoke=0
for arg in "$@"; do
    if [[ $arg == --smoke ]]; then smoke=1; fi
done
if [[ ${VLMGYM_GPU_CHECK_SMOKE:-0} != 0 && -n ${VLMGYM_GPU_CHECK_SMOKE:-} ]]; then smoke=1; fi

src="$PWD/kernels/src:$PWD/packages/vlmgym-model/src:$PWD/packages/vlmgym-train/src"
export PYTHONPATH="$src:$PWD/packages/vlmgym-envs/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# XLA's default pool is 75% of the GPU; the 3B GRPO step wants more of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

backend_of() {  # JAX's default backend under Python $1, or nothing
    timeout 120 "$1" -c 'import jax; print(jax.default_backend())' 2>/dev/null | tail -n 1
}

pick_python() {
    local py backend
    for py in ${VLMGYM_PYTHON:-} .venv/bin/python python3; do
        command -v "$py" >/dev/null 2>&1 || continue
        backend=$(backend_of "$py" || true)
        if [[ $backend == gpu || ($smoke == 1 && -n $backend) ]]; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

install_cuda_jax() {  # offline, into .venv, the jax[cuda12] matching its jax; GPU hosts only
    nvidia-smi -L >/dev/null 2>&1 || return 1
    [[ -x .venv/bin/python ]] && command -v uv >/dev/null 2>&1 || return 1
    local version
    version=$(.venv/bin/python -c 'import jax; print(jax.__version__)' 2>/dev/null) || return 1
    uv pip install --offline --quiet --python .venv/bin/python "jax[cuda12]==$version" \
        >/dev/null 2>&1 || return 1
    [[ $(backend_of .venv/bin/python) == gpu ]]
}

if ! python=$(pick_python); then
    if [[ $smoke == 0 ]] && install_cuda_jax; then
        python=.venv/bin/python
    else
        echo "gpu check: no Python here has JAX with a $([[ $smoke == 1 ]] && echo working || echo GPU) backend (tried \$VLMGYM_PYTHON, .venv/bin/python, python3; an offline jax[cuda12] install was not possible)"
        exit 3
    fi
fi
echo "gpu check: $python ($("$python" -c 'import sys; print(sys.version.split()[0])'))"
stamp=$(mktemp)  # older than the results file check.py writes
log=$(mktemp)
trap 'rm -f "$stamp" "$log"' EXIT
status=0
timeout -k 15 "${VLMGYM_GPU_CHECK_TIMEOUT_S:-455}" "$python" benchmarks/gpu/check.py "$@" \
    | tee "$log" || status=${PIPESTATUS[0]}
async_s=${VLMGYM_GPU_ASYNC_TIMEOUT_S:-110}
if [[ $smoke == 1 || $status == 3 || $async_s == 0 ]]; then
    exit "$status"
fi
results=$(sed -n 's/^results: //p' "$log" | tail -n 1)
if [[ -z $results ]]; then  # check.py was stopped before printing its path: its file
    results=$(find benchmarks/results -name '*.json' -newer "$stamp" | head -n 1)
fi
async_until=$((SECONDS + async_s))
async_rollouts() {  # benchmarks/async_rollouts.py ARGS..., within what is left of async_s
    local left=$((async_until - SECONDS))
    if ((left < 20)); then
        echo "async rollouts: ${left} s left, skipping $*"
        return 0
    fi
    echo "async rollouts: $* -> ${results:-(no results file)}"
    timeout -k 10 "$left" "$python" benchmarks/async_rollouts.py "$@" \
        ${results:+--results "$results"} \
        || echo "async rollouts: exit status $? (the file keeps the scenarios that finished)"
}
async_rollouts --scenario slow_reward,long_tail
cache=${VLMGYM_CACHE:-$HOME/.cache/vlmgym}
real_dir=${VLMGYM_ASYNC_MODEL_DIR:-$( (ls -d "$cache"/real-weights/v*/model 2>/dev/null || true) | tail -n 1)}
if [[ -n $real_dir && -d $real_dir ]]; then
    # The 0.5B shape at a GPU batch: 8 tasks x 8 samples, 64 new tokens, 20 ms of reward each.
    async_rollouts --scenario real --model_dir "$real_dir" --groups 8 --group_size 8 \
        --tokens 64 --sleep_ms 20
else
    echo "async rollouts: no real-weights model_dir here (VLMGYM_ASYNC_MODEL_DIR), no 0.5B run"
fi
exit "$status"
