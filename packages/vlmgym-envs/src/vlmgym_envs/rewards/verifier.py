"""`MathVerifier`: is an answer mathematically equal to the gold one? Bounded in time.

math-verify (`parse`, `verify`) decides the equivalence with sympy, and sympy can run for
minutes on a short answer: `\\int_0^1 e^{-x^2}\\sin(x^7)\\,dx` or `9^{9^{9^9}}` did not
finish in 20 s here. math-verify's own timeouts use `signal.alarm`, which works only in
the main thread (the trainer scores in a worker thread: math-verify then raises
ValueError) and cannot interrupt a long C-level computation. No thread can stop another
thread, so a hard bound needs a process:

- The parent never imports math-verify or sympy. Each pair goes, as one JSON line, to a
  worker process (`verifier_worker.py`) that runs math-verify in its main thread with its
  signal timeouts at 1 s (a slow comparison gives up without killing the worker).
- The parent waits `timeout_s` (default 3 s) per pair; past that it kills the worker and
  scores the pair not equal. The next pair starts a fresh worker (about 3 s to import
  sympy on a busy 2-core machine). The worker's address space is capped
  (`memory_limit_bytes`, default 2 GiB). Works from any thread; POSIX only (`poll`).
- Cheap checks first, in the parent: empty answers (not equal), the same text up to
  spaces and `$` (equal), two integers (`12`, `-3`, `1,000`: compared exactly), an answer
  over `MAX_ANSWER_CHARS` or with a tower of powers on a number (`9^{9^9}`), an exponent
  over 6 digits or a factorial of 4 or more digits (not equal, never evaluated: what
  would take seconds never reaches sympy). Verdicts are cached (LRU) by pair: a GRPO
  group repeats its answers.

Cost per pair, measured on the busy 2-core development machine (one worker, no cache):
the cheap checks and cache hits take about 4 microseconds; numbers and fractions that
reach sympy (`\\frac{1}{2}` vs `0.5`, `2` vs `x=2`) 0.5 ms median, up to 40 ms; symbolic
ones (`x^2+2x+1` vs `(x+1)^2`, `\\sqrt{2}` vs `2^{1/2}`) 8 ms median, up to 0.5 s
(`\\pi` vs 3.14159, evaluated numerically); a pair sympy cannot finish, 1.3 s (the
worker's own timeout). A batch of 512 GRPO completions over 4 gold answers took 0.5 s.
A worker takes about 2.5 s to start and 100-150 MB of memory.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 2000
_WORKER = Path(__file__).with_name("verifier_worker.py")
_SPACES = re.compile(r"\s+|\\[,;:! ]|\\left|\\right|\$")
_INTEGER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d{1,100})")
_FACTORIAL = re.compile(r"\d{4,}\s*!")
_CARET = re.compile(r"\^\s*")
_CARET_NEXT = re.compile(r"\s*\^")
_TOKEN = re.compile(r"\\[a-zA-Z]+|\d+|\w")
_BIG_INTEGER = re.compile(r"\s*[-+]?\d{7,}\s*")
_BRACE_TOKEN = re.compile(r"\\[\\{}]|[{}]")


class MathVerifierError(RuntimeError):
    """The math-verify worker could not be started (math-verify missing, no Python...)."""


class _Worker:
    """One worker process, started on demand; used by one thread at a time."""

    def __init__(self, memory_limit_bytes: int, startup_timeout_s: float):
        self.memory_limit_bytes = memory_limit_bytes
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.buffer = b""
        self.next_id = 0

    def start(self) -> None:
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", str(_WORKER), str(self.memory_limit_bytes)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal is the parent's to handle
            )
        except OSError as e:
            raise MathVerifierError(f"the math-verify worker did not start: {e}") from e
        self.buffer = b""
        reply = self._read(time.monotonic() + self.startup_timeout_s)
        if reply is None or not reply.get("ready"):
            self.stop()
            why = reply.get("error") if reply else "no reply"
            raise MathVerifierError(f"the math-verify worker did not start: {why}")

    def ask(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        """The worker's verdict, or None when it timed out or died (it is then stopped)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        self.next_id += 1
        line = json.dumps({"id": self.next_id, "gold": gold, "pred": pred}) + "\n"
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        except OSError:  # the worker died since the last pair
            self.stop()
            return None
        reply = self._read(time.monotonic() + timeout_s)
        if reply is None or reply.get("id") != self.next_id:
            self.stop()
            return None
        return bool(reply.get("equal"))

    def _read(self, deadline: float) -> dict | None:
        """One JSON reply line, or None at the deadline, end of output or a bad line."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            poller = select.poll()  # not select(): it fails on descriptors past 1023
            poller.register(fd, select.POLLIN)
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            return None
        return reply if isinstance(reply, dict) else None

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc)
            self.proc = None


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()


def _canonical(answer: str) -> str:
    return _SPACES.sub("", answer).rstrip(".")


def too_costly(answer: str) -> bool:
    """Whether an answer is refused unevaluated: longer than `MAX_ANSWER_CHARS`, a tower of
    powers of numbers (`9^{9^9}`, `9^9^9`, `9**9**9`; `e^{-x^2}` and `2^{n^2}` pass), an
    exponent of more than 6 digits, or a factorial of a number of 4 or more digits. Linear
    in the answer's length but for nested exponents of a number (at most 2,000 characters).
    """
    if len(answer) > MAX_ANSWER_CHARS or _FACTORIAL.search(answer):
        return True
    s = answer.replace("**", "^")
    closing = _closing_braces(s)
    for m in _CARET.finditer(s):
        start = m.end()
        if s.startswith("{", start):
            end = closing.get(start, len(s))
            exponent = s[start + 1 : end]
            end += 1
        elif s.startswith("(", start):  # up to the first ")": enough to see a "^" inside
            end = s.find(")", start) % (len(s) + 1)
            exponent = s[start:end]
        else:
            token = _TOKEN.match(s, start)
            exponent = token.group() if token else ""
            end = token.end() if token else start
        if _BIG_INTEGER.fullmatch(exponent):
            return True
        if _number_before(s, m.start()) and (
            any(_number_before(exponent, k.start()) for k in _CARET.finditer(exponent))
            or (_CARET_NEXT.match(s, end) and _number_before(s, end))
        ):
            return True
    return False


def _number_before(s: str, i: int) -> bool:
    """Whether an integer (`9`, `{9}`, `(9)`) ends just before `s[i]`: the base of a power
    there is a number, which sympy evaluates (`e^{x^2}` is fine, `9^{9^9}` is not)."""
    i = min(i, len(s))
    j = i - 1
    while j >= 0 and s[j] == " ":
        j -= 1
    if j >= 1 and s[j] in ")}":
        j -= 1
    return j >= 0 and s[j].isdigit()


def _closing_braces(s: str) -> dict[int, int]:
    """Index of each `{` -> index of its `}` (escaped braces skipped; unclosed left out)."""
    closing, stack = {}, []
    for m in _BRACE_TOKEN.finditer(s):
        if m.group() == "{":
            stack.append(m.start())
        elif m.group() == "}" and stack:
            closing[stack.pop()] = m.start()
    return closing


class MathVerifier:
    """`equal(gold, pred)`: math-verify's verdict on two extracted answers, in bounded time.

    timeout_s: the most one pair waits for its worker (then: not equal, worker restarted).
    workers: worker processes; `equal_many` spreads a batch over them. Default: a quarter
        of the CPUs, between 1 and 4.
    memory_limit_bytes: each worker's address-space cap (0: none).
    startup_timeout_s: how long a worker may take to import math-verify before
        `MathVerifierError`.
    cache_size: verdicts kept per (gold, pred) pair.

    Thread-safe. `stats()` counts pairs, cache hits, pairs refused unevaluated
    (`screened`), timeouts and worker starts. `close()` stops the workers (also done when
    the verifier is garbage-collected or the interpreter exits).
    """

    def __init__(
        self,
        timeout_s: float = 3.0,
        workers: int | None = None,
        memory_limit_bytes: int = 2 << 30,
        startup_timeout_s: float = 120.0,
        cache_size: int = 8192,
    ):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        n = workers if workers is not None else min(4, max(1, (os.cpu_count() or 1) // 4))
        if n < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.timeout_s = float(timeout_s)
        self.cache_size = cache_size
        self._workers = [_Worker(memory_limit_bytes, startup_timeout_s) for _ in range(n)]
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in self._workers:
            self._idle.put(worker)
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(
            ("pairs", "cache_hits", "screened", "timeouts", "worker_starts"), 0
        )
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    def equal(self, gold: str, pred: str) -> bool:
        """Whether `pred` equals `gold` (both extracted answers, e.g. `\\frac{1}{2}`, `0.5`).

        Never raises on the answers (MathVerifierError only when no worker can start).
        """
        self._count("pairs")
        gold, pred = str(gold).strip(), str(pred).strip()
        if not gold or not pred:
            return False
        if _canonical(gold) == _canonical(pred):
            return True
        if _INTEGER.fullmatch(gold) and _INTEGER.fullmatch(pred):
            return int(gold.replace(",", "")) == int(pred.replace(",", ""))
        if too_costly(gold) or too_costly(pred):
            self._count("screened")
            return False
        key = (gold, pred)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self._stats["cache_hits"] += 1
                return self._cache[key]
        verdict = self._ask(gold, pred)
        with self._lock:
            self._cache[key] = verdict
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return verdict

    def equal_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """`[equal(gold, pred) for gold, pred in pairs]`, spread over the workers."""
        if len(self._workers) == 1 or len(pairs) < 2:
            return [self.equal(g, p) for g, p in pairs]
        with ThreadPoolExecutor(len(self._workers), thread_name_prefix="math-verify") as pool:
            return list(pool.map(lambda pair: self.equal(*pair), pairs))

    def _ask(self, gold: str, pred: str) -> bool:
        worker = self._idle.get()
        try:
            if worker.proc is None or worker.proc.poll() is not None:
                self._count("worker_starts")
            verdict = worker.ask(gold, pred, self.timeout_s)
        finally:
            self._idle.put(worker)
        if verdict is None:
            self._count("timeouts")
            logger.warning(
                "math-verify gave no verdict within %.1f s (%d and %d characters); scored 0, "
                "worker restarted",
                self.timeout_s,
                len(gold),
                len(pred),
            )
            return False
        return verdict

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def stats(self) -> dict[str, int]:
        """Counts since creation: pairs, cache_hits, screened, timeouts, worker_starts."""
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """Stop the worker processes (a later `equal` starts new ones)."""
        for worker in self._workers:
            worker.stop()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """The process-wide `MathVerifier()` the `math` reward uses, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifier()
        return _default
