"""Token counting: bounded tokenizer input, exact truncation, long and odd texts."""

import numpy as np
import pytest

from transforms.tokens import CHARS_PER_TOKEN, cap_text, count_tokens


@pytest.fixture(scope="module")
def tokenizer_lengths(reference_model):
    tok = reference_model.tokenizer
    seen = []

    def lengths(texts, limit):
        seen.append(max(len(t) for t in texts))
        enc = tok(texts, truncation=True, max_length=limit)
        return np.array([len(x) for x in enc["input_ids"]])

    lengths.seen = seen
    return tok, lengths


def test_cap_text_cuts_at_whitespace_in_the_second_half():
    assert cap_text("short", 10) == "short"
    assert cap_text("aaaa bbbb cccc", 12) == "aaaa bbbb"
    assert cap_text("x" * 30, 12) == "x" * 12


def test_a_5mb_document_is_truncated_exactly_without_tokenizing_megabytes(tokenizer_lengths):
    tok, lengths = tokenizer_lengths
    lengths.seen.clear()
    text = "The quick brown fox jumps over the lazy dog. " * 120_000  # ~5.4 MB
    counted = count_tokens([text, "tiny"], 256, lengths)
    assert counted.truncated.tolist() == [True, False]
    assert counted.lengths[0] == 256
    assert max(lengths.seen) <= CHARS_PER_TOKEN * 256
    # The capped prefix gives the model exactly the first 256 tokens of the full text.
    full = tok(text[:20_000], truncation=True, max_length=256)["input_ids"]
    capped = tok(counted.texts[0], truncation=True, max_length=256)["input_ids"]
    assert capped == full


def test_text_that_is_mostly_whitespace_is_widened_until_truncation_is_proven(tokenizer_lengths):
    _, lengths = tokenizer_lengths
    text = ("word" + " " * 40) * 400  # 400 tokens spread over 17,600 characters
    counted = count_tokens([text], 256, lengths)
    assert counted.truncated.tolist() == [True]
    short_but_wide = ("word" + " " * 40) * 100  # 100 tokens over 4,400 characters: not truncated
    counted = count_tokens([short_but_wide], 256, lengths)
    assert counted.truncated.tolist() == [False]
    assert counted.lengths[0] == 102  # 100 words + [CLS] + [SEP]
