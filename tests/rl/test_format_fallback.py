"""Fallback captions of malformed responses carry no format tags (they go to the video model)."""
import pytest

from vans_jax.rl.format import TAGS, extract_answer, parse_response


@pytest.mark.parametrize("text, caption", [
    ("[Ans]a red ball[/Think][Ans]falls down[/Ans]", "a red ball falls down"),
    ("[Think]x[Ans]y[/Think][Ans]z[/Ans]", "y z"),
    ("reasoning[/Think][Ans]the cup tips over", "the cup tips over"),
    ("[Think]why[/Think] it [Think] rolls<|im_end|>", "it rolls"),
    ("[Ans] keeps\nnewlines\n[/Ans]", "keeps\nnewlines"),          # nothing to remove: only stripped
])
def test_fallback_caption_has_no_tags(text, caption):
    got = extract_answer(text, fallback="full")
    assert got == caption
    assert not any(t in got for t in TAGS)
    parsed = parse_response(text)
    assert parsed["valid_format"] is False and not any(t in parsed["caption"] for t in TAGS)
