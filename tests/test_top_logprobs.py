"""Reading answer options off a server's top next-token candidates: hand-worked cases."""

from __future__ import annotations

import math

import pytest

from cai.backends.top_logprobs import fill_absent, fold_common_prefix, read_options
from cai.errors import CaiError


def test_the_shared_start_goes_into_the_prompt_up_to_a_token_boundary():
    assert fold_common_prefix([" (A)", " (B)"]) == (" (", ["A)", "B)"])
    assert fold_common_prefix([" The A", " The B"]) == (" The", [" A", " B"])  # the space goes with the next token
    assert fold_common_prefix(["Yes", "Yellow"]) == ("", ["Yes", "Yellow"])  # never split inside a word
    assert fold_common_prefix([" A", " B"]) == ("", [" A", " B"])
    assert fold_common_prefix(["A"]) == ("", ["A"])  # one option: nothing is shared beyond a word


@pytest.mark.parametrize("options", [[" (A)", " (A) "], ["A", " A"], ["(A", "(AB"], ["x", "x "]])
def test_options_one_next_token_cannot_tell_apart_are_refused(options):
    with pytest.raises(CaiError, match="can't"):
        fold_common_prefix(options)


def test_candidates_count_for_the_option_they_start_and_variants_add_up():
    top = [(" A", -1.0), ("A", -2.0), ("B)", -1.5), ("Q", -0.5), (" ", -3.0), ("(", -4.0)]
    got = read_options(top, ["A)", "B)"])
    assert got[0] == pytest.approx(math.log(math.exp(-1.0) + math.exp(-2.0)))
    assert got[1] == -1.5


def test_a_candidate_that_starts_several_options_counts_for_none():
    assert read_options([("Ye", -0.1), ("Yes", -2.0)], ["Yes", "Yellow"]) == [-2.0, None]


def test_unlisted_options_sit_below_every_listed_one():
    top = [("A", -1.0), ("Q", -3.0)]
    assert fill_absent(read_options(top, ["A", "B"]), top) == [-1.0, -3.0 - math.log(2)]
