"""PPO maths against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from cai.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    per_token_rewards,
    policy_loss,
    value_loss,
    whiten,
)

NAN, INF = math.nan, math.inf


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, t(expected), rtol=1e-9, atol=1e-12)


# --- masked statistics -------------------------------------------------------------------------

X = t([[1.0, 2.0, 3.0], [4.0, NAN, INF]])  # padding holds garbage on purpose
M = torch.tensor([[1, 1, 0], [1, 0, 0]])  # real entries: 1, 2, 4


def test_masked_mean_ignores_padding_even_nan():
    assert masked_mean(X, M).item() == pytest.approx(7 / 3)
    close(masked_mean(X, M, dim=1), [1.5, 4.0])
    assert math.isnan(masked_mean(X, torch.zeros_like(M)).item())


def test_masked_var_by_hand():
    # deviations from 7/3: -4/3, -1/3, 5/3; squares sum to 42/9.
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(42 / 9 / 3)
    assert masked_var(X, M).item() == pytest.approx(42 / 9 / 2)
    assert math.isnan(masked_var(X, t([[1, 0, 0], [0, 0, 0]])).item())


def test_whiten_gives_zero_mean_unit_variance_and_zero_padding():
    w = whiten(X, M)
    assert masked_mean(w, M).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, M, unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert w[0, 2] == 0 and w[1, 1] == 0 and w[1, 2] == 0
    std = math.sqrt(42 / 27)
    assert w[0, 0].item() == pytest.approx((1 - 7 / 3) / std, rel=1e-6)
    kept = whiten(X, M, shift_mean=False)
    assert masked_mean(kept, M).item() == pytest.approx(7 / 3)
    assert kept[1, 0].item() == pytest.approx((4 - 7 / 3) / std + 7 / 3, rel=1e-6)
    one = whiten(X, t([[0, 1, 0], [0, 0, 0]]))
    assert torch.equal(one, torch.zeros_like(one))


# --- rewards and KL ----------------------------------------------------------------------------


def test_per_token_rewards_by_hand():
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = per_token_rewards(t([2.0, -1.0]), kl, mask, beta=0.5)
    close(rewards, [[-0.05, -0.1, -0.15 + 2.0], [-0.2, -0.25 - 1.0, 0.0]])


def test_per_token_rewards_single_token_row_and_empty_row():
    rewards = per_token_rewards(t([3.0]), t([[0.2, 9.0, 9.0]]), torch.tensor([[1, 0, 0]]), beta=0.1)
    close(rewards, [[3.0 - 0.02, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        per_token_rewards(t([1.0, 1.0]), torch.zeros(2, 2, dtype=torch.float64), torch.tensor([[1, 0], [0, 0]]), 0.1)


def test_kl_penalty_kinds_by_hand():
    logp, ref = t([[-1.0, -2.0]]), t([[-2.0, -1.0]])  # diff = +1, -1
    close(kl_penalty(logp, ref, "k1"), [[1.0, -1.0]])
    close(kl_penalty(logp, ref, "k2"), [[0.5, 0.5]])
    close(kl_penalty(logp, ref, "k3"), [[math.exp(-1), math.e - 2]])
    close(kl_penalty(logp, ref, "abs"), [[1.0, 1.0]])
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_and_k2_is_not():
    # Exact expectation over a 3-token vocabulary: E_{x~pi}[k(x)] against KL(pi || ref).
    pi, ref = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]
    true_kl = sum(p * math.log(p / q) for p, q in zip(pi, ref))
    logp, logq = t([[math.log(p) for p in pi]]), t([[math.log(q) for q in ref]])
    weights = t([pi])
    for kind in ("k1", "k3"):
        assert (weights * kl_penalty(logp, logq, kind)).sum().item() == pytest.approx(true_kl)
    assert (weights * kl_penalty(logp, logq, "k2")).sum().item() != pytest.approx(true_kl)
    assert bool((kl_penalty(logp, logq, "k3") >= 0).all())


# --- GAE ---------------------------------------------------------------------------------------


def test_gae_two_by_three_by_hand():
    rewards = t([[1.0, 0.0, 2.0], [0.0, 1.0, 9.0]])
    values = t([[0.5, 1.0, 1.5], [2.0, 1.0, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    # Row 0, backwards:  t=2: delta = 2 + 0 - 1.5 = 0.5;           A = 0.5
    #                    t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35;     A = 0.35 + 0.45*0.5 = 0.575
    #                    t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;      A = 1.4 + 0.45*0.575 = 1.65875
    # Row 1 (last real token t=1, bootstraps from 0):
    #                    t=1: delta = 1 + 0 - 1.0 = 0.0;            A = 0.0
    #                    t=0: delta = 0 + 0.9*1.0 - 2.0 = -1.1;     A = -1.1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    close(advantages, [[1.65875, 0.575, 0.5], [-1.1, 0.0, 0.0]])
    close(returns, [[2.15875, 1.575, 2.0], [0.9, 1.0, 0.0]])


def test_gae_limits_of_lambda():
    rewards, values = t([[1.0, 2.0, 3.0]]), t([[0.5, 0.25, 1.0]])
    mask = torch.ones(1, 3)
    # lam = 1, gamma = 1: A_t = sum of rewards to go - V_t.
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(advantages, [[6.0 - 0.5, 5.0 - 0.25, 3.0 - 1.0]])
    # lam = 0: A_t is the one-step TD error r_t + gamma V_{t+1} - V_t.
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    close(advantages, [[1.0 + 0.125 - 0.5, 2.0 + 0.5 - 0.25, 3.0 - 1.0]])


def test_gae_returns_no_gradient():
    values = t([[1.0, 2.0]]).requires_grad_()
    advantages, returns = gae(t([[0.0, 1.0]]), values, torch.ones(1, 2), 1.0, 1.0)
    assert not advantages.requires_grad and not returns.requires_grad


# --- policy and value losses -------------------------------------------------------------------


def test_policy_loss_by_hand():
    # eps = 0.2. Tokens: ratio 1.5 with A=+1 (clipped, -1.2); ratio 0.5 with A=+1 (unclipped, -0.5);
    # ratio 0.5 with A=-2 (clipped, +1.6); ratio 1 with A=3 (-3); last one is padding.
    old = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    logp = t([[math.log(1.5), math.log(0.5), math.log(0.5)], [0.0, 50.0, 0.0]]).requires_grad_()
    adv = t([[1.0, 1.0, -2.0], [3.0, NAN, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, clip_fraction, approx_kl = policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.6 - 3.0) / 4)
    assert clip_fraction.item() == pytest.approx(0.5)
    kl = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4
    assert approx_kl.item() == pytest.approx(kl)
    loss.backward()
    # d(-A * ratio)/d logp = -A * ratio on unclipped tokens; clipped and padding tokens get 0.
    close(logp.grad, [[0.0, -0.5 / 4, 0.0], [-3.0 / 4, 0.0, 0.0]])


def test_policy_loss_at_the_clip_boundary_counts_as_unclipped():
    log_ratio = 0.25
    eps = float(torch.exp(t(log_ratio))) - 1.0  # ratio sits exactly on 1 + eps
    _, clip_fraction, _ = policy_loss(t([[log_ratio]]), t([[0.0]]), t([[1.0]]), torch.ones(1, 1), eps)
    assert clip_fraction.item() == 0.0
    loss, clip_fraction, approx_kl = policy_loss(t([[0.0]]), t([[0.0]]), t([[2.0]]), torch.ones(1, 1), 0.0)
    assert (loss.item(), clip_fraction.item(), approx_kl.item()) == (-2.0, 0.0, 0.0)


def test_value_loss_by_hand():
    # c = 0.25, old value 0.5, return 1:
    #   v = 1.0   -> clipped to 0.75: max(0, 0.0625) = 0.0625 (clipped used)
    #   v = 0.625 -> inside the range: both 0.140625 (a tie is not clipping)
    #   v = 0.0   -> clipped to 0.25: max(1, 0.5625) = 1
    values = t([[1.0, 0.625, 0.0, 7.0]]).requires_grad_()
    old, returns = t([[0.5, 0.5, 0.5, 0.0]]), t([[1.0, 1.0, 1.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clip_fraction = value_loss(values, old, returns, mask, clip_range_value=0.25)
    assert loss.item() == pytest.approx(0.5 * (0.0625 + 0.140625 + 1.0) / 3)
    assert clip_fraction.item() == pytest.approx(1 / 3)
    loss.backward()
    # Clipped token: gradient 0. Others: (v - R) / 3.
    close(values.grad, [[0.0, (0.625 - 1.0) / 3, -1.0 / 3, 0.0]])


# --- logits ------------------------------------------------------------------------------------


def test_entropy_by_hand_and_at_extremes():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -INF, -INF]],
                           [[1e4, 0.0, -1e4, 0.0], [0.0, 0.0, -INF, -INF]]])
    h = entropy_from_logits(logits)
    assert h.dtype == torch.float32 and bool(torch.isfinite(h).all())
    expected = [[math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))], [0.0, math.log(2)]]
    torch.testing.assert_close(h, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_logprobs_from_logits_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    lp = logprobs_from_logits(logits, torch.tensor([[2, 1]]))
    expected = [[3.0 - math.log(math.e + math.e**2 + math.e**3), -math.log(3)]]
    torch.testing.assert_close(lp, torch.tensor(expected))


def test_logprobs_from_bf16_logits_are_float32():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 50, generator=gen) * 5).to(torch.bfloat16)
    tokens = torch.randint(0, 50, (2, 3), generator=gen)
    lp = logprobs_from_logits(logits, tokens)
    assert lp.dtype == torch.float32
    reference = torch.log_softmax(logits.double(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp.double(), reference, rtol=1e-6, atol=1e-5)
    assert logprobs_from_logits(torch.tensor([[[1e4, 0.0]]]), torch.tensor([[1]])).item() == -1e4


def test_explained_variance_by_hand():
    returns = t([[1.0, 2.0, 3.0, 4.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # Errors 0, 0, 0, 1: variance 0.1875; Var[R] = 1.25 -> 1 - 0.15 = 0.85.
    assert explained_variance(t([[1.0, 2.0, 3.0, 3.0, 0.0]]), returns, mask) == pytest.approx(0.85)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(t([[2.5] * 5]), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(t([[0.0, 1.0]]), t([[1.0, 1.0]]), torch.ones(1, 2)))


# --- KL controllers ----------------------------------------------------------------------------


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, 256)  # error 1.0 clipped to 0.2: x (1 + 0.2 * 256 / 10000)
    expected = 0.1 * 1.00512
    assert ctl.value == pytest.approx(expected)
    ctl.update(6.6, 100)  # error 0.1: x 1.001
    expected *= 1.001
    assert ctl.value == pytest.approx(expected)
    ctl.update(0.0, 500)  # error -1 clipped to -0.2: x 0.99
    expected *= 0.99
    assert ctl.value == pytest.approx(expected)
    ctl.update(6.0, 500)  # on target: unchanged
    assert ctl.value == pytest.approx(expected)
    resumed = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# --- RunningMoments ----------------------------------------------------------------------------


def test_running_moments_equal_statistics_of_the_concatenation():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=gen) * 2 + 3 for n in (3, 1, 6, 2)]
    moments = RunningMoments()
    assert (moments.mean, moments.std) == (0.0, 1.0)
    for i, batch in enumerate(batches):
        batch_mean, batch_std = moments.update(batch)
        assert batch_mean == pytest.approx(batch.double().mean().item())
        if batch.numel() > 1:
            assert batch_std == pytest.approx(batch.double().std().item())
        seen = torch.cat(batches[: i + 1]).double()
        assert moments.mean == pytest.approx(seen.mean().item())
        if seen.numel() > 1:
            assert moments.std == pytest.approx(seen.std().item())
    assert moments.count == 12


def test_running_moments_resume_from_state_dict():
    first, second = t([1.0, 2.0, 4.0]), t([[0.5, 8.0]])
    moments = RunningMoments()
    moments.update(first)
    resumed = RunningMoments()
    resumed.load_state_dict(moments.state_dict())
    resumed.update(second)
    everything = torch.cat([first, second.flatten()])
    assert resumed.mean == pytest.approx(everything.mean().item())
    assert resumed.std == pytest.approx(everything.std().item())
    with pytest.raises(ValueError, match="empty"):
        resumed.update(torch.zeros(0))
