"""A generator from a Megatron checkpoint, at any TP/PP layout (it may differ from the saved one).

``checkpoint_plan`` reads only the checkpoint's record (``instella_meta.json``): the model
configuration, the RoPE theta it was last trained with and its RoPE method (``rope_scaling``: linear,
NTK, YaRN), its context length and tokenizer, and checks
the requested layout against the model, so a bad path or layout fails before anything heavy.
``load_generator`` builds this rank's model chunk through the layer spec the checkpoint names and
loads the weights with the trainer's ``load_model_weights`` (megatron dist checkpointing reshards the
global tensors to this layout). ``init_inference_parallel`` sets up the process group and megatron's
parallel state for a command-line run (gloo and the CPU mode without a GPU, NCCL with one).
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from instella_plugin import checkpoint_check, cpu_mode
from instella_plugin.checkpoint_layout import CheckpointError, read_meta, resolve_checkpoint_dir
from instella_plugin.data.tokenizer import load_tokenizer
from instella_plugin.inference.engine import MegatronGenerator
from instella_plugin.model.build import build_gpt_chunks
from instella_plugin.model.config import InstellaConfig
from instella_plugin.rope.apply import META_KEY, apply_rope_method
from instella_plugin.rope.methods import RopeScaling
from instella_plugin.training.checkpointing import load_model_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CheckpointPlan:
    """What the record of a checkpoint says, and the layout to load it at."""
    path: str                  # the iteration directory
    model: InstellaConfig      # with the RoPE theta the checkpoint was last trained with
    seq_length: int            # the context the model was trained for
    spec: str
    tokenizer: Optional[str]
    iteration: int
    tp: int = 1
    pp: int = 1
    rope_scaling: RopeScaling = RopeScaling()  # the context-extension method it was trained with


def checkpoint_plan(load: str, tp: int = 1, pp: int = 1) -> CheckpointPlan:
    """Read and check a checkpoint's record for loading at TP=``tp``, PP=``pp`` (no torch work)."""
    if not os.path.exists(load):
        raise FileNotFoundError(f"--load {load}: no such checkpoint directory; give a save directory (with "
                                "latest_checkpointed_iteration.txt) or one of its iter_N directories")
    try:
        path = resolve_checkpoint_dir(load)
        checkpoint_check.check_readable(path, "--load")
        meta = read_meta(path)
    except (CheckpointError, OSError, ValueError) as e:
        raise CheckpointError(f"--load {load}: {e}") from e
    if not meta.get("model"):
        raise CheckpointError(f"--load {load}: its record has no model configuration (written by an old "
                              "version?); re-save it with the trainer or convert it with `instella convert`")
    theta = float(meta.get(META_KEY, meta.get("rotary_base", meta["model"].get("rotary_base", 10000.0))))
    cfg = InstellaConfig.from_dict(meta["model"]).replace(rotary_base=theta)
    try:
        cfg.validate(tensor_parallel=tp, pipeline_parallel=pp)
    except ValueError as e:
        raise ValueError(f"--load {load} at --tensor-model-parallel-size {tp} --pipeline-model-parallel-size "
                         f"{pp}: {e}") from None
    try:
        scaling = RopeScaling.from_meta(meta.get("rope_scaling"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"--load {load}: its record's rope_scaling is not understood: {e}") from None
    return CheckpointPlan(path=path, model=cfg, seq_length=int(meta.get("seq_length", cfg.seq_length)),
                          spec=meta.get("spec", "instella"), tokenizer=meta.get("tokenizer"),
                          iteration=int(meta.get("iteration", 0)), tp=tp, pp=pp, rope_scaling=scaling)


def check_world(tp: int, pp: int, data_parallel: bool = False) -> int:
    """The data-parallel size of this launch (torchrun's WORLD_SIZE) for TP x PP; refuses a count that
    does not fit (any multiple of TP x PP with ``data_parallel``, else exactly TP x PP)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp) or (world != tp * pp and not data_parallel):
        need = f"a multiple of TP x PP = {tp * pp}" if data_parallel else f"exactly TP x PP = {tp * pp}"
        raise ValueError(f"{world} processes for --tensor-model-parallel-size {tp} x --pipeline-model-parallel-size "
                         f"{pp}: launch {need} (torchrun --nproc-per-node {tp * pp})")
    return world // (tp * pp)


def init_inference_parallel(tp: int = 1, pp: int = 1, device: str = "auto", seed: int = 1234,
                            data_parallel: bool = False) -> torch.device:
    """Process group (torchrun's environment, or one local process) and megatron's parallel state;
    with ``data_parallel`` the ranks beyond TP x PP form data-parallel replicas."""
    use_cpu = device == "cpu" or (device == "auto" and not cpu_mode.gpu_available())
    if use_cpu:
        cpu_mode.enable(force=device == "cpu")
        where = torch.device("cpu")
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    world = check_world(tp, pp, data_parallel) * tp * pp
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        torch.distributed.init_process_group(backend="gloo" if use_cpu else "nccl",
                                             rank=int(os.environ.get("RANK", "0")), world_size=world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return where


def build_model(plan: CheckpointPlan, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
    """This rank's model chunk, built at the current parallel state, with the checkpoint's weights and
    its RoPE method (frequencies and, for YaRN, the softmax scale, as the trainer ran it)."""
    scale = plan.rope_scaling.softmax_scale(plan.model.head_dim)
    tcfg = plan.model.transformer_config(
        tensor_parallel=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_parallel=parallel_state.get_pipeline_model_parallel_world_size(), params_dtype=dtype,
        **({} if scale is None else {"softmax_scale": scale}))
    chunks = build_gpt_chunks(plan.model, tcfg, spec_name=plan.spec, init_seed=None, fused_output_loss=False)
    if device is not None and device.type != "cpu":
        chunks = [c.to(device) for c in chunks]
    load_model_weights(plan.path, chunks)
    if plan.rope_scaling.scales:
        apply_rope_method(chunks, plan.rope_scaling, plan.model.rotary_base)
    return chunks[0]


def check_tokenizer(plan: CheckpointPlan, tokenizer) -> None:
    """Refuse a tokenizer with more ids than the checkpoint's model has rows (its prompts would not embed)."""
    if len(tokenizer) > plan.model.padded_vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids but the checkpoint's model only "
                         f"{plan.model.padded_vocab_size} embedding rows ({plan.model.preset}): give the tokenizer "
                         "it was trained with (--tokenizer)")


def load_generator(plan: CheckpointPlan, *, tokenizer=None, dtype: torch.dtype = torch.float32,
                   device: Optional[torch.device] = None, max_batch_size: int = 16,
                   chat: bool = False) -> MegatronGenerator:
    """A ``MegatronGenerator`` on the checkpoint (after ``init_inference_parallel`` or a trainer's set-up).

    ``tokenizer``: a loaded tokenizer, a name or path for ``load_tokenizer``, or None for the one the
    checkpoint records."""
    tok = load_tokenizer(tokenizer if tokenizer is not None else plan.tokenizer)
    model = build_model(plan, dtype, device)
    return MegatronGenerator(model, tok, max_sequence_length=plan.seq_length, max_batch_size=max_batch_size,
                             chat=chat)
