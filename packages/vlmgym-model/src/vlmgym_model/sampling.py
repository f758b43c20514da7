"""The sampling engine: batched multimodal generation with a KV cache and group sampling.

This engine produces every rollout the trainer learns from. What it does:

1. Prompts (token ids from the `Processor`, images as `pixel_values`) are LEFT-padded to a
   length bucket and the batch is padded to a batch bucket, so calls whose shapes fall in
   the same buckets reuse one compiled program (`Sampler.compilations` counts them).
2. The vision tower encodes the images; one prefill per prompt fills the KV cache, which
   its `num_samples` samples then share (group sampling: the prompt's cache is stored and
   read once per prompt, not copied to each sample).
3. One jitted `lax.while_loop` decodes until every row has produced a stop token or
   `max_new_tokens`; the cache buffer is donated and updated in place.

Each `Sample` carries two log-probs per token (both float32):

* `logprobs`: under the UNTEMPERED policy, log softmax(logits)[token]. This is what the
  trainer's importance ratios need (the behaviour policy's log-prob of the action).
* `sampling_logprobs`: under the distribution the token was actually drawn from, after
  temperature, top-k, top-p and min-p (0 for greedy decoding).

Tokens after a row's first stop token are neither returned nor counted; the stop token
itself is the last returned token (finish reason "stop"). A row that reaches
`max_new_tokens` first finishes with "length".
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig
from vlmgym_model.qwen2_5_vl.decoding import (
    KVCache,
    decode_step,
    layers_for_decoding,
    prefill,
)
from vlmgym_model.qwen2_5_vl.model import ModelInputs, Qwen2_5_VLWeights, embed, model_inputs
from vlmgym_model.sampling_math import SamplingParams, sample_tokens

FinishReason = Literal["stop", "length"]


@dataclasses.dataclass
class Sample:
    """One completion. Arrays cover the generated tokens only, up to and including stop."""

    prompt_index: int
    tokens: np.ndarray  # int32[n]
    logprobs: np.ndarray  # float32[n], untempered policy
    sampling_logprobs: np.ndarray  # float32[n], the distribution actually sampled from
    finish_reason: FinishReason
    text: str = ""

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass
class Generation:
    """The result of one `Sampler.generate` call.

    `samples[i]` holds the `num_samples` samples of prompt i. The prompt side (ids, mask,
    mRoPE positions and the rope deltas of each prompt, unpadded by the batch bucket but
    left-padded to the length bucket) is kept so a trainer can rebuild the full sequences.
    """

    samples: list[list[Sample]]
    prompt_ids: np.ndarray  # int32[B, T], left-padded
    prompt_mask: np.ndarray  # int32[B, T]
    prompt_positions: np.ndarray  # int32[3, B, T]
    rope_deltas: np.ndarray  # int32[B]
    timings: dict[str, float]
    pixel_values: np.ndarray | None = None  # float32[P, 1176], the prompts' images
    image_grid_thw: np.ndarray | None = None  # int[n_images, 3]

    @property
    def num_generated_tokens(self) -> int:
        return sum(s.length for group in self.samples for s in group)


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(
        f"{what} {n} exceeds the largest bucket {buckets[-1]} (the sampler's length_buckets; "
        "vlmgym-train: --max_prompt_tokens)"
    )


def default_length_buckets(max_len: int = 32_768) -> tuple[int, ...]:
    """16, 32, 64, ... up to max_len."""
    out, b = [], 16
    while b < max_len:
        out.append(b)
        b *= 2
    return (*out, max_len)


# --------------------------------------------------------------------------- the engine


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _DecodeState:
    step: jax.Array  # int32[]
    logits: jax.Array  # float32[R, V]
    cache: KVCache
    tokens: jax.Array  # int32[R, N]
    policy_lp: jax.Array  # float32[R, N]
    sampled_lp: jax.Array  # float32[R, N]
    done: jax.Array  # bool[R]
    lengths: jax.Array  # int32[R]
    stopped: jax.Array  # bool[R]


def _row_keys(prompt_keys: jax.Array, R: int) -> jax.Array:
    """Sample j of prompt b draws from fold_in(fold_in(key_b, j), step): independent of the
    rest of the batch, so batching and bucket padding never change a sample."""
    n = R // prompt_keys.shape[0]
    per_prompt = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n)))
    return per_prompt(prompt_keys).reshape(R)


def _unpack_samples(state: _DecodeState, B: int, n: int) -> list[list[Sample]]:
    """The decoded rows of the B real prompts, n samples each, cut at their lengths."""
    tokens, plp, slp, out_len, stopped = jax.device_get(
        (state.tokens, state.policy_lp, state.sampled_lp, state.lengths, state.stopped)
    )
    samples: list[list[Sample]] = []
    for b in range(B):
        group = []
        for r in range(b * n, (b + 1) * n):
            k = int(out_len[r])
            group.append(
                Sample(
                    prompt_index=b,
                    tokens=tokens[r, :k].copy(),
                    logprobs=plp[r, :k].copy(),
                    sampling_logprobs=slp[r, :k].copy(),
                    finish_reason="stop" if stopped[r] else "length",
                )
            )
        samples.append(group)
    return samples


class Sampler:
    """Generates completions for batches of multimodal prompts.

    Example:
        processor = Processor.from_model_dir(model_dir)
        config, params = load_model(model_dir)
        sampler = Sampler(config, processor)
        gen = sampler.generate(params, [messages], SamplingParams(temperature=0.7,
                               num_samples=8), key=jax.random.key(0))
        gen.samples[0][3].text

    Args:
      config: the model's config.
      processor: a `vlmgym_model.Processor` (tokenizer, chat template, images); optional
        when calling `generate_ids` with pre-processed inputs and no text is wanted.
      stop_token_ids: token ids that end a completion; default: the processor's
        (generation_config.json's eos ids), else config.eos_token_id.
      length_buckets, batch_buckets: static shapes prompts and batches are padded to.
      impl: attention implementation for `vlmgym_kernels`.
      cache_dtype: KV cache dtype (default: the params' dtype).
      min_pixels, max_pixels: image pixel bounds passed to the processor (default: the
        model's preprocessor_config.json); a smaller budget means fewer image tokens.
      decode_layout: "copies" (decoder matrices copied [out, in] per generation, LoRA
        merged: the CPU's fast matmul path), "stacked" (the weights as they lie, LoRA
        unmerged), "auto" (copies on the CPU backend only). Both sample the same tokens.
    """

    def __init__(
        self,
        config: Qwen2_5_VLConfig,
        processor: Any = None,
        *,
        stop_token_ids: Sequence[int] | None = None,
        length_buckets: Sequence[int] | None = None,
        batch_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        impl: str = "xla",
        cache_dtype: Any = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        decode_layout: str = "auto",
    ) -> None:
        if decode_layout not in ("auto", "copies", "stacked"):
            raise ValueError(f"decode_layout must be auto, copies or stacked: {decode_layout!r}")
        self.decode_layout = decode_layout
        self.config = config
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.processor = processor
        if stop_token_ids is None:
            if processor is not None and getattr(processor, "eos_token_ids", None):
                stop_token_ids = list(processor.eos_token_ids)
            else:
                eos = config.eos_token_id
                stop_token_ids = [] if eos is None else list(np.atleast_1d(eos))
        if not stop_token_ids:
            raise ValueError("no stop token ids: pass stop_token_ids or a processor with eos")
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.length_buckets = tuple(length_buckets or default_length_buckets())
        self.batch_buckets = tuple(batch_buckets)
        self.impl = impl
        self.cache_dtype = cache_dtype
        self.pad_token_id = int(getattr(processor, "pad_token_id", None) or 0)
        self.compilations: dict[str, int] = {"prefill": 0, "decode": 0}
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("new_tokens", "num_samples"))
        self._decode = jax.jit(
            self._decode_impl,
            static_argnames=("max_new_tokens", "greedy", "top_k", "use_top_p", "use_min_p"),
            donate_argnames=("cache",),
        )

    # ------------------------------------------------------------------ jitted pieces

    def _prefill_impl(
        self,
        params: Qwen2_5_VLWeights,
        inputs: ModelInputs,
        *,
        new_tokens: int,
        num_samples: int,
    ) -> tuple[jax.Array, KVCache]:
        self.compilations["prefill"] += 1  # runs once per trace, i.e. per compilation
        x, deepstack = embed(params, self.config, inputs, impl=self.impl)  # vision included
        logits, cache = prefill(
            params.text,
            self.config,
            x,
            inputs.segment_ids,
            inputs.positions,
            new_tokens,
            num_samples=num_samples,
            impl=self.impl,
            cache_dtype=self.cache_dtype,
            deepstack=deepstack,
        )
        if num_samples > 1:
            logits = jnp.repeat(logits, num_samples, axis=0)
        return logits, cache

    def _initial_state(
        self, logits: jax.Array, cache: KVCache, active: jax.Array, N: int
    ) -> _DecodeState:
        """Nothing sampled yet; padding rows of the batch bucket start done."""
        R = logits.shape[0]
        return _DecodeState(
            step=jnp.zeros((), jnp.int32),
            logits=logits,
            cache=cache,
            tokens=jnp.full((R, N), self.pad_token_id, jnp.int32),
            policy_lp=jnp.zeros((R, N), jnp.float32),
            sampled_lp=jnp.zeros((R, N), jnp.float32),
            done=~active,  # padding rows of the batch bucket start done
            lengths=jnp.zeros((R,), jnp.int32),
            stopped=jnp.zeros((R,), bool),
        )

    def _decode_impl(
        self,
        params: Qwen2_5_VLWeights,
        logits: jax.Array,
        cache: KVCache,
        next_positions: jax.Array,
        prompt_starts: jax.Array,
        active: jax.Array,
        prompt_keys: jax.Array,
        temperature: jax.Array,
        top_p: jax.Array,
        min_p: jax.Array,
        stop_ids: jax.Array,
        *,
        max_new_tokens: int,
        greedy: bool,
        top_k: int,
        use_top_p: bool,
        use_min_p: bool,
    ) -> _DecodeState:
        self.compilations["decode"] += 1
        N = max_new_tokens
        state = self._initial_state(logits, cache, active, N)
        row_keys = _row_keys(prompt_keys, logits.shape[0])
        stacked = self.decode_layout == "stacked" or (
            self.decode_layout == "auto" and jax.default_backend() != "cpu"
        )  # else the [out, in] copies, made once outside the loop:
        layers = None if stacked else layers_for_decoding(params.text.layers)

        def sample(s: _DecodeState) -> tuple[_DecodeState, jax.Array]:
            """Draw token `s.step` of every row from `s.logits`; record it."""
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, s.step)
            tok, plp, slp = sample_tokens(
                step_keys, s.logits, temperature, top_p, min_p,
                greedy=greedy, top_k=top_k, use_top_p=use_top_p, use_min_p=use_min_p,
            )  # fmt: skip
            live = ~s.done
            tok = jnp.where(live, tok, self.pad_token_id)
            is_stop = live & jnp.isin(tok, stop_ids)
            return dataclasses.replace(
                s,
                step=s.step + 1,
                tokens=s.tokens.at[:, s.step].set(tok),
                policy_lp=s.policy_lp.at[:, s.step].set(jnp.where(live, plp, 0.0)),
                sampled_lp=s.sampled_lp.at[:, s.step].set(jnp.where(live, slp, 0.0)),
                lengths=s.lengths + live.astype(jnp.int32),
                done=s.done | is_stop,
                stopped=s.stopped | is_stop,
            ), tok

        def cond(s: _DecodeState) -> jax.Array:
            return (s.step < N - 1) & ~jnp.all(s.done)

        def body(s: _DecodeState) -> _DecodeState:
            s, tok = sample(s)
            logits, cache = decode_step(
                params.text,
                self.config,
                tok,
                next_positions + s.step - 1,
                s.cache,
                s.step - 1,
                prompt_starts,
                layers=layers,
                impl=self.impl,
                stacked=stacked,
            )
            return dataclasses.replace(s, logits=logits, cache=cache)

        # Tokens 0 .. N-2 each need a decode step for the next logits; the last does not.
        state = jax.lax.while_loop(cond, body, state)
        # When the loop ended early with every row done, this records nothing: done rows
        # take no token (the step index stays within [0, N)).
        final, _ = sample(state)
        return final

    # ------------------------------------------------------------------ host side

    def generate(
        self,
        params: Qwen2_5_VLWeights,
        prompts: Sequence[Any],
        sampling: SamplingParams,
        key: jax.Array,
        *,
        decode_text: bool = True,
    ) -> Generation:
        """Generate for a batch of chat prompts (each a list of HF-style messages).

        Images inside the messages are preprocessed by the processor; the chat template is
        applied with the generation prompt.
        """
        if self.processor is None:
            raise ValueError("generate() needs a processor; use generate_ids() for token ids")
        inputs = self.processor(
            list(prompts),
            add_generation_prompt=True,
            padding_side="left",
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )
        return self.generate_ids(
            params,
            inputs["input_ids"],
            inputs["attention_mask"],
            sampling,
            key,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            decode_text=decode_text,
        )

    @staticmethod
    def _prompt_keys(key: jax.Array, B: int, Bb: int) -> jax.Array:
        """One key per prompt of the batch bucket, from one key or from B keys."""
        if key.ndim == 0:
            return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(Bb))
        if key.shape != (B,):
            raise ValueError(f"got {key.shape[0]} keys for {B} prompts; give one or one each")
        pad = jax.vmap(lambda i: jax.random.fold_in(key[0], i))(jnp.arange(Bb - B) + B)
        return jnp.concatenate([key, pad]) if Bb > B else key

    def _pad_prompts(
        self, input_ids: Any, attention_mask: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Every prompt left-padded to the length bucket, the batch padded to the batch
        bucket: (ids int32[Bb, T], mask int32[Bb, T], prompt lengths int[B], B)."""
        ids = np.asarray(input_ids)
        mask = np.asarray(attention_mask).astype(bool)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(
                f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [B, T]"
            )
        B = ids.shape[0]
        lengths = mask.sum(axis=1)
        if (lengths == 0).any():
            raise ValueError(f"prompts {np.flatnonzero(lengths == 0).tolist()} are empty")
        T = _bucket(int(lengths.max()), self.length_buckets, "prompt length")
        Bb = _bucket(B, self.batch_buckets, "batch size")
        padded = np.full((Bb, T), self.pad_token_id, np.int32)
        pmask = np.zeros((Bb, T), np.int32)
        for b in range(B):
            row = ids[b][mask[b]]
            padded[b, T - len(row) :] = row
            pmask[b, T - len(row) :] = 1
        pmask[B:, -1] = 1  # batch padding rows: one dummy token, never sampled from
        return padded, pmask, lengths, B

    def generate_ids(
        self,
        params: Qwen2_5_VLWeights,
        input_ids: Any,
        attention_mask: Any,
        sampling: SamplingParams,
        key: jax.Array,
        *,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
        decode_text: bool = True,
    ) -> Generation:
        """Generate from processed inputs (int[B, T] ids and mask, either padding side).

        `key`: one PRNG key (prompt b then uses fold_in(key, b)), or a [B] array of keys, one
        per prompt. Either way a prompt's samples depend only on its own key, never on the
        other prompts in the batch or on the bucket sizes.
        """
        t0 = time.perf_counter()
        padded, pmask, lengths, B = self._pad_prompts(input_ids, attention_mask)
        Bb, T = padded.shape
        inputs, deltas = model_inputs(self.config, padded, pmask, pixel_values, image_grid_thw)
        t_inputs = time.perf_counter()

        n = sampling.num_samples
        N = sampling.max_new_tokens
        logits, cache = self._prefill(params, inputs, new_tokens=N, num_samples=n)
        logits.block_until_ready()
        t_prefill = time.perf_counter()

        prompt_len = np.concatenate([lengths, np.ones(Bb - B, lengths.dtype)])
        next_pos = (prompt_len + deltas).astype(np.int32)
        starts = (T - prompt_len).astype(np.int32)
        active = np.arange(Bb) < B
        state = self._decode(
            params,
            logits,
            cache,
            jnp.asarray(np.repeat(next_pos, n)),
            jnp.asarray(starts),
            jnp.asarray(np.repeat(active, n)),
            self._prompt_keys(key, B, Bb),
            jnp.asarray(sampling.temperature, jnp.float32),
            jnp.asarray(sampling.top_p, jnp.float32),
            jnp.asarray(sampling.min_p, jnp.float32),
            jnp.asarray(self.stop_token_ids, jnp.int32),
            max_new_tokens=N,
            greedy=sampling.greedy,
            top_k=sampling.top_k,
            use_top_p=sampling.top_p < 1.0,
            use_min_p=sampling.min_p > 0.0,
        )
        samples = _unpack_samples(state, B, n)
        t_decode = time.perf_counter()
        if decode_text and self.processor is not None:
            for group in samples:
                for s in group:
                    s.text = self.processor.decode(s.tokens, skip_special_tokens=True)
        t_end = time.perf_counter()
        return Generation(
            samples=samples,
            prompt_ids=padded[:B],
            prompt_mask=pmask[:B],
            prompt_positions=np.asarray(inputs.positions)[:, :B],
            rope_deltas=deltas[:B],
            pixel_values=None if image_grid_thw is None else np.asarray(pixel_values),
            image_grid_thw=None if image_grid_thw is None else np.asarray(image_grid_thw),
            timings={
                "inputs_s": t_inputs - t0,  # padding, mRoPE positions, image layout
                "prefill_s": t_prefill - t_inputs,  # the vision tower and the prefill
                "decode_s": t_decode - t_prefill,
                "detokenize_s": t_end - t_decode,
                "total_s": t_end - t0,
            },
        )
