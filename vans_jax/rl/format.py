"""The VANS response format, defined once: ``[Think]reasoning[/Think][Ans]caption[/Ans]``.

Everything that writes, checks or reads a VLM response uses this module: the SFT targets
(``format_response``), the format reward (``follows_format``), the inference pipeline, the
Joint-GRPO rollouts and the evaluation (``parse_response``, ``extract_answer``).
"""
from __future__ import annotations

import re

from ..models.qwen2_5_vl.tokenizer import ENDOFTEXT, IM_END

THINK_OPEN, THINK_CLOSE, ANS_OPEN, ANS_CLOSE = "[Think]", "[/Think]", "[Ans]", "[/Ans]"
TAGS = (THINK_OPEN, THINK_CLOSE, ANS_OPEN, ANS_CLOSE)
CHAT_END_TOKENS = (IM_END, ENDOFTEXT)   # a decoded response may end with these (special tokens kept)

_STRICT = re.compile(r"\A\s*\[Think\](.*?)\[/Think\]\s*\[Ans\](.*?)\[/Ans\]\s*\Z", re.DOTALL)
_THINK = re.compile(r"\[Think\](.*?)\[/Think\]", re.DOTALL)


def format_response(think: str, caption: str) -> str:
    """The assistant text the VLM is trained to write."""
    return f"{THINK_OPEN}{think}{THINK_CLOSE}{ANS_OPEN}{caption}{ANS_CLOSE}"


def _strip_chat_end(text: str) -> str:
    s = text
    for tail in CHAT_END_TOKENS:
        s = s.rstrip()
        if s.endswith(tail):
            s = s[: -len(tail)]
    return s


def extract_answer(text: str, *, fallback: str = "full") -> str:
    """The caption of a response, whatever its shape: the text between the first ``[Ans]`` and the
    next ``[/Ans]`` (to the end when the closing tag is missing), stripped, with no tags left in it.

    Without ``[Ans]``: ``fallback="full"`` returns the text after the last ``[/Think]`` if there is
    one, else the whole text (stripped, tags and chat end tokens removed); ``fallback="empty"``
    returns "". The inference pipeline, the rollouts (the caption rendered and the one ROUGE-L
    scores) and the evaluation all use this rule.
    """
    if fallback not in ("full", "empty"):
        raise ValueError(f"fallback must be 'full' or 'empty', got {fallback!r}")
    s = _strip_chat_end(text)
    i = s.find(ANS_OPEN)
    if i >= 0:
        rest = s[i + len(ANS_OPEN):]
        j = rest.find(ANS_CLOSE)
        return _without_tags(rest if j < 0 else rest[:j])
    if fallback == "empty":
        return ""
    j = s.rfind(THINK_CLOSE)
    return _without_tags(s[j + len(THINK_CLOSE):] if j >= 0 else s)


def _without_tags(s: str) -> str:
    """``s`` stripped; any format tag or chat end token left in it (a malformed response:
    ``[Ans]a[/Think][Ans]b``) removed, whitespace then collapsed: a caption never carries them."""
    if not any(t in s for t in TAGS + CHAT_END_TOKENS):
        return s.strip()
    for tag in TAGS + CHAT_END_TOKENS:
        s = s.replace(tag, " ")
    return " ".join(s.split())


def parse_response(text: str) -> dict:
    """``{"think", "caption", "valid_format"}`` of a response.

    Strict format: exactly one ``[Think]`` block followed by exactly one ``[Ans]`` block; only
    whitespace before, between and after them (a trailing ``<|im_end|>`` / ``<|endoftext|>`` is
    stripped first); no tag inside a block. ``think``/``caption`` are stripped. On a violation
    ``valid_format`` is False and the fields are best effort: ``extract_answer(text,
    fallback="empty")`` and the first ``[Think]...[/Think]`` if present, else "". An empty caption
    is still ``valid_format`` if the tags are well formed.
    """
    s = _strip_chat_end(text)
    m = _STRICT.match(s)
    if m is not None and not any(t in m.group(1) or t in m.group(2) for t in TAGS):
        return {"think": m.group(1).strip(), "caption": m.group(2).strip(), "valid_format": True}
    think = _THINK.search(s)
    return {"think": think.group(1).strip() if think else "", "caption": extract_answer(s, fallback="empty"),
            "valid_format": False}


def follows_format(text: str, *, require_nonempty: bool = True) -> bool:
    """The strict format (``parse_response``), and by default non-empty reasoning and answer."""
    parsed = parse_response(text)
    if not parsed["valid_format"]:
        return False
    return bool(parsed["think"] and parsed["caption"]) if require_nonempty else True
