"""Build this rank's Instella model chunks (one per virtual pipeline stage) from a config and a named
layer spec (``specs.py``: a backend provider filling in Instella's layer layout)."""
from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)

from instella_plugin.model.config import InstellaConfig
from instella_plugin.model.fused_output_loss import FusedOutputLossGPTModel
from instella_plugin.model.init import initialize_model
from instella_plugin.model.specs import check_spec_name, get_spec


def build_gpt_chunks(cfg: InstellaConfig, transformer_config, spec_name: str = "instella",
                     init_seed: Optional[int] = 1234, fused_output_loss: bool = True) -> List[torch.nn.Module]:
    """megatron GPTModel chunks for this rank (after ``initialize_model_parallel``).

    ``init_seed=None`` leaves the weights uninitialised (a checkpoint will be loaded).
    ``fused_output_loss``: the labelled forward runs the chunked output layer + loss (fused_output_loss.py).
    """
    check_spec_name(spec_name)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = (FusedOutputLossGPTModel if fused_output_loss else GPTModel)(
            config=transformer_config,
            transformer_layer_spec=get_spec(spec_name, transformer_config, vp_stage=stage),
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=cfg.rotary_base,
            vp_stage=stage,
        )
        chunks.append(model)
    for chunk in chunks:
        mark_tensor_parallel_weights(chunk)
    if init_seed is not None:
        initialize_model(chunks, cfg, init_seed)
    return chunks


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Give megatron's parallel linears and embedding their tensor-parallel attributes.

    megatron-core sets ``tensor_model_parallel``/``partition_dim`` on these weights only inside its
    own initialisers, which ``perform_initialization=False`` skips (our init is layout-independent,
    see init.py). Without them the optimizer counts the TP-sharded weights as duplicates on every TP
    rank but 0, so the gradient norm, and with it clipping, would be wrong at TP > 1.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or getattr(weight, "tensor_model_parallel", False):
            continue
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            set_tensor_model_parallel_attributes(weight, True, 0, 1)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 1, 1)
