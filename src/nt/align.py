"""Alignment after supervised fine-tuning: DPO (preference pairs) and GRPO (rewards).

DPO (Rafailov et al. 2023), as TRL's DPOTrainer computes it: for a prompt with a chosen and
a rejected response, h = (pi_c - ref_c) - (pi_r - ref_r) on the responses' summed
log-probabilities under the policy (pi) and the frozen reference model (ref);
    sigmoid: loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: conservative DPO's label smoothing)
    ipo:     loss = (h - 1 / (2 beta))^2, on length-AVERAGED log-probabilities (TRL divides
             each response's summed log-prob by its token count when loss_type="ipo")
rewards = beta (pi - ref) for each response. `dpo_loss` is that formula on NumPy arrays;
`nt.ops.dpo` is the op that backpropagates it through the tape.

GRPO (Shao et al. 2024, DeepSeekMath; as in DeepSeek-R1): G completions per prompt are
sampled, scored, and each completion's advantage is its reward normalised within its
group, A = (r - mean) / (std + 1e-4) (TRL's scale_rewards="group": the Bessel-corrected std,
as torch.std computes it). Per completion token, with ratio = exp(logp - old_logp),
    l = -(min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) - beta KL),  KL = exp(ref - logp) - (ref - logp) - 1
and the loss is the sum over every completion token of the batch divided by their count
(TRL's loss_type="bnpo", the token-level normalisation of DAPO; "dapo" is the same on one
process). `nt.ops.grpo` is that op.

The training loops (train/dpo.py, train/grpo.py) are batch sources and loss functions for
nt.train_utils.train, which supplies the optimizer, schedule, clipping, checkpoints and
exact resume.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

DPO_LOSS_TYPES = ("sigmoid", "ipo")
ADVANTAGE_EPS = 1e-4   # TRL's: keeps a group of equal rewards at advantage 0


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    """log(sigmoid(x)) without overflow: -log(1 + exp(-x))."""
    return -np.logaddexp(0.0, -x)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-pair losses, chosen rewards, rejected rewards), each (B,), from the responses'
    log-probabilities (B,) under the policy and the reference, as TRL's DPOTrainer.dpo_loss.

    The log-probs are used as given: summed for "sigmoid", averaged over each response's
    tokens for "ipo" (as TRL passes them). Rewards are beta * (policy - reference)."""
    arrays = [np.asarray(a, dtype=np.float64) for a in
              (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"dpo_loss: the four log-prob arrays must be (B,) of the same length, "
                         f"got shapes {[a.shape for a in arrays]}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be positive, got {beta}")
    pc, pr, rc, rr = arrays
    h = (pc - rc) - (pr - rr)
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * _log_sigmoid(beta * h) - label_smoothing * _log_sigmoid(-beta * h)
    return losses, beta * (pc - rc), beta * (pr - rr)


def group_advantages(rewards, group_size: int, eps: float = ADVANTAGE_EPS) -> np.ndarray:
    """(r - mean) / (std + eps) within each group of `group_size` consecutive rewards
    (the G completions of one prompt); std is Bessel-corrected, as TRL's torch.std."""
    r = np.asarray(rewards, dtype=np.float64)
    if group_size < 2:
        raise ValueError(f"GRPO needs G >= 2 completions per prompt to compare, got G = {group_size}")
    if r.ndim != 1 or r.size % group_size:
        raise ValueError(f"rewards must be a flat array whose length is a multiple of G = {group_size}, "
                         f"got shape {r.shape}")
    groups = r.reshape(-1, group_size)
    adv = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1)


__all__ = ["dpo_loss", "group_advantages", "DPO_LOSS_TYPES"]
