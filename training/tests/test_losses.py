"""DPO and RPO against hand-computed values on fixed log-probs; the LM and reward losses' sums."""
from __future__ import annotations

import math

import torch

from n4_train.data import IGNORE
from n4_train.losses import dpo_loss, lm_loss_sum, reward_regression_sum, rpo_loss, sequence_logprobs

# Fixed log-probs of two pairs: policy chosen/rejected, reference chosen/rejected.
PC, PR = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
RC, RR = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -2.0])


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_equals_hand_computed_values():
    # Pair 0: Δ = (-10 + 11) - (-12 + 11.5) = 1 + 0.5 = 1.5; pair 1: Δ = (-4 + 4.5) - (-3 + 2) = 0.5 + 1 = 1.5.
    # With β = 0.1: loss = -log σ(0.15) = 0.62041...
    expected = -math.log(_sigmoid(0.15))
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta=0.1), torch.tensor([expected, expected]))
    assert abs(expected - 0.6209570) < 1e-6


def test_rpo_equals_hand_computed_values():
    reward_c, reward_l = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.5])
    beta, eta = 0.5, 1.0
    losses = rpo_loss(PC, PR, RC, RR, reward_c, reward_l, beta, eta)
    for i, (a, b) in enumerate([(0.75, 2.0), (0.75, -0.5)]):  # a = β·Δ = 0.5 * 1.5; b = η·(r_c - r_l)
        sa, sb = _sigmoid(a), _sigmoid(b)
        expected = sb * math.log(sb / sa) + (1 - sb) * math.log((1 - sb) / (1 - sa))
        assert abs(float(losses[i]) - expected) < 1e-6
    assert abs(float(losses[0]) - 0.1109393) < 1e-6  # the first pair, worked by hand


def test_rpo_is_zero_when_the_gaps_agree_and_grows_either_way():
    delta_target = torch.tensor([0.6])
    zero = torch.zeros(1)
    at = rpo_loss(delta_target, zero, zero, zero, delta_target, zero, beta=1.0, eta=1.0)
    assert abs(float(at)) < 1e-7
    for off in (-1.0, 1.0):
        assert float(rpo_loss(delta_target + off, zero, zero, zero, delta_target, zero, 1.0, 1.0)) > 1e-3
    # Numerically safe at large gaps (where naive log(1 - σ) would give -inf).
    assert torch.isfinite(rpo_loss(torch.tensor([200.0]), zero, zero, zero, torch.tensor([-50.0]), zero, 1.0, 1.0)).all()


def test_sequence_logprobs_sum_only_trained_positions():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))  # [1, 3, 3]
    labels = torch.tensor([[IGNORE, 1, 2]])
    torch.testing.assert_close(sequence_logprobs(logits, labels), torch.log(torch.tensor([0.8 * 0.6])))
    loss, count = lm_loss_sum(logits, labels)
    assert count == 2 and abs(float(loss) + math.log(0.8 * 0.6)) < 1e-6


def test_reward_regression_uses_the_last_five_outputs():
    values = torch.tensor([[9.0, 9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    targets = torch.tensor([[1.0, 2.0, 3.0, 4.0, 3.0]])
    assert float(reward_regression_sum(values, targets)) == 4.0
