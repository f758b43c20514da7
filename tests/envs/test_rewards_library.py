"""Rewards as a library (vlmgym_envs.rewards): hand-checked tables per reward, properties
(never raises, in range, one score per completion), combination, resolution, columns, and
the math reward's time bound off the main thread."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vlmgym_envs.rewards import (
    REWARDS,
    MathVerifier,
    combine,
    extract_boxed,
    final_answer,
    find_boxed,
    get_reward,
    make_math_reward,
    numeric_reward,
    register_reward,
    resolve_reward,
)


def score(name: str, completion: object, **columns: object) -> float:
    """One completion's score under the registered reward `name` (columns as one row)."""
    [value] = REWARDS[name]([completion], **{k: [v] for k, v in columns.items()})
    return value


# ---------------------------------------------------------------- extraction helpers

BOXED_CASES = [
    ("\\boxed{5}", "5"),
    ("\\boxed{3} no, \\boxed{4}", "4"),  # the last one counts
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not braces
    ("\\boxed {7}", "7"),
    ("Put it in \\boxed{}. So \\boxed{9}", "9"),  # an echoed empty box is skipped
    ("\\boxed{9} and later \\boxed{}", "9"),
    ("\\boxed{5", None),  # unclosed
    ("}}} \\boxed{2} {{{", "2"),
    ("\\boxed 5", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), BOXED_CASES)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_find_boxed_orders_nested_boxes_by_opening():
    text = "\\boxed{a \\boxed{b}} \\boxed{c}"
    assert [text[s:e] for s, e in find_boxed(text)] == ["a \\boxed{b}", "b", "c"]


FINAL_ANSWER_CASES = [
    ("Answer: 5", "5"),
    ("**Final Answer:** $\\frac{1}{2}$", "\\frac{1}{2}"),
    ("The final answer is $7$. I hope it is correct.", "7"),
    ("so the answer is 12.", "12"),
    ("Answer:\n42", "42"),
    ("reasoning... #### 1,234", "1,234"),
    ("\\boxed{3}\nThe answer is 3 because 1+2=3", "3"),  # a box beats a later answer line
    ("<think>the answer is 3? no</think><answer>4</answer>", "4"),  # block, not reasoning
    ("<think>\\boxed{3}</think><answer>4</answer>", "4"),
    ("<answer>\\boxed{6}</answer>", "6"),
    ("Write <answer>X</answer>. Then: \\boxed{8}", "8"),  # echoed block, box after it
    ("<answer></answer> Answer: 2", "2"),
    ("The result is 4.", None),  # no marker: no answer
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), FINAL_ANSWER_CASES)
def test_final_answer(text, expected):
    assert final_answer(text) == expected


# ---------------------------------------------------------------- math

MATH_CASES = [
    # (completion, gold answer, expected score)
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("Answer: 0.5", "\\frac{1}{2}", 1.0),
    ("Final answer: 1/2", "$\\frac{1}{2}$", 1.0),
    ("\\boxed{2}", "3", 0.0),
    ("\\boxed{x = 2}", "2", 1.0),  # decided: an assignment counts by its right side
    ("\\boxed{-3}", "3", 0.0),
    ("\\boxed{50\\%}", "0.5", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1.0),  # sets ignore order
    ("\\boxed{(1, 2)}", "(2, 1)", 0.0),  # tuples do not
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{1000}", "Some steps.\n#### 1,000", 1.0),  # GSM8K-style gold
    ("\\boxed{72}", 72, 1.0),  # a number in the column
    ("The answer is 2", "2", 1.0),
    ("Put the answer in \\boxed{}. ... so \\boxed{4}", "4", 1.0),  # echo before the answer
    ("\\boxed{3}, no wait: \\boxed{4}", "4", 1.0),
    ("\\boxed{3}, no wait: \\boxed{4}", "3", 0.0),  # the last box counts
    ("<think>the answer is 3</think><answer>4</answer>", "4", 1.0),
    ("The result is 4.", "4", 0.0),  # no explicit answer
    ("\\boxed{\\frac{1}{2}", "1/2", 0.0),  # unbalanced: no answer
    ("", "2", 0.0),
    ("\x00\x1b\\boxed{7}\x07", "7", 1.0),
    ("x" * 100_000 + "\\boxed{5}", "5", 1.0),
    ("\\boxed{9^{9^{9^{9}}}}", "5", 0.0),
    ("\\boxed{" + "1+" * 25_000 + "1}", "25001", 0.0),  # over 2,000 characters
]


@pytest.mark.parametrize(("completion", "gold", "expected"), MATH_CASES)
def test_math_reward_table(completion, gold, expected):
    assert score("math", completion, answer=gold) == expected


def test_math_reward_reads_the_solution_column():
    solution = "Half of 3/2 is $\\boxed{\\frac{3}{4}}$."
    assert REWARDS["math"](["\\boxed{0.75}", "\\boxed{0.7}"], solution=[solution] * 2) == [
        1.0,
        0.0,
    ]


def test_math_reward_from_worker_threads():
    """Off the main thread (as the trainer scores) the verdicts are right: no signal alarm."""
    completions = ["\\boxed{\\frac{1}{2}}", "Answer: 0.25", "\\boxed{\\sqrt{4}}", "\\boxed{3}"]
    golds = ["0.5", "1/4", "2", "2"]
    expected = [1.0, 1.0, 1.0, 0.0]

    def run(_):
        assert threading.current_thread() is not threading.main_thread()
        return REWARDS["math"](completions, answer=golds)

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(run, range(4))) == [expected] * 4


def test_math_pathological_inputs_return_quickly():
    completions = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{" + "9^" * 25_000 + "9}", "\\boxed{100000!}"]
    start = time.monotonic()
    assert REWARDS["math"](completions, answer=["1"] * 3) == [0.0, 0.0, 0.0]
    assert time.monotonic() - start < 2.0


def test_math_verifier_kills_a_worker_past_its_timeout_and_recovers():
    integral = "\\int_0^1 e^{-x^2}\\sin(x^{7})\\,dx"  # sympy runs for minutes on this
    with MathVerifier(timeout_s=60.0, workers=1) as verifier:
        reward = make_math_reward(verifier)
        assert reward(["\\boxed{0.5}"], answer=["\\frac{1}{2}"]) == [1.0]  # worker started
        verifier.timeout_s = 0.5
        start = time.monotonic()
        assert reward([f"\\boxed{{{integral}}}"], answer=["5"]) == [0.0]
        assert time.monotonic() - start < 0.5 + 1.5  # the timeout, then a kill
        assert verifier.stats()["timeouts"] == 1
        verifier.timeout_s = 60.0  # the next pair starts a fresh worker
        assert reward(["\\boxed{0.25}"], answer=["\\frac{1}{4}"]) == [1.0]
        assert verifier.stats()["worker_starts"] == 2


# ---------------------------------------------------------------- choice

LIST = ["London", "Paris", "Rome"]
CHOICE_CASES = [
    # (completion, gold answer, choices, expected score)
    ("(B)", "B", None, 1.0),
    ("B.", "B", None, 1.0),
    ("Answer: B", "b", None, 1.0),
    ("the answer is b", "B", None, 1.0),
    ("\\boxed{C}", "C", None, 1.0),
    ("$\\boxed{\\text{C}}$", "(C)", None, 1.0),
    ("I think the correct option is (D).", "D", None, 1.0),
    ("(A) is wrong, (B) is wrong, so the answer is C", "C", None, 1.0),
    ("Options: (A) 1 (B) 2 (C) 3. Answer: (B)", "B", None, 1.0),
    ("<answer>(c)</answer>", "C", None, 1.0),
    ("Answer: B", "C", None, 0.0),
    ("the answer is a dog", "A", None, 0.0),  # "a" is an article, not an option
    ("A triangle has three sides.", "A", None, 0.0),
    ("(A) or (B), hard to say", "A", None, 0.0),
    ("", "A", None, 0.0),
    ("Paris", "Paris", LIST, 1.0),  # the option's text
    ("The answer is Rome.", 2, LIST, 1.0),  # a 0-based index as the gold
    ("Answer: B", "Paris", LIST, 1.0),
    ("The answer is (A) London", "Paris", LIST, 0.0),
    ("I would say Paris, not Rome", "Paris", LIST, 0.0),  # two options named
    ("\\boxed{B}", "Z", LIST, 0.0),  # a gold letter outside the options
]


@pytest.mark.parametrize(("completion", "gold", "choices", "expected"), CHOICE_CASES)
def test_choice_reward_table(completion, gold, choices, expected):
    columns = {"answer": gold} if choices is None else {"answer": gold, "choices": choices}
    assert score("choice", completion, **columns) == expected


# ---------------------------------------------------------------- exact

EXACT_CASES = [
    ("Paris", "Paris", 1.0),
    ("paris.", "Paris", 1.0),
    ("**PARIS**", "Paris", 1.0),
    ("Answer: \\text{Paris}", "Paris", 1.0),
    ("The answer is: Paris", "paris", 1.0),
    ("\\boxed{Paris} and London", "Paris", 1.0),
    ("<answer> Blue </answer>", "blue", 1.0),
    ("2", ["two", "2"], 1.0),  # any of several accepted answers
    ("Paris, France", "Paris", 0.0),
    ("Par is", "Paris", 0.0),
    ("", "Paris", 0.0),
    (" \n", "", 0.0),  # an empty answer never matches
    ("x" * 100_000, "x" * 100_000, 0.0),  # too long to compare
]


@pytest.mark.parametrize(("completion", "gold", "expected"), EXACT_CASES)
def test_exact_reward_table(completion, gold, expected):
    assert score("exact", completion, answer=gold) == expected


# ---------------------------------------------------------------- numeric

NUMERIC_CASES = [
    ("The answer is 42", "42", 1.0),
    ("Answer: 1,234", "1234", 1.0),
    ("so... #### 1234", "1,234", 1.0),
    ("\\boxed{0.5}", "1/2", 1.0),
    ("\\boxed{\\frac{1}{2}}", 0.5, 1.0),
    ("Answer: 25%", "0.25", 1.0),
    ("Answer: 25%", "25", 1.0),
    ("It is 3.14159", "3.1416", 1.0),  # within rel 1e-4
    ("It is 3.14", "3.1416", 0.0),
    ("Answer: 12 cm^2", "12", 1.0),  # the exponent of a unit is not the number
    ("The speed is 5 m/s", "5", 1.0),
    ("Answer: 12346", "12345", 0.0),  # integers compare exactly
    ("1.5 \\times 10^{3}", "1500", 1.0),
    ("1e3", "1000", 1.0),
    ("It costs $1,000.50", "1000.5", 1.0),
    ("Answer: -7", "-7", 1.0),
    ("Answer: 10 (not 12)", "12", 1.0),  # the last number of the answer counts
    ("First 12, then finally 10", "12", 0.0),
    ("no number here", "5", 0.0),
    ("", "5", 0.0),
    ("x" * 100_000 + " 7", "7", 1.0),
]


@pytest.mark.parametrize(("completion", "gold", "expected"), NUMERIC_CASES)
def test_numeric_reward_table(completion, gold, expected):
    assert score("numeric", completion, answer=gold) == expected


def test_numeric_reward_tolerances():
    loose = numeric_reward(abs_tol=0.5, rel_tol=0.0)
    assert loose(["10.4", "10.6"], answer=["10.0", "10.0"]) == [1.0, 0.0]
    assert score("numeric", "10.4", answer="10.0") == 0.0
    with pytest.raises(ValueError, match="rel_tol"):
        numeric_reward(rel_tol=-1.0)


# ---------------------------------------------------------------- format, boxed_format

FORMAT_CASES = [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("<think>a</think>\n\n<answer>b</answer>\n", 1.0),
    ("  <think></think><answer>b</answer>", 1.0),  # an empty think block is allowed
    ("<think>a</think><answer>b</answer><|im_end|>", 1.0),  # a trailing stop marker
    ("<think>a</think><answer> </answer>", 0.0),  # a blank answer is not
    ("x<think>a</think><answer>b</answer>", 0.0),
    ("<think>a</think><answer>b</answer>x", 0.0),
    ("<think>a</think>x<answer>b</answer>", 0.0),
    ("<answer>b</answer><think>a</think>", 0.0),
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),
    ("<think><think>a</think><answer>b</answer>", 0.0),
    ("<think>a<answer>b</think></answer>", 0.0),
    ("<think>a</think><answer>b", 0.0),
    ("", 0.0),
]


@pytest.mark.parametrize(("completion", "expected"), FORMAT_CASES)
def test_format_reward_table(completion, expected):
    assert score("format", completion) == expected


BOXED_FORMAT_CASES = [
    ("\\boxed{5}", 1.0),
    ("so x = \\boxed{5}.", 1.0),
    ("\\boxed{\\frac{1}{2}}", 1.0),
    ("\\boxed{\\{1\\}}", 1.0),
    ("\\boxed{}", 0.0),
    ("\\boxed{5", 0.0),
    ("\\boxed{3} \\boxed{5}", 0.0),
    ("\\boxed{\\boxed{5}}", 0.0),
    ("\\boxed 5", 0.0),
    ("5", 0.0),
    ("", 0.0),
]


@pytest.mark.parametrize(("completion", "expected"), BOXED_FORMAT_CASES)
def test_boxed_format_reward_table(completion, expected):
    assert score("boxed_format", completion) == expected


# ---------------------------------------------------------------- properties

PIECES = [
    "\\boxed{", "{", "}", "\\{", "<think>", "</think>", "<answer>", "</answer>", "Answer:",
    "the answer is", "####", "$", "\\frac{1}{2}", "(B)", "B.", "1,000", "%", "^", "\\text{",
    "\x00", "\n", " ", "7", "-", ".", "x", "<|im_end|>", "é", "option", "\\times 10^{3}",
]  # fmt: skip
texts = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=25).map("".join)
CHEAP = ["choice", "exact", "numeric", "format", "boxed_format"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _check_scores(name: str, completions: list[str], **columns: list[object]) -> None:
    handler = _Records()
    logger = logging.getLogger("vlmgym_envs.rewards.inputs")
    logger.addHandler(handler)
    try:
        scores = REWARDS[name](completions, **columns)
    finally:
        logger.removeHandler(handler)
    assert len(scores) == len(completions)
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    assert not handler.records, [r.getMessage() for r in handler.records]  # no masked bug


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    completions=st.lists(texts, min_size=1, max_size=4),
    gold=texts,
    choices=st.none() | st.lists(texts, max_size=4),
)
def test_cheap_rewards_never_raise_and_stay_in_range(completions, gold, choices):
    n = len(completions)
    for name in CHEAP:
        _check_scores(name, completions, answer=[gold] * n, choices=[choices] * n)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completion=texts, gold=texts)
def test_math_reward_never_raises_and_stays_in_range(completion, gold):
    _check_scores("math", [completion], answer=[gold])


def test_adversarial_completions_score_in_linear_time():
    completions = [
        "\\boxed{" * 20_000,
        "{" * 100_000 + "\\boxed{1}",
        "}" * 100_000,
        "answer" + " " * 100_000 + "x",
        "option" + " " * 100_000 + "x",
        "<answer>" * 10_000 + "</answer>" * 10_000,
        "<|im_end|>" * 20_000,
        "1 " * 50_000,
    ]
    start = time.monotonic()
    for name in REWARDS:
        _check_scores(name, completions, answer=["1"] * len(completions))
    assert time.monotonic() - start < 10.0  # quadratic scans would take minutes


def test_rewards_read_trl_inputs():
    """TRL passes everything by keyword, chat completions as message lists, and extras."""
    chat = [{"role": "assistant", "content": "\\boxed{1}"}]
    parts = {"role": "assistant", "content": [{"type": "text", "text": "Answer: 1"}]}
    completions = [chat, parts, None, b"\\boxed{1}", 12]
    scores = REWARDS["math"](
        completions=completions,
        answer=["1"] * 5,
        prompts=["q"] * 5,
        completion_ids=[[1]] * 5,
        trainer_state=object(),
    )
    assert scores == [1.0, 1.0, 0.0, 1.0, 0.0]


# ---------------------------------------------------------------- columns


@pytest.mark.parametrize("name", ["math", "choice", "exact", "numeric"])
def test_missing_column_is_a_clear_error(name):
    with pytest.raises(ValueError, match=rf"reward '{name}' needs the column 'answer'.*question"):
        REWARDS[name](["x"], question=["q"])


def test_misaligned_column_is_an_error():
    with pytest.raises(ValueError, match="2 values for 1 completions"):
        REWARDS["exact"](["x"], answer=["a", "b"])
    with pytest.raises(ValueError, match="must be a list"):
        REWARDS["exact"](["x"], answer="x")
    with pytest.raises(TypeError, match="list of completions"):
        REWARDS["exact"]("x", answer=["x"])


def test_format_rewards_need_no_column():
    assert REWARDS["format"]([]) == []
    assert REWARDS["boxed_format"](["\\boxed{1}"], anything=[1]) == [1.0]


# ---------------------------------------------------------------- registry


def test_combine_weights():
    completions = [
        "<think>t</think><answer>Paris</answer>",
        "Paris",
        "<think></think><answer>x</answer>",
    ]
    answers = ["Paris"] * 3
    reward = combine(["exact", "format"], [1.0, 0.5])
    assert reward(completions, answer=answers) == [1.5, 1.0, 0.5]
    assert combine(["exact", "format"])(completions, answer=answers) == [2.0, 1.0, 1.0]
    penalty = combine([REWARDS["exact"], "format"], [1.0, -0.25])
    assert penalty(completions, answer=answers) == [0.75, 1.0, -0.25]
    assert [name for name, _, _ in reward.components] == ["exact", "format"]


def test_combine_rejects_bad_weights_and_scores():
    with pytest.raises(ValueError, match="2 rewards but 1 weights"):
        combine(["exact", "format"], [1.0])
    with pytest.raises(ValueError, match="finite"):
        combine(["exact"], [float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        combine([])
    short = combine([lambda completions, **_: [1.0]])
    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        short(["a", "b"])


def test_resolve_reward_forms():
    completions, answers = ["<think>t</think><answer>Paris</answer>"], ["Paris"]
    assert resolve_reward("math") is REWARDS["math"]
    assert resolve_reward(" EXACT ") is REWARDS["exact"]
    assert resolve_reward(REWARDS["format"]) is REWARDS["format"]
    assert resolve_reward(["exact"]) is REWARDS["exact"]
    for spec, expected in [
        (["exact", "format"], 2.0),
        ({"exact": 1.0, "format": 0.1}, 1.1),
        ('{"exact": 2, "format": 0.5}', 2.5),  # JSON as a command line passes it
        ('["exact", "format"]', 2.0),
    ]:
        assert resolve_reward(spec)(completions, answer=answers) == [pytest.approx(expected)]
    assert resolve_reward("vlmgym_envs.rewards.structure:format_reward") is REWARDS["format"]
    with pytest.raises(ValueError, match=r"no reward named .nope.; registered: .*math"):
        resolve_reward("nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_reward("{math: 1}")
    with pytest.raises(TypeError):
        resolve_reward(12)


def test_register_reward_is_case_insensitive_and_refuses_taken_names():
    @register_reward("Length_Test")
    def length(completions, **_):
        return [min(len(c), 10) / 10 for c in completions]

    try:
        assert get_reward("length_test") is length
        assert resolve_reward({"LENGTH_TEST": 2.0})(["abcde"]) == [1.0]
        with pytest.raises(ValueError, match="taken"):
            register_reward("length_TEST")(length)
        register_reward("length_test", overwrite=True)(REWARDS["format"])
        assert get_reward("Length_Test") is REWARDS["format"]
    finally:
        REWARDS.pop("length_test", None)
    with pytest.raises(ValueError, match="no reward named"):
        get_reward("length_test")
