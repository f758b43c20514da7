"""Tokenizer, chat template and image placeholders for Qwen2.5-VL, without transformers.

What is notable here:
- The tokenizer is the model's own `tokenizer.json`, run by the `tokenizers` library.
- The chat template is the model's own Jinja template, rendered as HF renders it
  (`vlmgym_model.chat_template`).
- Each `<|image_pad|>` in the prompt expands to its image's merged-token count,
  `t * h * w / merge_size**2`. The expansion is done on token ids, after tokenising the prompt
  with one placeholder per image: the placeholder is an added token, so the text around it
  tokenises the same either way, and the ids equal HF's expansion of the text.
- Outputs are numpy arrays, padded to the batch's longest prompt on the side asked for.

The output matches HF's `Qwen2_5_VLProcessor.apply_chat_template(..., tokenize=True,
return_dict=True)` (ids, mask, `mm_token_type_ids`, pixels, grids); tests/parity checks it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
import jinja2.utils
import numpy as np
from PIL import Image, ImageOps
from tokenizers import Tokenizer

from vlmgym_model.chat_template import (
    NAMED_SPECIAL_TOKENS,
    TOKENIZER_CONFIG_FILE,
    Conversation,
    compile_chat_template,
    load_chat_template,
    read_json,
    template_data,
    template_messages,
    token_content,
)
from vlmgym_model.qwen2_5_vl.image_processing import (
    ImageLike,
    ImageProcessor,
    ImageProcessorConfig,
)

TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


# ----------------------------------------------------------------------------------------------
# The processor


class Processor:
    """Qwen2.5-VL's processor: chat template, tokenizer and image preprocessing.

    Build it with `Processor.from_model_dir(model_dir)`. Calling it on messages (HF's format,
    images inside the content blocks) returns model-ready numpy arrays:

        processor([{"role": "user", "content": [
            {"type": "image", "image": pil_image},
            {"type": "text", "text": "What is shown?"},
        ]}])
        -> {"input_ids": int32[B, T], "attention_mask": int32[B, T],
            "mm_token_type_ids": int32[B, T], "pixel_values": float32[P, 1176] | None,
            "image_grid_thw": int64[n_images, 3] | None}
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        image_processor: ImageProcessor | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
        eos_token_ids: Sequence[int] | None = None,
        image_token: str = IMAGE_TOKEN,
        video_token: str = VIDEO_TOKEN,
    ) -> None:
        """Args:
        tokenizer: the model's `tokenizers.Tokenizer`.
        chat_template: Jinja source of the chat template.
        image_processor: image preprocessing; Qwen2.5-VL's defaults when None.
        special_tokens: named special tokens (`eos_token`, `pad_token`, `bos_token`...) as in
            tokenizer_config.json; they are template variables and give `pad_token_id`.
        eos_token_ids: ids that end generation; the `eos_token`'s id when None.
        image_token, video_token: the placeholder tokens; added tokens of `tokenizer` (the video
            token may be absent).

        Raises:
            ValueError: a placeholder or special token is not in the tokenizer's vocabulary.
        """
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_processor = image_processor if image_processor is not None else ImageProcessor()
        self.special_tokens: dict[str, str] = {
            k: v for k, v in (special_tokens or {}).items() if v is not None
        }
        self.image_token = image_token
        self.video_token = video_token
        self.image_token_id = self._added_token_id(image_token)
        # Optional: only models that take videos need it (no video input is supported here).
        self.video_token_id: int | None = (
            self._added_token_id(video_token)
            if self.tokenizer.token_to_id(video_token) is not None
            else None
        )
        pad = self.special_tokens.get("pad_token")
        self.pad_token_id: int | None = self._token_id(pad) if pad is not None else None
        if eos_token_ids is None:
            eos = self.special_tokens.get("eos_token")
            eos_token_ids = () if eos is None else (self._token_id(eos),)
        self.eos_token_ids: tuple[int, ...] = tuple(int(i) for i in eos_token_ids)
        self._compiled_template: jinja2.Template | None = None

    @classmethod
    def from_model_dir(
        cls, model_dir: str | os.PathLike[str], num_threads: int | None = None
    ) -> Processor:
        """Load from an HF-layout model directory.

        Reads `tokenizer.json`, `tokenizer_config.json` (special tokens), the chat template (see
        `load_chat_template`), `preprocessor_config.json` (defaults when absent) and
        `generation_config.json` (its `eos_token_id` gives `eos_token_ids`; else the tokenizer's
        `eos_token`).

        Args:
            model_dir: the directory.
            num_threads: image preprocessing threads (see `ImageProcessor`).

        Raises:
            FileNotFoundError: no tokenizer.json or no chat template.
        """
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"no {TOKENIZER_FILE} in {model_dir}: the processor needs the model's fast "
                "tokenizer file"
            )
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config_file = model_dir / TOKENIZER_CONFIG_FILE
        tokenizer_config = read_json(config_file) if config_file.is_file() else {}
        special_tokens = {
            name: token_content(tokenizer_config.get(name)) for name in NAMED_SPECIAL_TOKENS
        }
        eos_token_ids: list[int] | None = None
        generation_file = model_dir / GENERATION_CONFIG_FILE
        if generation_file.is_file():
            eos = read_json(generation_file).get("eos_token_id")
            if eos is not None:
                eos_token_ids = [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
        image_config = ImageProcessorConfig.from_model_dir(model_dir)
        return cls(
            tokenizer=tokenizer,
            chat_template=load_chat_template(model_dir),
            image_processor=ImageProcessor(image_config, num_threads=num_threads),
            special_tokens=special_tokens,
            eos_token_ids=eos_token_ids,
        )

    # -- tokens ---------------------------------------------------------------------------------

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return int(token_id)

    def _added_token_id(self, token: str) -> int:
        token_id = self._token_id(token)
        added = self.tokenizer.get_added_tokens_decoder()
        if token_id not in added or added[token_id].content != token:
            raise ValueError(
                f"{token!r} must be an added token of the tokenizer (so that text never merges "
                "into it), but it is a regular vocabulary entry"
            )
        return token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (no placeholder expansion)."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of one sequence of token ids."""
        return self.tokenizer.decode(
            np.asarray(ids, dtype=np.int64).reshape(-1).tolist(),
            skip_special_tokens=skip_special_tokens,
        )

    def batch_decode(
        self, ids: Sequence[Sequence[int]] | np.ndarray, skip_special_tokens: bool = False
    ) -> list[str]:
        """Text of each row of token ids."""
        rows = [np.asarray(row, dtype=np.int64).reshape(-1).tolist() for row in ids]
        return self.tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def num_image_tokens(self, image_grid_thw: np.ndarray) -> np.ndarray:
        """`int64[n]`: placeholder tokens per image, `t * h * w / merge_size**2`."""
        grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
        return grid.prod(axis=1) // self.image_processor.merge_size**2

    # -- chat template --------------------------------------------------------------------------

    def _template(self) -> jinja2.Template:
        if self._compiled_template is None:
            self._compiled_template = compile_chat_template(self.chat_template)
        return self._compiled_template

    def apply_chat_template(
        self,
        messages: Conversation | Sequence[Conversation],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str | list[str]:
        """Render the chat template.

        Args:
            messages: one conversation (a list of messages) or a batch of them.
            add_generation_prompt: end with the assistant header, ready for generation.
            tools, documents: JSON-schema tools and documents for templates that use them.
            **template_kwargs: extra template variables (e.g. `add_vision_id=True`).

        Returns:
            The prompt text (one `<|image_pad|>` per image), or a list for a batch.
        """
        conversations, batched = _as_batch(messages)
        template = self._template()
        variables = template_data({**self.special_tokens, **template_kwargs})
        rendered = [
            template.render(
                messages=template_messages(conversation),
                tools=template_data(list(tools)) if tools is not None else None,
                documents=template_data(list(documents)) if documents is not None else None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
            for conversation in conversations
        ]
        return rendered if batched else rendered[0]

    # -- processing -----------------------------------------------------------------------------

    def __call__(
        self,
        inputs: str | Sequence[str] | Conversation | Sequence[Conversation],
        images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | ImageLike | None = None,
        add_generation_prompt: bool = True,
        padding_side: Literal["left", "right"] = "left",
        pad_to_multiple_of: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **template_kwargs: Any,
    ) -> dict[str, np.ndarray | None]:
        """Tokenise conversations (or prompt strings) and preprocess their images.

        Args:
            inputs: one conversation or a batch of conversations in HF's message format, with
                images in `{"type": "image", "image": PIL.Image | uint8 array | path}` blocks
                (taken in order); or an already-templated prompt string, or a list of them,
                with `images` given separately (one `<|image_pad|>` per image).
            images: images for prompt strings (flat, or one list per prompt), or for
                conversations whose image blocks carry no image.
            add_generation_prompt: for conversations: end with the assistant header.
            padding_side: where pad tokens go when prompts differ in length.
            pad_to_multiple_of: round the padded length up to a multiple of this.
            min_pixels, max_pixels: override the image pixel bounds for this call.
            **template_kwargs: extra chat-template variables.

        Returns:
            input_ids: int32[B, T], padded with `pad_token_id`.
            attention_mask: int32[B, T], 1 on real tokens.
            mm_token_type_ids: int32[B, T], 1 on image placeholder tokens, 2 on video ones.
            pixel_values: float32[P, 1176], or None without images.
            image_grid_thw: int64[n_images, 3], or None without images.

        Raises:
            ValueError: placeholder and image counts differ, an image block has no image, or
                padding is needed and the tokenizer has no pad token.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if isinstance(inputs, str) or (
            isinstance(inputs, Sequence)
            and len(inputs) > 0
            and all(isinstance(x, str) for x in inputs)
        ):
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            flat_images = _flatten_images(images)
            add_special_tokens = True
        else:
            conversations, _ = _as_batch(inputs)  # type: ignore[arg-type]
            found, missing = _images_from_conversations(conversations)
            if images is not None:
                if found:
                    raise ValueError(
                        "images were given both inside the messages and as `images=`; give them "
                        "one way"
                    )
                flat_images = _flatten_images(images)
            else:
                if missing:
                    raise ValueError(
                        f"{missing} image block(s) in the messages carry no image (no 'image', "
                        "'path' or 'url' key) and no `images=` were given"
                    )
                flat_images = found
            rendered = self.apply_chat_template(
                conversations, add_generation_prompt=add_generation_prompt, **template_kwargs
            )
            texts = list(rendered)
            bos = self.special_tokens.get("bos_token")
            # HF: a template that writes the BOS itself is tokenised without adding special tokens.
            add_special_tokens = not (bos is not None and texts[0].startswith(bos))
        return self._encode(
            texts,
            flat_images,
            add_special_tokens=add_special_tokens,
            padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )

    def _encode(
        self,
        texts: list[str],
        images: list[ImageLike],
        add_special_tokens: bool,
        padding_side: str,
        pad_to_multiple_of: int | None,
        min_pixels: int | None,
        max_pixels: int | None,
    ) -> dict[str, np.ndarray | None]:
        if any(self.video_token in text for text in texts):
            raise ValueError(f"{self.video_token} found: video inputs are not supported")
        placeholders = sum(text.count(self.image_token) for text in texts)
        if placeholders != len(images):
            raise ValueError(
                f"the prompt(s) hold {placeholders} {self.image_token} placeholder(s) but "
                f"{len(images)} image(s) were given; each image needs exactly one placeholder "
                "(an image block in the messages, or the token in a prompt string)"
            )
        pixel_values: np.ndarray | None = None
        image_grid_thw: np.ndarray | None = None
        if images:
            pixel_values, image_grid_thw = self.image_processor(
                images, min_pixels=min_pixels, max_pixels=max_pixels
            )
            per_image = self.num_image_tokens(image_grid_thw)  # [n]
        else:
            per_image = np.zeros((0,), np.int64)

        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        rows: list[np.ndarray] = []
        next_image = 0
        for text, encoding in zip(texts, encodings, strict=True):
            ids = np.asarray(encoding.ids, dtype=np.int32)  # [T0]
            is_image = ids == self.image_token_id
            count = int(is_image.sum())
            if count != text.count(self.image_token):
                raise ValueError(
                    f"{text.count(self.image_token)} {self.image_token} in the text became "
                    f"{count} image tokens after tokenisation"
                )
            if count:
                repeats = np.ones(ids.shape, np.int64)
                repeats[is_image] = per_image[next_image : next_image + count]
                ids = np.repeat(ids, repeats)  # [T]
                next_image += count
            rows.append(ids)

        lengths = [len(r) for r in rows]
        T = max(lengths)
        if pad_to_multiple_of:
            T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
        B = len(rows)
        if self.pad_token_id is None and any(n != T for n in lengths):
            raise ValueError("padding is needed but the tokenizer config names no pad_token")
        pad_id = self.pad_token_id if self.pad_token_id is not None else 0
        input_ids = np.full((B, T), pad_id, dtype=np.int32)  # [B, T]
        attention_mask = np.zeros((B, T), dtype=np.int32)  # [B, T]
        for b, row in enumerate(rows):
            start = T - len(row) if padding_side == "left" else 0
            input_ids[b, start : start + len(row)] = row
            attention_mask[b, start : start + len(row)] = 1
        mm_token_type_ids = np.zeros((B, T), dtype=np.int32)  # [B, T]
        mm_token_type_ids[input_ids == self.image_token_id] = 1
        if self.video_token_id is not None:
            mm_token_type_ids[input_ids == self.video_token_id] = 2
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
        }


def _as_batch(
    messages: Conversation | Sequence[Conversation],
) -> tuple[list[Conversation], bool]:
    """(conversations, whether the input was a batch)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages must be a list of message dicts or a list of such lists, got "
            f"{type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ValueError("no messages given")
    first = messages[0]
    if isinstance(first, Sequence) and not isinstance(first, (str, bytes)):
        return [list(c) for c in messages], True  # type: ignore[arg-type]
    return [list(messages)], False  # type: ignore[arg-type]


def _images_from_conversations(
    conversations: Sequence[Conversation],
) -> tuple[list[ImageLike], int]:
    """The images of `{"type": "image"}` blocks in order, and how many such blocks had none."""
    found: list[ImageLike] = []
    missing = 0
    for conversation in conversations:
        for message in conversation:
            content = message.get("content")
            if not isinstance(content, Sequence) or isinstance(content, str):
                continue
            for block in content:
                if not isinstance(block, Mapping):
                    continue
                if block.get("type") == "video":
                    raise ValueError("video blocks are not supported: pass frames as images")
                if block.get("type") != "image":
                    continue
                if block.get("image") is not None:
                    found.append(_load_image(block["image"]))
                elif block.get("path") is not None:
                    found.append(_load_image(block["path"]))
                elif block.get("url") is not None:
                    found.append(_load_image(block["url"]))
                else:
                    missing += 1
    if found and missing:
        raise ValueError(
            f"{missing} image block(s) carry no image while {len(found)} do; every image block "
            "needs its image"
        )
    return found, missing


def _load_image(value: Any) -> ImageLike:
    if isinstance(value, (Image.Image, np.ndarray)):
        return value
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if text.startswith(("http://", "https://", "data:")):
            raise ValueError(
                f"image URLs are not fetched: load the image first and pass it as "
                f"{{'type': 'image', 'image': PIL.Image}} (got {text[:80]!r})"
            )
        # As HF loads image files: EXIF orientation applied, then a plain RGB conversion
        # (an alpha band is dropped, not composited: unlike in-memory images).
        with Image.open(text) as opened:
            return ImageOps.exif_transpose(opened).convert("RGB")
    raise TypeError(
        f"an image block's image must be a PIL image, a uint8 array or a file path, got "
        f"{type(value).__name__}"
    )


def _flatten_images(
    images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | ImageLike | None,
) -> list[ImageLike]:
    if images is None:
        return []
    if isinstance(images, (Image.Image, np.ndarray)):
        return [images]
    flat: list[ImageLike] = []
    for item in images:
        if isinstance(item, (Image.Image, np.ndarray)):
            flat.append(item)
        elif isinstance(item, Sequence) and not isinstance(item, str):
            flat.extend(_load_image(i) for i in item)
        else:
            flat.append(_load_image(item))
    return flat
