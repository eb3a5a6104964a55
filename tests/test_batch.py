"""Batch planning: 64-256 documents of similar length, never over the token budget."""

import numpy as np
import pytest

from docembed.transforms.prepare.batch import padded_tokens, plan_batches

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("seed", range(5))
def test_batches_respect_sizes_budget_and_cover_every_document_once(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 257, size=int(rng.integers(1, 3000)))
    batches = plan_batches(lengths, 64, 256, 64 * 256)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for b in batches[:-1]:
        assert 64 <= len(b) <= 256 or len(lengths) < 64
    assert len(batches[-1]) <= 256
    for b in batches:
        assert len(b) * lengths[b].max() <= 64 * 256


def test_batches_are_sorted_longest_first_so_padding_is_small():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 257, size=2000)
    batches = plan_batches(lengths, 64, 256, 64 * 256)
    maxima = [lengths[b].max() for b in batches]
    assert maxima == sorted(maxima, reverse=True)
    # Sorted batches pad little: under 10% here, against ~50% for the same batches unsorted.
    assert padded_tokens(lengths, batches) < 1.10 * lengths.sum()


def test_short_documents_fill_large_batches_and_long_ones_small_batches():
    assert sorted(len(b) for b in plan_batches(np.full(600, 10), 64, 256, 16384)) == [88, 256, 256]
    assert [len(b) for b in plan_batches(np.full(200, 256), 64, 256, 16384)] == [64, 64, 64, 8]


def test_a_unit_smaller_than_one_batch_is_cut_by_length():
    lengths = np.array([256, 250, 12, 10, 9, 9, 8, 8, 7, 5])  # two long documents, eight short ones
    batches = plan_batches(lengths, 64, 256, 16384)
    assert [sorted(b.tolist()) for b in batches] == [[0, 1], [2, 3, 4, 5, 6, 7, 8, 9]]
    assert padded_tokens(lengths, batches) == 2 * 256 + 8 * 12  # not 10 x 256


def test_cuts_are_chosen_to_pad_less_than_cutting_greedily():
    rng = np.random.default_rng(7)
    lengths = np.minimum(rng.lognormal(4.6, 1.2, size=3000).astype(int) + 3, 256)  # like real documents
    optimal = padded_tokens(lengths, plan_batches(lengths, 64, 256, 16384))
    ordered = np.sort(lengths)[::-1]
    greedy, start = 0, 0
    while start < len(ordered):  # fill each batch as far as the bounds allow
        size = max(64, min(256, 16384 // ordered[start]))
        greedy += len(ordered[start:start + size]) * ordered[start]
        start += size
    assert optimal < 0.99 * greedy
    assert optimal < 1.05 * lengths.sum()  # under 5% padding


@pytest.mark.parametrize("seed", range(20))
def test_cuts_cost_no_more_than_the_best_of_every_possible_cut(seed):
    """Against a plain search of every way to cut the sorted documents (sizes min..max, the last one
    possibly short, within the budget): the planner's cost is the least there is."""
    from functools import lru_cache

    from docembed.transforms.prepare.batch import BATCH_OVERHEAD_TOKENS

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=int(rng.integers(1, 40)))
    low, high, budget = 4, 9, 300
    ordered = np.sort(lengths)[::-1]

    @lru_cache(maxsize=None)
    def least(i: int) -> float:  # the cheapest cut of ordered[i:]
        if i == len(ordered):
            return 0.0
        options = [size * ordered[i] + BATCH_OVERHEAD_TOKENS + least(i + size) for size in range(1, high + 1)
                   if i + size <= len(ordered) and (size >= low or i + size == len(ordered))
                   and size * ordered[i] <= budget]
        return min(options, default=np.inf)

    batches = plan_batches(lengths, low, high, budget)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert padded_tokens(lengths, batches) + BATCH_OVERHEAD_TOKENS * len(batches) == least(0)
