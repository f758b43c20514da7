"""Multi-turn prompts as exact token sequences.

In a multi-turn episode (tool calls, feedback, retries) the prompt of turn k+1 is

    prompt_k  +  the tokens the sampler drew at turn k  +  the tokens of what the env appended

and never the chat template re-rendered over the decoded conversation: decoding and
re-encoding can change tokens (BPE merges across the reply's edges, normalised whitespace,
a template that rewrites earlier assistant turns), so the model would be trained on tokens
it did not sample and the importance ratio of every later turn would be off. Images the
env returns are processed once, when they arrive, and stay where the model saw them.

The env's messages are tokenised as the chat template renders them after an assistant
turn: the template is rendered over a probe conversation (a user turn and an assistant
turn holding a marker) with and without the new messages, and the difference is the
text appended. Whatever closes the assistant turn (Qwen: `<|im_end|>` and a newline)
is appended too, less the stop token the sampler already drew. This assumes what the
template writes for a message does not depend on the messages before it, which holds for
user, system and tool-response messages in Qwen's templates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_MARKER = "\u2063vlmgym-probe\u2063"  # text no template rewrites and no env writes
_PROBE: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "text", "text": "hello"}]},
    {"role": "assistant", "content": [{"type": "text", "text": _MARKER}]},
]


@dataclasses.dataclass(frozen=True)
class TokenPrompt:
    """A prompt as the exact tokens a sampler reads, with its images in order.

    ids: int32[T], image placeholders already expanded (one per image patch group).
    pixel_values: float32[P, D] of this prompt's images, or None without images.
    image_grid_thw: int64[n, 3], one row per image, or None.
    """

    ids: np.ndarray
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else len(self.image_grid_thw)

    def extend(self, other: TokenPrompt) -> TokenPrompt:
        """This prompt followed by `other` (its tokens, then its images)."""
        pixels = [p for p in (self.pixel_values, other.pixel_values) if p is not None]
        grids = [g for g in (self.image_grid_thw, other.image_grid_thw) if g is not None]
        return TokenPrompt(
            ids=np.concatenate([self.ids, other.ids]).astype(np.int32),
            pixel_values=np.concatenate(pixels) if pixels else None,
            image_grid_thw=np.concatenate(grids) if grids else None,
        )


def split_encoded(processor: Any, inputs: Mapping[str, Any]) -> list[TokenPrompt]:
    """A processor's batch output (`Processor.__call__`) as one `TokenPrompt` per row."""
    ids = np.asarray(inputs["input_ids"])
    mask = np.asarray(inputs["attention_mask"]).astype(bool)
    pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
    per_image = np.zeros(0, np.int64) if grid is None else processor.num_image_tokens(grid)
    out: list[TokenPrompt] = []
    image = patch = 0
    for row, keep in zip(ids, mask, strict=True):
        row_ids = row[keep].astype(np.int32)
        placeholders = int(np.sum(row_ids == processor.image_token_id))
        first_image, first_patch = image, patch
        while placeholders > 0 and image < len(per_image):
            placeholders -= int(per_image[image])
            patch += int(np.prod(grid[image]))  # type: ignore[index]
            image += 1
        if placeholders:
            raise ValueError("image placeholders do not match image_grid_thw")
        if image == first_image:
            out.append(TokenPrompt(row_ids))
            continue
        out.append(
            TokenPrompt(
                row_ids,
                np.asarray(pixels)[first_patch:patch],
                np.asarray(grid)[first_image:image],
            )
        )
    return out


def encode_conversations(
    processor: Any,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> list[TokenPrompt]:
    """First-turn prompts: each conversation through the chat template (with the
    generation prompt) and the processor, as the exact tokens the sampler will read."""
    inputs = processor(
        [list(c) for c in conversations],
        add_generation_prompt=True,
        padding_side="left",
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    return split_encoded(processor, inputs)


def _render(processor: Any, messages: list[dict[str, Any]], generation: bool) -> str:
    return str(processor.apply_chat_template(messages, add_generation_prompt=generation))


def continuation_text(processor: Any, messages: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """(what closes an assistant turn, what the template writes for `messages` after it,
    the generation prompt included), e.g. for Qwen ("<|im_end|>\\n",
    "<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n")."""
    head = _render(processor, list(_PROBE), False)
    full = _render(processor, [*_PROBE, *[dict(m) for m in messages]], True)
    if not full.startswith(head) or head.count(_MARKER) != 1:
        raise ValueError(
            "the chat template renders earlier turns differently once messages follow them; "
            "multi-turn prompts cannot be continued token-exactly with it"
        )
    return head[head.index(_MARKER) + len(_MARKER) :], full[len(head) :]


def continuation(
    processor: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    stop_token: int | None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> TokenPrompt:
    """The tokens (and images) to append after a sampled reply so that `messages` follow
    it as the chat template writes them, ending with the generation prompt.

    stop_token: the reply's last token when the sampler stopped on it (None when the reply
      was cut by the length limit): when it is what opens the closing text (Qwen's
      `<|im_end|>`), it is not repeated.
    """
    closing, text = continuation_text(processor, messages)
    if stop_token is not None:
        stop_text = processor.decode([stop_token], skip_special_tokens=False)
        if stop_text and closing.startswith(stop_text):
            closing = closing[len(stop_text) :]
    found: list[Any] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, Sequence) and not isinstance(content, str):
            found.extend(p["image"] for p in content if p.get("type") == "image")
    # the processor's own tokenisation of ready text (no template), images expanded
    inputs = processor._encode(
        [closing + text],
        found,
        add_special_tokens=False,
        padding_side="left",
        pad_to_multiple_of=None,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    return split_encoded(processor, inputs)[0]


def pad_prompts(prompts: Sequence[TokenPrompt], pad_token_id: int) -> dict[str, Any]:
    """A batch of prompts as processor-style inputs: ids and mask int32[B, T] left-padded,
    the images of all prompts concatenated in prompt order."""
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), T), np.int32)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = p.ids
        mask[b, T - len(p) :] = 1
    pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
    grids = [p.image_grid_thw for p in prompts if p.image_grid_thw is not None]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": np.concatenate(pixels) if pixels else None,
        "image_grid_thw": np.concatenate(grids) if grids else None,
    }
