"""Datasets for the loop: megatron's blended GPT datasets (or mock data), SFT stores, and batching.

Every dataset returns dict samples (``tokens``, ``labels``, ``loss_mask``, ``position_ids``). Batches
follow Megatron-LM's pretraining sampler: global batch ``k`` holds samples
``[k*G, (k+1)*G)``; micro-batch ``j`` of data-parallel rank ``d`` is the slice starting at
``k*G + (j*DP + d)*m``. So the data a step sees depends only on the consumed-sample count (exact
resume) and DP=2 sees the same global batch as DP=1.
"""
from typing import List, Optional

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from instella_plugin.data.tokenizer import DatasetTokenizerInfo


def dataset_sizes(run) -> List[int]:
    """[train, valid, test] sample counts. Every evaluation reads the same first ``eval_iters`` global
    batches of the validation split, so its size (and its shuffle) does not depend on the run length:
    an in-run eval and a later ``--skip-train`` eval of the same weights see the same samples."""
    flags, gbs = run.flags, run.layout.global_batch_size
    evaluates = bool(flags.eval_interval or flags.skip_train)
    eval_samples = flags.eval_iters * gbs if evaluates else 0
    return [flags.train_iters * gbs, eval_samples, eval_samples]


def _as_lists(blend):
    return (list(blend[0]), list(blend[1]) if blend[1] is not None else None) if blend else None


def build_gpt_datasets(run, num_samples):
    """megatron's blended GPT datasets (or mock data) for the run's data plan."""
    data = run.data
    config = GPTDatasetConfig(
        random_seed=run.flags.seed, sequence_length=run.model.seq_length, blend=_as_lists(data.blend),
        blend_per_split=[_as_lists(b) for b in data.blend_per_split] if data.blend_per_split else None,
        split=run.flags.split if data.blend else None, path_to_cache=run.flags.data_cache_path,
        tokenizer=DatasetTokenizerInfo(vocab_size=run.model.vocab_size), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        mid_level_dataset_surplus=0.05)
    cls = MockGPTDataset if data.mock else GPTDataset
    sizes = [n if n > 0 else None for n in num_samples]
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()


class WeightedSamples:
    """Deterministic weighted interleaving of map-style datasets (megatron's blending helper)."""

    def __init__(self, datasets: list, weights: Optional[List[float]], size: int):
        # imported here: under upstream Megatron-LM this compiled module exists only once its
        # compile_helpers ran, after this package is imported
        from megatron.core.datasets import helpers

        weights = np.asarray(weights or [len(d) for d in datasets], dtype=np.float64)
        weights = weights / weights.sum()
        self.datasets = datasets
        self.dataset_index = np.zeros(size, dtype=np.int16)
        self.sample_index = np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(self.dataset_index, self.sample_index, weights, len(datasets), size, False)

    def __len__(self):
        return len(self.dataset_index)

    def __getitem__(self, i):
        d = self.datasets[self.dataset_index[i]]
        return d[int(self.sample_index[i]) % len(d)]


def to_torch_batch(samples: List[dict]) -> dict:
    """Stack samples' ``tokens``, ``labels``, ``position_ids`` (long) and ``loss_mask`` (float32); a
    preference pair's carry them twice, prefixed ``chosen_`` and ``rejected_``; packed SFT samples'
    ``segment_ids`` too."""
    batch = {}
    for prefix in ("", "chosen_", "rejected_"):
        if prefix + "tokens" not in samples[0]:
            continue
        for key in ("tokens", "labels", "position_ids"):
            batch[prefix + key] = torch.stack([torch.as_tensor(np.asarray(s[prefix + key]), dtype=torch.long)
                                               for s in samples])
        batch[prefix + "loss_mask"] = torch.stack([torch.as_tensor(np.asarray(s[prefix + "loss_mask"]),
                                                                   dtype=torch.float32) for s in samples])
    if "segment_ids" in samples[0]:  # packed chats: the plugin's batch hook makes document boundaries
        batch["segment_ids"] = torch.stack([torch.as_tensor(np.asarray(s["segment_ids"]), dtype=torch.long)
                                            for s in samples])
    return batch


def microbatches(dataset, consumed: int, *, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 device) -> List[dict]:
    """This DP rank's micro-batches of the global batch that starts at sample ``consumed``."""
    if dataset is None:
        raise SystemExit("error: no dataset for this split")
    num_micro = global_batch // (micro_batch * dp_size)
    out = []
    for j in range(num_micro):
        start = consumed + (j * dp_size + dp_rank) * micro_batch
        idx = [(start + i) % len(dataset) for i in range(micro_batch)]
        batch = to_torch_batch([dataset[i] for i in idx])
        out.append({k: v.to(device) for k, v in batch.items()})
    return out
