"""The fake backend is deterministic and scriptable, so stage tests can assert exact outputs."""

import pytest

from cai.backends.base import Backend, cut_at_stop, row_seed, seeds_per_row
from cai.backends.fake import FakeBackend
from cai.errors import CaiError
from cai.types import SamplingParams


def test_deterministic_and_seed_sensitive_only_when_sampling():
    fake = FakeBackend()
    prompts = ["a", [{"role": "user", "content": "b"}]]
    greedy = SamplingParams(max_new_tokens=20)
    assert fake.generate(prompts, greedy) == fake.generate(prompts, greedy)
    assert fake.generate(prompts, greedy, seeds=[1, 2]) == fake.generate(prompts, greedy, seeds=[3, 4])
    hot = SamplingParams(max_new_tokens=20, temperature=1.0)
    assert fake.generate(["a"], hot, seeds=[1]) != fake.generate(["a"], hot, seeds=[2])
    assert isinstance(fake, Backend)


def test_scripted_responses_scores_and_stop():
    fake = FakeBackend(respond=lambda text, seed: "first part STOP second", score=lambda p, o: -len(o))
    assert fake.generate(["x"], SamplingParams(stop=("STOP",))) == ["first part"]
    assert fake.choice_logprobs(["p", "q"], [" (A)", " (Bee)"]) == [[-4.0, -6.0], [-4.0, -6.0]]
    assert fake.calls[0] == ("generate", ["x"])


def test_render_continues_a_final_assistant_message():
    fake = FakeBackend()
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is:"}]
    assert fake.render(chat).endswith("The answer is:")
    assert fake.render(chat[:1]).endswith("<|assistant|>\n")


def test_default_scores_are_log_probabilities():
    rows = FakeBackend().choice_logprobs(["p1", "p2"], [" (A)", " (B)"])
    assert all(-6.0 <= v < 0 for row in rows for v in row)
    assert rows[0] != rows[1]


def test_helpers():
    assert cut_at_stop("abc\nHuman: x", ["\nHuman:", "zz"]) == ("abc", True)
    assert cut_at_stop("abc", ["zz"]) == ("abc", False)
    assert row_seed(0, 1) != row_seed(0, 2) != row_seed(1, 1)
    assert row_seed(3, 4) == row_seed(3, 4)


def test_seeds_per_row_takes_one_seed_per_prompt_or_derives_them():
    assert seeds_per_row(None, 3, 2) == [row_seed(3, 0), row_seed(3, 1)]
    assert seeds_per_row((5, 6), 0, 2) == [5, 6]
    with pytest.raises(CaiError, match="got 1 seeds for 2 prompts"):
        seeds_per_row([5], 0, 2)
    with pytest.raises(CaiError, match="got 3 seeds for 2 prompts"):
        FakeBackend().generate(["a", "b"], SamplingParams(temperature=1.0), seeds=[1, 2, 3])
