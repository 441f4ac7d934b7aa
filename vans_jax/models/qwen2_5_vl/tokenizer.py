"""Prompt building, tokenisation helpers and response parsing for the VANS VLM.

Chat format (Qwen2-VL / Qwen2.5-VL chat template, system message given)::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|video_pad|>*N<|vision_end|>{question}<|im_end|>\\n
    <|im_start|>assistant\\n

where ``N = grid_t*grid_h*grid_w // merge_size**2`` (the expansion done by
``Qwen2_5_VLProcessor``).  The SFT target appended after the generation
prompt is ``[Think]{think}[/Think][Ans]{caption}[/Ans]<|im_end|>``; the loss
mask covers exactly those tokens.

The real Qwen tokenizer is loaded with :func:`load_tokenizer` from a local
directory; tests use :func:`build_tiny_tokenizer`, a small byte-level BPE
tokenizer with the same pre-tokenisation pipeline and special tokens.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "VANS_SYSTEM_PROMPT",
    "QWEN2_VL_CHAT_TEMPLATE",
    "IM_START",
    "IM_END",
    "ENDOFTEXT",
    "VISION_START",
    "VISION_END",
    "IMAGE_PAD",
    "VIDEO_PAD",
    "QWEN_SPECIAL_TOKENS",
    "QWEN_TOKEN_IDS",
    "build_prompt_text",
    "load_tokenizer",
    "special_token_ids",
    "encode_prompts",
    "sft_example",
    "build_tiny_tokenizer",
]

VANS_SYSTEM_PROMPT = (
    "You will be given a video. Your task is to predict the next event based on the input video and the "
    "user's instructions. Please begin by providing your detailed reasoning between the [Think][/Think] tags, "
    "followed by your description of the next event within the [Ans][/Ans] tags."
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
QWEN_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# ids in the real Qwen2.5-VL vocabulary (for reference / config defaults)
QWEN_TOKEN_IDS = {
    "endoftext": 151643,
    "im_start": 151644,
    "im_end": 151645,
    "vision_start": 151652,
    "vision_end": 151653,
    "image_pad": 151655,
    "video_pad": 151656,
}

# The chat template shipped with Qwen2-VL / Qwen2.5-VL Instruct checkpoints.
# Written into the tiny tokenizer so tests can render it with
# ``apply_chat_template`` and compare with :func:`build_prompt_text`.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --------------------------------------------------------------------------- #
# text construction
# --------------------------------------------------------------------------- #
def build_prompt_text(
    question: str,
    num_video_tokens: int | None = None,
    *,
    with_video: bool = True,
    system_prompt: str = VANS_SYSTEM_PROMPT,
) -> str:
    """Chat-template text up to and including ``<|im_start|>assistant\\n``.

    ``num_video_tokens=None`` leaves a single ``<|video_pad|>`` placeholder (the
    un-expanded text that ``apply_chat_template`` produces); an int expands it
    to that many copies (what ``Qwen2_5_VLProcessor`` feeds the tokenizer).
    ``with_video=False`` drops the vision block entirely.
    """
    if with_video:
        n = 1 if num_video_tokens is None else int(num_video_tokens)
        if n < 1:
            raise ValueError(f"num_video_tokens must be >= 1, got {num_video_tokens}")
        vision = VISION_START + VIDEO_PAD * n + VISION_END
    else:
        if num_video_tokens is not None:
            raise ValueError("num_video_tokens given but with_video=False")
        vision = ""
    return (
        f"{IM_START}system\n{system_prompt}{IM_END}\n"
        f"{IM_START}user\n{vision}{question}{IM_END}\n"
        f"{IM_START}assistant\n"
    )


def _video_token_counts(video_grid_thw, n: int, merge_size: int) -> list[int | None]:
    if video_grid_thw is None:
        return [None] * n
    g = np.asarray(video_grid_thw, dtype=np.int64)
    if g.ndim == 1:
        g = g[None]
    if g.ndim != 2 or g.shape[1] != 3:
        raise ValueError(f"video_grid_thw must have shape (n, 3), got {g.shape}")
    if g.shape[0] != n:
        raise ValueError(f"got {g.shape[0]} video grids for {n} prompts (one video per prompt expected)")
    prod = g.prod(axis=1)
    if np.any(prod % (merge_size**2)):
        raise ValueError(f"video grid {g.tolist()} not divisible by merge_size**2={merge_size**2}")
    return [int(p) // merge_size**2 for p in prod]


# --------------------------------------------------------------------------- #
# tokenizer loading
# --------------------------------------------------------------------------- #
def load_tokenizer(path: str | os.PathLike):
    """``transformers.AutoTokenizer`` from a local directory (never downloads)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"no tokenizer files (tokenizer.json / vocab.json / tokenizer_config.json) in {path!r}"
        )
    import logging

    from transformers import AutoTokenizer

    # AutoTokenizer reads the model's config.json only to pick a tokenizer class; transformers then
    # warns about special-token ids its defaults put outside a small vocabulary (the tiny models'
    # bos_token_id), which concerns the model config, not the tokenizer: not shown here
    config_log = logging.getLogger("transformers.configuration_utils")
    drop = _DropConfigTokenIdWarning()
    config_log.addFilter(drop)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # pragma: no cover - message wrapping only
        raise OSError(f"could not load tokenizer from local directory {path!r}: {e}") from e
    finally:
        config_log.removeFilter(drop)


class _DropConfigTokenIdWarning:
    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Model config: ") and "_token_id must be `None` or an integer" in msg)


def _token_id(tokenizer, tok: str) -> int:
    ids = tokenizer.encode(tok, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"token {tok!r} is not a single token in this tokenizer (encodes to {ids})")
    return int(ids[0])


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the chat / vision tokens in ``tokenizer`` (keys as in QWEN_TOKEN_IDS)."""
    names = dict(zip(("endoftext", "im_start", "im_end", "vision_start", "vision_end", "image_pad", "video_pad"),
                     QWEN_SPECIAL_TOKENS))
    return {k: _token_id(tokenizer, t) for k, t in names.items()}


# --------------------------------------------------------------------------- #
# encoding
# --------------------------------------------------------------------------- #
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = _token_id(tokenizer, ENDOFTEXT)
    return int(pid)


def encode_prompts(
    tokenizer,
    questions: Sequence[str] | str,
    video_grid_thw=None,
    merge_size: int = 2,
    padding_side: str = "left",
    *,
    with_video: bool = True,
    system_prompt: str = VANS_SYSTEM_PROMPT,
    pad_to: int | None = None,
) -> dict[str, np.ndarray]:
    """Batch of generation prompts -> ``dict(input_ids, attention_mask)``
    (int32 arrays ``(B, L)``), padded with the tokenizer's pad id on
    ``padding_side`` ("left" for generation).  ``video_grid_thw`` has one row
    per question; each prompt gets ``t*h*w // merge_size**2`` video tokens.
    ``pad_to`` pads to at least that length."""
    if isinstance(questions, str):
        questions = [questions]
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if with_video and video_grid_thw is None:
        raise ValueError("encode_prompts: video_grid_thw is required when with_video=True")
    counts = _video_token_counts(video_grid_thw if with_video else None, len(questions), merge_size)
    seqs = [
        _encode(tokenizer, build_prompt_text(q, c, with_video=with_video, system_prompt=system_prompt))
        for q, c in zip(questions, counts)
    ]
    return _pad_batch(seqs, _pad_id(tokenizer), padding_side, pad_to)


def _pad_batch(seqs, pad_id, padding_side, pad_to=None, extra=None):
    length = max(len(s) for s in seqs)
    if pad_to is not None:
        length = max(length, int(pad_to))
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), length), dtype=np.int32)
    for i, s in enumerate(seqs):
        sl = slice(length - len(s), length) if padding_side == "left" else slice(0, len(s))
        ids[i, sl] = s
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def sft_example(
    tokenizer,
    question: str,
    response: str,
    grid=None,
    merge_size: int = 2,
    *,
    with_video: bool = True,
    system_prompt: str = VANS_SYSTEM_PROMPT,
) -> dict[str, np.ndarray]:
    """One SFT sequence: prompt + ``response`` + ``<|im_end|>`` (VANS: ``response`` is
    ``vans_jax.rl.format.format_response(think, caption)``).

    Returns ``input_ids`` (int32, (L,)), ``loss_mask`` (int32, 1 exactly on the
    assistant target tokens, which are the last ``num_target_tokens``),
    ``attention_mask`` (all ones) and ``prompt_len``.  Prompt and target are
    tokenised separately and concatenated (the prompt ends with the special
    ``assistant\\n`` boundary, so this equals tokenising the whole text whenever
    BPE does not merge across "\\n" and "[", which Qwen's pre-tokeniser guarantees)."""
    n = None
    if with_video:
        if grid is None:
            raise ValueError("sft_example: grid (t, h, w) is required when with_video=True")
        n = _video_token_counts(grid, 1, merge_size)[0]
    prompt = _encode(tokenizer, build_prompt_text(question, n, with_video=with_video, system_prompt=system_prompt))
    target = _encode(tokenizer, response + IM_END)
    ids = np.asarray(prompt + target, dtype=np.int32)
    loss_mask = np.zeros(len(ids), dtype=np.int32)
    loss_mask[len(prompt):] = 1
    return {
        "input_ids": ids,
        "loss_mask": loss_mask,
        "attention_mask": np.ones(len(ids), dtype=np.int32),
        "prompt_len": np.int32(len(prompt)),
    }


# --------------------------------------------------------------------------- #
# tiny tokenizer for tests
# --------------------------------------------------------------------------- #
_DEFAULT_CORPUS = (
    "A person opens the fridge and takes out a bottle of milk.",
    "The chef slices the onion, then puts it into the hot pan.",
    "What will happen next in this video? Describe the next event.",
    "The man ties the tie, pulls the knot up and adjusts the collar.",
    "She pours water into the glass and drinks it slowly.",
    "The dog runs across the park, catches the ball and brings it back.",
    "First the woman picks up the brush, then she paints the wall blue.",
    "Reasoning: the video shows cooking steps, so the next step is to stir.",
    "You will be given a video. Your task is to predict the next event.",
    "system user assistant 0123456789 , . ? ! ' \" : ; ( ) - \n",
)
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_tiny_tokenizer(
    out_dir: str | os.PathLike,
    vocab_texts: Iterable[str] | None = None,
    vocab_size: int = 384,
    added_tokens: Iterable[str] = (),
) -> dict[str, int]:
    """Write a small Qwen2-compatible byte-level BPE tokenizer to ``out_dir``.

    Same normaliser (NFC), pre-tokeniser (Qwen regex split + byte-level) and
    decoder as Qwen2, BPE merges trained on ``vocab_texts`` (a built-in
    handful of sentences by default) up to ``vocab_size`` entries, then the
    Qwen special tokens (special) and ``added_tokens`` (ordinary added tokens,
    kept by ``skip_special_tokens`` decoding; VANS: ``rl.format.TAGS``) appended
    at the end of the vocabulary.  ``tokenizer_config.json`` declares
    ``Qwen2Tokenizer`` with ``eos=<|im_end|>``, ``pad=<|endoftext|>`` and the
    Qwen2-VL chat template, so ``AutoTokenizer.from_pretrained(out_dir)`` works.

    Returns the ids: ``endoftext, im_start, im_end, vision_start, vision_end,
    image_pad, video_pad, pad, eos, vocab_size`` (``vocab_size`` = total
    number of ids) and each added token's id under its text.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    texts = list(vocab_texts) if vocab_texts is not None else list(_DEFAULT_CORPUS)
    texts = texts + [VANS_SYSTEM_PROMPT]

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    added_tokens = tuple(added_tokens)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    tok.save(os.path.join(out_dir, "tokenizer.json"))

    added_decoder = {}
    for t in QWEN_SPECIAL_TOKENS + added_tokens:
        added_decoder[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": t in QWEN_SPECIAL_TOKENS,
        }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": [IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 32768,
        "add_prefix_space": False,
        "chat_template": QWEN2_VL_CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)

    ids = {
        "endoftext": tok.token_to_id(ENDOFTEXT),
        "im_start": tok.token_to_id(IM_START),
        "im_end": tok.token_to_id(IM_END),
        "vision_start": tok.token_to_id(VISION_START),
        "vision_end": tok.token_to_id(VISION_END),
        "image_pad": tok.token_to_id(IMAGE_PAD),
        "video_pad": tok.token_to_id(VIDEO_PAD),
    }
    ids.update({t: tok.token_to_id(t) for t in added_tokens})
    ids["pad"] = ids["endoftext"]
    ids["eos"] = ids["im_end"]
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return {k: int(v) for k, v in ids.items()}
