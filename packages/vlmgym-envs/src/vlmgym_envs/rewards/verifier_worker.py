"""The math-verify worker process that `verifier.MathVerifier` starts; not imported.

Run as a script (`python -P verifier_worker.py`), so it imports neither vlmgym_envs nor
anything from this folder. It reads one JSON request per line on stdin,
`{"id": 7, "gold": "\\frac{1}{2}", "pred": "0.5"}`, and answers each with one line,
`{"id": 7, "equal": true}`; it writes `{"ready": true}` once math-verify is imported, or
`{"error": "..."}` and exits when it cannot be. It exits at the end of stdin (the parent
closed the pipe or died).

It runs math-verify in its own main thread, so math-verify's signal-based timeouts work
here (`INNER_TIMEOUT_S` for each parse and comparison: a slow sympy call gives up without
killing the worker); the parent's deadline, which kills this process, bounds everything
the signals cannot interrupt (a long C-level big-integer operation). Its address space is
capped (argv[1], bytes) so a runaway expression fails with MemoryError, not by swapping.
Anything printed by the libraries goes to stderr, never into the replies.
"""

import contextlib
import json
import logging
import os
import resource
import sys
from functools import lru_cache

INNER_TIMEOUT_S = 1  # math-verify takes whole seconds


def _cap_memory(limit: int) -> None:
    if limit <= 0:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    # The cap is a safeguard; where it cannot be set, the parent's deadline still holds.
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)  # protocol lines only
    os.dup2(2, 1)  # library prints go to stderr
    _cap_memory(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    logging.disable(logging.CRITICAL)  # math-verify logs each timeout as a warning
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
        from math_verify.errors import TimeoutException
    except Exception as e:  # reported to the parent, which raises it
        replies.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        return
    config = [LatexExtractionConfig(), ExprExtractionConfig()]

    @lru_cache(maxsize=256)
    def parsed(answer: str) -> list:
        # Wrapped in \boxed{} so bare LaTeX (`\frac12`, `x=2`) is read as one expression.
        found = parse("\\boxed{" + answer + "}", config, parsing_timeout=INNER_TIMEOUT_S)
        return found or parse(answer, config, parsing_timeout=INNER_TIMEOUT_S)

    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request_id = None
        try:
            request = json.loads(line)
            request_id = request["id"]
            gold, pred = parsed(request["gold"]), parsed(request["pred"])
            equal = bool(gold and pred and verify(gold, pred, timeout_seconds=INNER_TIMEOUT_S))
        except (Exception, TimeoutException):  # any failure is "not shown equal"
            equal = False
        replies.write(json.dumps({"id": request_id, "equal": equal}) + "\n")


if __name__ == "__main__":
    _main()
