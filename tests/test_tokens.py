"""First windows: one tokenization per text, bounded tokenizer input, exact truncation and dropped counts."""

import numpy as np
import pytest

from docembed.transforms.prepare.tokens import CHARS_PER_TOKEN, cap_text, dropped_tokens, estimated_dropped, first_windows

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def encoder(reference_model):
    """The reference tokenizer's content ids (no special tokens), recording every text it is handed."""
    tok = reference_model.tokenizer
    seen = []

    def encode(texts):
        seen.extend(texts)
        return tok(texts, add_special_tokens=False)["input_ids"]

    def count(texts):
        return np.array([len(ids) for ids in encode(texts)])

    encode.seen, encode.count = seen, count
    return tok, encode


def test_cap_text_cuts_at_whitespace_in_the_second_half():
    assert cap_text("short", 10) == "short"
    assert cap_text("aaaa bbbb cccc", 12) == "aaaa bbbb"
    assert cap_text("x" * 30, 12) == "x" * 12


def test_a_5mb_document_is_truncated_exactly_without_tokenizing_megabytes(encoder):
    tok, encode = encoder
    encode.seen.clear()
    text = "The quick brown fox jumps over the lazy dog. " * 120_000  # ~5.4 MB
    firsts = first_windows([text, "tiny"], 254, encode)
    assert firsts.truncated.tolist() == [True, False]
    assert firsts.lengths.tolist() == [254, 1]
    assert max(len(t) for t in encode.seen) <= CHARS_PER_TOKEN * 254
    # The window holds exactly what the tokenizer's own truncation gives the model.
    full = tok(text[:20_000], truncation=True, max_length=256)["input_ids"]
    assert [101, *firsts.ids[0].tolist(), 102] == full
    assert firsts.ids[1].tolist() == tok("tiny", add_special_tokens=False)["input_ids"]


def test_every_character_is_tokenized_once_and_the_dropped_count_is_exact(encoder):
    tok, encode = encoder
    text = "Tokenizers split words at whitespace; so do the pieces. " * 2_000
    encode.seen.clear()
    firsts = first_windows([text], 254, encode)
    dropped = dropped_tokens([text], firsts, encode.count)
    assert sum(len(t) for t in encode.seen) == len(text)  # the prefix, then the rest: no character twice
    whole = len(tok(text, add_special_tokens=False)["input_ids"])
    assert dropped == {0: whole - 254}


def test_text_that_is_mostly_whitespace_is_widened_until_truncation_is_proven(encoder):
    _, encode = encoder
    text = ("word" + " " * 40) * 400  # 400 tokens spread over 17,600 characters
    encode.seen.clear()
    firsts = first_windows([text], 254, encode)
    assert firsts.truncated.tolist() == [True]
    # Widened once, to what the first prefix's 44 characters a token say the window needs (255 tokens
    # x 44 x 1.25: about 14,000 characters), not by a fixed factor (x4 would take three passes).
    assert len(encode.seen) == 2 and 13_000 < len(encode.seen[1]) < 15_000
    assert dropped_tokens([text], firsts, encode.count) == {0: 400 - 254}
    short_but_wide = ("word" + " " * 40) * 100  # 100 tokens over 4,400 characters: not truncated
    firsts = first_windows([short_but_wide], 254, encode)
    assert firsts.truncated.tolist() == [False]
    assert firsts.lengths[0] == 100
    assert dropped_tokens([short_but_wide], firsts, encode.count) == {}


def test_estimated_dropped_tokens_read_no_character_past_the_prefix(encoder):
    """The estimate counts what the window leaves out from characters at each text's own rate: nothing
    past the prefix is tokenized, and on real prose (module docstrings of 1 to 5 windows) the total
    is within a few percent of the exact count."""
    import importlib
    import inspect

    _, encode = encoder
    names = "argparse json re unittest subprocess doctest collections logging".split()
    texts = [inspect.getdoc(importlib.import_module(m)) or "" for m in names]
    encode.seen.clear()
    firsts = first_windows(texts, 254, encode)
    read = sum(len(t) for t in encode.seen)
    estimate = estimated_dropped(texts, firsts)
    assert sum(len(t) for t in encode.seen) == read  # the estimate tokenized nothing
    exact = dropped_tokens(texts, firsts, encode.count)
    assert estimate.keys() == exact.keys() and len(exact) >= 5
    for i in exact:  # a text's rate varies along it (prose, then an example): each within a fifth
        assert estimate[i] == pytest.approx(exact[i], rel=0.2), names[i]
    assert sum(estimate.values()) == pytest.approx(sum(exact.values()), rel=0.06)
    assert sum(estimate.values()) != sum(exact.values())  # an estimate, not a count
