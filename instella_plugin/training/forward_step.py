"""The forward step and loss the pipeline schedules call, and one forward-backward pass over a batch.

Batches are dicts of ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` ([b, s] tensors) and
optionally ``packed_seq_params``. The loss is a per-token mean: the loss function returns
(sum, token count) and megatron (``calculate_per_token_loss``) divides the gradients by the token
count over all micro-batches and data-parallel ranks, so accumulation and DP give the exact mean.
"""
from functools import partial
from typing import Iterable, List

import torch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, per_sequence: bool = False):
    """output_tensor: per-token losses [b, s] from GPTModel(labels=...).

    ``per_sequence``: the gradient is divided by the number of sequences (those with a loss token)
    instead of tokens, so each sequence's token losses are summed and the batch's sequences averaged
    (``--sft-loss-reduction sum``); the reported loss stays a per-token mean."""
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = ((loss_mask.reshape(loss_mask.shape[0], -1).sum(-1) > 0).sum() if per_sequence
                  else mask.sum()).to(torch.int)
    reported = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": reported}


def forward_step(data_iterator, model, *, return_logits=None, per_sequence: bool = False):
    """megatron ``forward_step_func``: run the model on the next batch; return (output, loss_func)."""
    batch = next(data_iterator)
    kwargs = {}
    if batch.get("packed_seq_params") is not None:
        kwargs["packed_seq_params"] = batch["packed_seq_params"]
    labels = None if return_logits is not None else batch["labels"]
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=labels, **kwargs)
    if return_logits is not None:
        return output, partial(_collect_logits, return_logits)
    return output, partial(loss_func, batch["loss_mask"], per_sequence=per_sequence)


def _collect_logits(store: list, output_tensor):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    store.append(gather_from_tensor_model_parallel_region(output_tensor).detach())
    zero = output_tensor.sum() * 0
    return zero, torch.tensor(1, dtype=torch.int), {}


def run_forward_backward(model_chunks: List[torch.nn.Module], batches: Iterable[dict], *, seq_length: int,
                         micro_batch_size: int, num_microbatches: int, forward_only: bool = False,
                         step=forward_step):
    """One pass of megatron's pipeline schedule over ``num_microbatches`` batches.

    ``step`` is the forward step (this module's for language modelling; ``dpo.DPOStep`` for DPO).
    Returns the list of per-micro-batch loss reports (non-empty on the last pipeline stage).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(batches)
    iterators = [iter(batches) for _ in model_chunks] if len(model_chunks) > 1 else iter(batches)
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iterators, model=model_chunks if len(model_chunks) > 1
        else model_chunks[0], num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)


def collect_logits(model_chunks: List[torch.nn.Module], batches: Iterable[dict], *, seq_length: int,
                   micro_batch_size: int) -> List[torch.Tensor]:
    """Full-vocabulary logits [b, s, V] per batch (on the last pipeline stage; empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(batches)
    store: list = []
    step = partial(forward_step, return_logits=store)
    iterators = [iter(batches) for _ in model_chunks] if len(model_chunks) > 1 else iter(batches)
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iterators,
            model=model_chunks if len(model_chunks) > 1 else model_chunks[0], num_microbatches=len(batches),
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True)
    return store
