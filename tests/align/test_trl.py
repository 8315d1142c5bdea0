"""nt.align.dpo_loss against TRL's DPOTrainer, and ops.grpo against TRL's GRPOTrainer loss
(loss_type "bnpo") and its gradient, on random log-probabilities (slow; needs trl).

TRL 1.x has no standalone dpo_loss any more: its losses live in the trainers'
_compute_loss, which take a model and a batch. The tests hand that method a stand-in
trainer with the settings it reads and a stand-in model that returns fixed per-token
log-probs (reference log-probs precomputed), so only TRL's loss arithmetic runs. Compared: the mean loss for
sigmoid (TRL 1.x's sigmoid has no label smoothing; nt keeps TRL 0.x's conservative-DPO
smoothing, equal at 0) and IPO (length-averaged, in both), and the reward metrics for
sigmoid. (For IPO, TRL 1.x logs rewards from the summed log-ratios; TRL 0.x's dpo_loss, and
nt, from the averaged ones that the loss uses.)
"""
import collections
import types

import numpy as np
import pytest

from nt import align

pytestmark = pytest.mark.slow


class _Outputs:
    """What TRL reads from a model's forward."""


def trl_dpo(token_logps, ref_logps, mask, beta, loss_type):
    """TRL's mean DPO loss and its logged metrics for 2B rows (chosen, then rejected)."""
    torch = pytest.importorskip("torch")     # imported here: CI collects this file without running it
    DPOTrainer = pytest.importorskip("trl").DPOTrainer
    if not hasattr(DPOTrainer, "_compute_loss"):
        pytest.skip("this TRL version computes the DPO loss elsewhere")
    rows, L = mask.shape

    def model(**_):
        out = _Outputs()
        out.log_probs = torch.tensor(token_logps)
        out.entropy = out.mean_logits = torch.zeros(rows, L - 1)
        out.is_top1 = torch.zeros(rows, L - 1, dtype=torch.bool)
        return out

    model.training = True
    identity = types.SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = types.SimpleNamespace(model=model, accelerator=identity, aux_loss_enabled=False, ld_alpha=None,
                                    precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                                    loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
                                    _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0,
                                    _tp_size=1)
    B = rows // 2
    inputs = {"input_ids": torch.zeros(rows, L, dtype=torch.long),
              "attention_mask": torch.ones(rows, L, dtype=torch.long),
              "completion_mask": torch.tensor(mask), "ref_chosen_logps": torch.tensor(ref_logps[:B]),
              "ref_rejected_logps": torch.tensor(ref_logps[B:])}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 2.0), ("ipo", 0.1), ("ipo", 0.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_loss_matches_trl(loss_type, beta, seed):
    rng = np.random.default_rng(seed)
    B, L = 6, 9
    mask = np.zeros((2 * B, L), dtype=np.int64)
    for r in range(2 * B):
        start = int(rng.integers(1, 4))
        mask[r, start:int(rng.integers(start + 1, L + 1))] = 1
    token_logps = -3 * rng.random((2 * B, L - 1)) * mask[:, 1:]
    ref = (-3 * rng.random((2 * B, L - 1)) * mask[:, 1:]).sum(1)
    want, logged = trl_dpo(token_logps, ref, mask, beta, loss_type)

    policy = token_logps.sum(1)
    if loss_type == "ipo":
        lengths = mask[:, 1:].sum(1)
        policy, ref = policy / lengths, ref / lengths
    losses, chosen, rejected = align.dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], beta, 0.0, loss_type)
    np.testing.assert_allclose(losses.mean(), want, rtol=1e-12)
    if loss_type == "sigmoid":
        np.testing.assert_allclose(chosen.mean(), logged["rewards/chosen"], rtol=1e-12)
        np.testing.assert_allclose(rejected.mean(), logged["rewards/rejected"], rtol=1e-12)
        np.testing.assert_allclose(np.mean(chosen > rejected), logged["rewards/accuracies"])
        np.testing.assert_allclose(np.mean(chosen - rejected), logged["rewards/margins"], rtol=1e-12)


def trl_grpo(logps, old, ref, adv, mask, beta, eps_low, eps_high):
    """TRL's GRPO loss (loss_type "bnpo") on given per-token log-probs, with its gradient
    with respect to them and its logged metrics."""
    torch = pytest.importorskip("torch")
    GRPOTrainer = pytest.importorskip("trl").GRPOTrainer
    if not hasattr(GRPOTrainer, "_compute_loss"):
        pytest.skip("this TRL version computes the GRPO loss elsewhere")
    lp = torch.tensor(logps, requires_grad=True)

    def per_token(model, *args, **kwargs):
        return lp, torch.zeros_like(lp), None

    model = types.SimpleNamespace(training=True)
    reduce = lambda x, reduction: x  # noqa: E731  (one process)
    identity = types.SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=reduce,
                                     sync_gradients=True)
    trainer = types.SimpleNamespace(
        model=model, accelerator=identity, _get_per_token_logps_and_entropies=per_token, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta, loss_type="bnpo",
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, current_gradient_accumulation_steps=1, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, _metrics={"train": collections.defaultdict(list)})
    B, T = logps.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": torch.tensor(mask),
              "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(old),
              "ref_per_token_logps": torch.tensor(ref)}
    loss = GRPOTrainer._compute_loss(trainer, model, inputs)
    loss.backward()
    return float(loss.detach()), lp.grad.numpy(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("beta, eps_low, eps_high", [(0.0, 0.2, 0.2), (0.04, 0.2, 0.2), (0.3, 0.1, 0.28)])
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_loss_and_gradient_match_trl(beta, eps_low, eps_high, seed):
    from helpers import run_op
    from nt import ops
    rng = np.random.default_rng(seed)
    B, T = 6, 7
    logps = rng.normal(-2, 1, (B, T))
    old = logps + rng.normal(0, 0.3, (B, T))     # ratios inside and outside the clip range
    ref = logps + rng.normal(0, 0.5, (B, T))
    adv = rng.standard_normal(B)
    mask = (rng.random((B, T)) < 0.7).astype(np.int64)
    mask[:, 0] = 1
    want, want_grad, logged = trl_grpo(logps, old, ref, adv, mask, beta, eps_low, eps_high)

    t, params, loss = run_op(lambda t, p: ops.grpo(t, p["lp"], old, ref, adv, mask, beta, eps_low, eps_high),
                             {"lp": logps})
    params.zero_grad()
    t.backward(loss)
    np.testing.assert_allclose(loss.data[0], want, rtol=1e-12)
    np.testing.assert_allclose(params["lp"].grad, want_grad, rtol=1e-10, atol=1e-14)
    ratio = np.exp(logps - old)
    clipped = ((ratio < 1 - eps_low) & (adv[:, None] < 0)) | ((ratio > 1 + eps_high) & (adv[:, None] > 0))
    # TRL averages the clip flags in float32
    np.testing.assert_allclose((clipped * mask).sum() / mask.sum(), logged["clip_ratio/region_mean"], rtol=1e-6)
    assert 0 < logged["clip_ratio/region_mean"] < 1
