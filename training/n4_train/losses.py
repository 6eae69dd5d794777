"""The objectives: next-token cross-entropy, reward regression, DPO and RPO (formulas in REFERENCE.md, Alignment).

Every loss returns a *sum* and the count it is over, so that gradient accumulation can divide by the count of
the whole optimizer step (a token-weighted mean over the global batch, independent of how it was split)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from n4_train.data import IGNORE


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """logits [B, S, V] fp32, labels [B, S] (IGNORE where untrained) -> (summed CE in nats, trained tokens)."""
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, S, V], labels [B, S] -> [B]: sum of log p(label) over the trained positions of each row."""
    mask = labels != IGNORE                                                     # [B, S]
    logp = torch.log_softmax(logits.float(), dim=-1)                            # [B, S, V]
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)       # [B, S]
    return (picked * mask).sum(dim=-1)


def implicit_reward_gap(policy_chosen, policy_rejected, reference_chosen, reference_rejected) -> torch.Tensor:
    """Δ = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_l|x) − log π_ref(y_l|x)], per pair [B]."""
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float) -> torch.Tensor:
    """Per pair [B]: −log σ(β·Δ)."""
    delta = implicit_reward_gap(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return -F.logsigmoid(beta * delta)


def rpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, reward_chosen,
             reward_rejected, beta: float, eta: float) -> torch.Tensor:
    """Per pair [B]: D[β·Δ ‖ η·(r_c − r_l)], with D[a‖b] = σ(b)·log(σ(b)/σ(a)) + (1−σ(b))·log((1−σ(b))/(1−σ(a))),
    the KL between the Bernoulli preference distributions the two gaps imply. It is minimized when the policy's
    implicit reward gap equals the reward model's scaled gap, rather than pushed up without limit as in DPO.
    Written with logsigmoid (log(1−σ(x)) = logsigmoid(−x)) so large gaps do not overflow."""
    a = beta * implicit_reward_gap(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    b = eta * (reward_chosen - reward_rejected)
    p = torch.sigmoid(b)
    return (p * (F.logsigmoid(b) - F.logsigmoid(a))
            + (1 - p) * (F.logsigmoid(-b) - F.logsigmoid(-a)))


def reward_regression_sum(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """values [B, 9] head outputs at the last token, targets [B, 5] attributes -> summed squared error of the last
    5 outputs (the first 4 stay untrained, as in Nemotron-4-340B-Reward)."""
    predicted = values[:, -targets.shape[1]:]                                  # [B, 5]
    return (predicted - targets).square().sum()
