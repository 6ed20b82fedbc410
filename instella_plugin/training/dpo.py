"""Direct preference optimisation: the last stage of Instella-Instruct (``--dataset-type dpo``).

A micro-batch holds b preference pairs (``PreferenceDataset``: ``chosen_*`` and ``rejected_*`` [b, s]
tensors). The policy and a frozen reference model each score all 2b sequences in one forward pass;
a sequence's log-likelihood is the sum of its response tokens' log-probabilities (loss mask 1),
divided by their number for the length-normalised loss Instella uses (``--dpo-loss dpo_norm``,
beta 5; ``dpo`` keeps the sum). With margin m = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
a pair's loss is -log sigmoid(beta m); the step's loss is the mean over the global batch's pairs (the
loss function returns (sum, pair count), which megatron's per-token-loss accounting turns into an
exact mean over micro-batches and data-parallel ranks).

The reference is the model the run started from: the policy's weights before the first step, or,
when a DPO run resumes from its own checkpoint, ``--pretrained-checkpoint``. It runs inside the
policy's forward step, so the layout is TP x DP (PP and CP are refused when the arguments are read).
"""
from functools import partial
from typing import List

import torch
import torch.nn.functional as F

from instella_plugin.model.fused_output_loss import set_expected_loss_grad
from instella_plugin.training import checkpointing
from instella_plugin.training.model_setup import unwrap


NO_REFERENCE = ("error: a DPO run resumed from its own checkpoint needs --pretrained-checkpoint: the reference "
                "model is the checkpoint the run started from")


def check_layout(run) -> None:
    if run.layout.pp > 1 or run.layout.cp > 1:
        raise SystemExit("error: --dataset-type dpo runs the reference model inside the policy's forward step: "
                         "use tensor and data parallelism (PP = CP = 1)")
    if run.flags.packed_documents:
        raise SystemExit("error: --dataset-type dpo scores whole chats, one per sequence: drop --packed-documents")


def sequence_logps(token_nll: torch.Tensor, loss_mask: torch.Tensor, normalise: bool) -> torch.Tensor:
    """[n] log-likelihood of each sequence's masked tokens from per-token negative log-likelihoods [n, s]."""
    mask = loss_mask.float()
    logp = -(token_nll.float() * mask).sum(-1)
    return logp / mask.sum(-1).clamp(min=1.0) if normalise else logp


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """Per-pair DPO loss -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


class DPOStep:
    """megatron ``forward_step_func`` for DPO (see the module docstring)."""

    sequences_per_sample = 2  # chosen and rejected

    def __init__(self, reference_chunks: List[torch.nn.Module], beta: float, normalise: bool):
        self.reference = reference_chunks[0]
        self.beta, self.normalise = float(beta), bool(normalise)

    def __call__(self, data_iterator, model):
        batch = next(data_iterator)
        pairs = batch["chosen_tokens"].shape[0]
        tokens, labels, mask, positions = (torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
                                           for k in ("tokens", "labels", "loss_mask", "position_ids"))
        set_expected_loss_grad([model], None)  # per-sequence token gradients: nothing to precompute
        output = model(tokens, positions, None, labels=labels)
        with torch.no_grad():
            ref_nll = self.reference(tokens, positions, None, labels=labels)
        return output, partial(self.loss, mask, ref_nll, pairs)

    def loss(self, mask, ref_nll, pairs: int, output):
        policy = sequence_logps(output, mask, self.normalise)
        ref = sequence_logps(ref_nll, mask, self.normalise)
        losses = dpo_losses(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], self.beta)
        loss_sum = losses.sum()
        reported = torch.stack([loss_sum.detach().clone(), torch.tensor(float(pairs), device=loss_sum.device)])
        return loss_sum, torch.tensor(pairs, dtype=torch.int), {"lm loss": reported}


def build_reference(plugin, run, transformer_config, policy_chunks, resumed_own_run: bool, device):
    """The frozen reference model: the policy's starting weights (see the module docstring)."""
    chunks = plugin.build_model(run, transformer_config)
    if device.type != "cpu":
        chunks = [c.to(device) for c in chunks]
    if resumed_own_run:
        if not run.flags.pretrained_checkpoint:
            raise SystemExit(NO_REFERENCE)
        checkpointing.load_checkpoint(run.flags.pretrained_checkpoint, chunks, load_rng=False)
    else:
        for ref, pol in zip(chunks, policy_chunks):
            ref.load_state_dict(unwrap(pol).state_dict(), strict=True)
    for c in chunks:
        c.eval()
        c.requires_grad_(False)
    return chunks
