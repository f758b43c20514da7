"""`dataset`: an environment from any table of rows and a reward.

    env = DatasetEnv("hiyouga/geometry3k", "train", image_column="images",
                     prompt="{problem} Put the final answer in \\\\boxed{{}}.", reward="math")
    state, obs = env.reset(0)             # the row's images and prompt
    result = env.step(state, completion)  # reward(completions=[completion], answer=[...], ...)

Rows come from a `datasets.Dataset` / `DatasetDict`, a `save_to_disk` folder, parquet,
JSON Lines or CSV files (a file, a glob or a folder), or a hub dataset id read from the
hub cache (`dataset_table.open_table`). Images stay undecoded until `reset`.

What the model sees (`dataset_prompt`): the row's images (`image_column`: one column or a
list of them; none for text-only rows) and either a `prompt` template over the row's
columns ("...{problem}...") or a `messages_column` of HF chat messages, optionally led by a
`system_prompt`. Images go before the text, or at `<image>` markers.

Reward (`reward=`, required; `dataset_reward`): a name the rewards library resolves
("math", "choice", "exact", "numeric", "format", "boxed_format"), a callable, a list of
them (summed) or a dict {name: weight} (a weighted sum). Each is called TRL-style, batched:
`fn(completions: list[str], **columns) -> list[float]`, with every light column of the rows
(one list per column, aligned with the completions; the `answer_column` also as `answer`; a
callable without `**kwargs` gets only the columns it names). `step_many` calls each once
for all its texts. A reward that raises or returns something other than one finite number
(or None: 0) per completion is retried one completion at a time; a completion it still
fails on scores 0 for that part, with `info["reward_error"]` (one line), counted in
`reward_errors`.

`info`: "correct" (the accuracy part, the first that is not a format reward, is at least
1 - 1e-9), "answer" (the `answer_column` cell, when the table has it), "reward_parts"
(each part's unweighted value, when there are several), the `info_columns` cells, and
"reward_error". `metrics(records)`: accuracy, the mean of each part, reward errors.

Bad data: a missing column is a one-line `DataError` at construction naming it and the
columns there are; an image that cannot be shown raises `SkipTask` from `reset`
("corrupt_image", "missing_image"...; a messages cell that is not a conversation:
"bad_messages"); `skipped()` counts them with the rows dropped while loading.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from vlmgym_envs.core import Env, Observation, StepResult, as_text, system_message
from vlmgym_envs.data.errors import DataError, SkipCounts, SkipTask
from vlmgym_envs.data.images import (
    DEFAULT_MAX_DECODED_PIXELS,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLimits,
)
from vlmgym_envs.dataset_prompt import (
    IMAGE_MARKER,
    PromptTemplate,
    chat_messages,
    check_columns,
    row_images,
    user_content,
)
from vlmgym_envs.dataset_reward import (
    CORRECT_AT,
    FORMAT_REWARDS,
    GOLD_REWARDS,
    call_reward,
    required_columns,
    reward_parts,
)
from vlmgym_envs.dataset_table import RowTable, open_table


@dataclass(frozen=True)
class DatasetState:
    """One episode: task `idx` shows table row `row`."""

    idx: int
    row: int


def _jsonable(value: Any, numbers: bool = False) -> Any:
    """A cell as a JSON value for `info`; numbers as text unless `numbers` (a gold answer
    is not a metric for the trainer to average)."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int | float):
        return value if numbers else str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v, numbers) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, numbers) for k, v in value.items()}
    return str(value)


class DatasetEnv(Env[DatasetState]):
    """An environment from a table of rows (see the module docstring).

    path: the table: a path, glob, hub id, or a `datasets.Dataset` / `DatasetDict`.
    split: the split to read (None: the only one, or every file).
    image_column: the column(s) holding the row's images (None: text only).
    prompt: a template over the columns ("...{problem}..."); or messages_column: a column
        of HF chat messages. system_prompt: a system message to lead with.
    reward: see the module docstring (required).
    answer_column: the gold answer's column: rewards get it as `answer` too, and
        `info["answer"]` shows it (the default "answer" may be absent; another name must
        exist; a reward comparing with the gold needs one).
    info_columns: more columns to copy into `info`.
    derived: extra columns computed once per row from its light columns, name ->
        fn(row dict) (Python only); a fn raising `SkipTask` drops the row, counted.
    keep: fn(row dict) -> bool choosing the rows to use (after `derived`).
    image_marker: the text marking where an image goes (None: images always first).
    download: fetch a hub dataset missing from the cache, where the network allows.
    max_rows: use the first this many rows.
    max_image_side, max_image_pixels, max_decoded_pixels, max_image_bytes: the image limits
        (`data.images.ImageLimits`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Any = None,
        split: str | None = None,
        *,
        image_column: str | Sequence[str] | None = None,
        prompt: str | None = None,
        messages_column: str | None = None,
        system_prompt: str | None = None,
        reward: Any = None,
        answer_column: str | None = "answer",
        info_columns: Sequence[str] = (),
        derived: Mapping[str, Callable[[Mapping[str, Any]], Any]] | None = None,
        keep: Callable[[Mapping[str, Any]], bool] | None = None,
        image_marker: str | None = IMAGE_MARKER,
        download: bool = False,
        max_rows: int | None = None,
        max_image_side: int | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ) -> None:
        if path is None:
            raise ValueError("path= is required: a file, folder, glob, hub id or a Dataset")
        if (prompt is None) == (messages_column is None):
            raise ValueError(
                "give exactly one of prompt= (a template over the row's columns, like "
                "'{problem}') and messages_column="
            )
        self.parts = reward_parts(reward)
        self.template = PromptTemplate(prompt) if prompt is not None else None
        self.image_limits = ImageLimits(
            max_image_pixels=max_image_pixels,
            max_side=max_image_side,
            max_decoded_pixels=max_decoded_pixels,
            max_image_bytes=max_image_bytes,
        )
        self.table: RowTable = open_table(path, split, download=download)
        images = [image_column] if isinstance(image_column, str) else list(image_column or [])
        self.image_columns = images
        self.messages_column = messages_column
        self.system_prompt = system_prompt
        self.image_marker = image_marker or None
        self.skips = SkipCounts()
        self.reward_errors = 0
        derived = dict(derived or {})
        light = [*self.table.columns, *derived]
        self._check_columns(answer_column, list(info_columns), light)
        self.answer_column = answer_column if answer_column in light else None
        self.derived: dict[str, list[Any]] = {}
        self.index = self._select_rows(derived, keep, max_rows)
        self.info_columns = list(info_columns)

    # construction ----------------------------------------------------------------------

    def _row(self, row: int) -> dict[str, Any]:
        out = {c: values[row] for c, values in self.table.columns.items()}
        out.update({c: values[row] for c, values in self.derived.items()})
        return out

    def _select_rows(
        self,
        derived: dict[str, Callable[..., Any]],
        keep: Callable[..., bool] | None,
        max_rows: int | None,
    ) -> list[int]:
        n = len(self.table)
        if not derived and keep is None:
            index = list(range(n if max_rows is None else min(n, max_rows)))
        else:
            self.derived = {name: [None] * n for name in derived}
            index = []
            for row in range(n):
                if max_rows is not None and len(index) >= max_rows:
                    break
                values = self._row(row)
                try:
                    for name, fn in derived.items():
                        values[name] = self.derived[name][row] = fn(values)
                except SkipTask as err:
                    self.skips.add(err.reason)
                    continue
                except KeyError as err:
                    raise DataError(
                        f"{self.table.where} has no column {err} (read by derived column "
                        f"{name!r}); its columns: {self.table.names}"
                    ) from None
                if keep is None or keep(values):
                    index.append(row)
        if not index:
            raise DataError(f"{self.table.where} has no usable rows ({self.skipped() or 'empty'})")
        return index

    def _check_columns(
        self, answer_column: str | None, info_columns: list[str], light: list[str]
    ) -> None:
        """One-line `DataError`s for the columns the env needs and the table lacks (`light`:
        the in-memory columns and the derived ones)."""
        names = list(dict.fromkeys([*self.table.names, *light]))
        where = self.table.where
        wanted = {c: "image_column" for c in self.image_columns}
        if self.messages_column is not None:
            wanted[self.messages_column] = "messages_column"
        if self.template is not None:
            wanted.update({f: f"prompt field {{{f}}}" for f in self.template.fields})
        wanted.update({c: "info_columns" for c in info_columns})
        if answer_column is not None and answer_column != "answer":
            wanted[answer_column] = "answer_column"
        check_columns(names, wanted, where)
        for column, role in wanted.items():
            if role != "image_column" and self.table.heavy(column):
                raise DataError(
                    f"{where} column {column!r} holds binary data; it cannot be the {role}"
                )
        gold = answer_column if answer_column in light else None
        for part in self.parts:
            if part.named and part.name in GOLD_REWARDS and gold is None:
                raise DataError(
                    f"reward {part.name} compares with the gold answer, and {where} has no "
                    f"column {answer_column or 'answer'!r}; name it with answer_column=; its "
                    f"columns: {names}"
                )
            if part.columns is None:
                continue
            missing = [c for c in required_columns(part.fn) if c not in light]
            if missing:
                raise DataError(
                    f"reward {part.name} needs column(s) {missing}; {where} has {light}"
                )

    # the Env API ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.index)

    def answer_vocabulary(self) -> tuple[str, ...]:
        """The distinct gold answers, when there are at most 10,000 (for a tokenizer built
        for the data, as the tiny preset's is); () without an answer column."""
        if self.answer_column is None:
            return ()
        words: set[str] = set()
        for row in self.index:
            words.add(str(self._row(row)[self.answer_column]))
            if len(words) > 10_000:
                return ()
        return tuple(sorted(words))

    def skipped(self) -> dict[str, int]:
        """Rows dropped while loading and tasks `reset` could not show, per reason."""
        counts = SkipCounts(self.table.skips)
        for reason, n in self.skips.items():
            counts.add(reason, n)
        return dict(counts)

    def reset(self, idx: int) -> tuple[DatasetState, Observation]:
        i = self.check_index(idx)
        row = self.index[i]
        with self.skips.counting():
            images = self.images(row)
            if self.template is not None:
                text = self.template.render(self._row(row))
                content = user_content(text, images, self.image_marker)
                messages = [{"role": "user", "content": content}]
            else:
                column = str(self.messages_column)
                cell = self.table.cells(row, [column])[column]
                what = f"row {row} column {column!r}"
                messages = chat_messages(cell, images, self.image_marker, what)
        if self.system_prompt:
            if messages and messages[0]["role"] == "system":
                messages = messages[1:]
            messages.insert(0, system_message(self.system_prompt))
        return DatasetState(i, row), Observation(messages)

    def images(self, row: int) -> list[Any]:
        """The decoded images of table `row`, in column order (`SkipTask` when one cannot
        be shown)."""
        cells = self.table.cells(row, self.image_columns) if self.image_columns else {}
        roots = self.table.roots(row)
        return [
            image
            for column in self.image_columns
            for image in row_images(
                cells[column], f"row {row} column {column!r}", roots, self.image_limits
            )
        ]

    def step(self, state: DatasetState, text: str) -> StepResult[DatasetState]:
        return self.step_many([state], [text])[0]

    def step_many(
        self, states: Sequence[DatasetState], texts: Sequence[str]
    ) -> list[StepResult[DatasetState]]:
        """Score all texts with one call of each reward (TRL-style, columns aligned)."""
        if len(states) != len(texts):
            raise ValueError(f"step_many got {len(states)} states but {len(texts)} texts")
        n = len(texts)
        if n == 0:
            return []
        texts = [as_text(t) for t in texts]
        rows = [s.row for s in states]
        columns = {c: [values[r] for r in rows] for c, values in self.table.columns.items()}
        columns.update({c: [values[r] for r in rows] for c, values in self.derived.items()})
        for c in ("completions", *self.image_columns):
            columns.pop(c, None)
        if self.answer_column is not None:
            columns["answer"] = columns[self.answer_column]
        values: dict[str, list[float | None]] = {}
        errors: list[list[str]] = [[] for _ in range(n)]
        for part in self.parts:
            given = columns
            if part.columns is not None:
                given = {c: v for c, v in columns.items() if c in part.columns}
            values[part.name], part_errors = call_reward(part, texts, given)
            for i, e in enumerate(part_errors):
                if e:
                    errors[i].append(e)
        self.reward_errors += sum(bool(e) for e in errors)
        return [
            self._result(state, i, values, errors[i], texts[i]) for i, state in enumerate(states)
        ]

    def _result(
        self,
        state: DatasetState,
        i: int,
        values: dict[str, list[float | None]],
        errors: list[str],
        text: str,
    ) -> StepResult[DatasetState]:
        from vlmgym_envs.rewards.extract import final_answer

        parts = {name: v[i] for name, v in values.items()}
        reward = sum(p.weight * (parts[p.name] or 0.0) for p in self.parts)
        primary = next((p for p in self.parts if p.name not in FORMAT_REWARDS), self.parts[0])
        info: dict[str, Any] = {"correct": (parts[primary.name] or 0.0) >= CORRECT_AT}
        # the answer format: the format reward's verdict, else a marked final answer
        fmt = next((p for p in self.parts if p.name in FORMAT_REWARDS), None)
        ok = (parts[fmt.name] or 0.0) >= CORRECT_AT if fmt else final_answer(text) is not None
        info["format_ok"] = bool(ok)
        row = self._row(state.row) if self.answer_column or self.info_columns else {}
        if self.answer_column:
            info["answer"] = _jsonable(row[self.answer_column])
        for column in self.info_columns:
            info[column] = _jsonable(row[column], numbers=True)
        if len(self.parts) > 1:
            info["reward_parts"] = parts
        if errors:
            info["reward_error"] = "; ".join(errors)
        return StepResult(reward=float(reward), done=True, info=info)

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """accuracy (mean of info["correct"]), format_rate (of info["format_ok"]: the format
        reward's verdict, else a marked final answer: a \\boxed{}, an "Answer:" line or an
        <answer> block), each reward part's mean, reward errors."""
        if not records:
            return {}
        infos = [r.get("info") or {} for r in records]
        out = {"accuracy": fmean([bool(i.get("correct")) for i in infos])}
        out["format_rate"] = fmean([bool(i.get("format_ok")) for i in infos])
        for part in self.parts if len(self.parts) > 1 else ():
            got = [(i.get("reward_parts") or {}).get(part.name) for i in infos]
            numbers = [float(v) for v in got if isinstance(v, int | float)]
            if numbers:
                out[f"reward_parts/{part.name}"] = fmean(numbers)
        out["reward_errors"] = float(sum("reward_error" in i for i in infos))
        return out

    def step_metrics(self, infos: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The share of completions a reward failed on (`reward_error_rate`)."""
        if not infos:
            return {}
        return {"reward_error_rate": fmean([("reward_error" in i) for i in infos])}
