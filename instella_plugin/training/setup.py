"""Set-up steps of a run: distributed init (NCCL/RCCL on GPUs, gloo + CPU mode otherwise), seeds,
the TransformerConfig, the megatron optimizer and LR scheduler, and the ``--load`` decision."""
import logging
import os

import torch
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import (
    init_num_microbatches_calculator,
    reconfigure_num_microbatches_calculator,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from instella_plugin import cpu_mode
from instella_plugin.megatron_fixes import fix_distributed_optimizer_step_on_load
from instella_plugin import checkpoint_check
from instella_plugin.training import checkpointing

log = logging.getLogger(__name__)


def initialize_distributed(run) -> torch.device:
    """Process group, megatron parallel state and seeds; returns the device the model lives on."""
    flags, layout = run.flags, run.layout
    use_cpu = flags.device == "cpu" or (flags.device == "auto" and not cpu_mode.gpu_available())
    if use_cpu:
        cpu_mode.enable(force=flags.device == "cpu")
        device = torch.device("cpu")
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend="gloo" if use_cpu else "nccl", rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.virtual_pipeline_size, context_parallel_size=layout.cp)
    seed = flags.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    try:
        init_num_microbatches_calculator(torch.distributed.get_rank(), None, layout.global_batch_size,
                                         layout.micro_batch_size, parallel_state.get_data_parallel_world_size())
    except AssertionError:  # a second run in this process (an outer loop building another trainer)
        reconfigure_num_microbatches_calculator(torch.distributed.get_rank(), None, layout.global_batch_size,
                                                layout.micro_batch_size,
                                                parallel_state.get_data_parallel_world_size())
    if use_cpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return device


def transformer_config(run, plugin, device: torch.device):
    """megatron's TransformerConfig for this run: the model config at the run's layout, plus the plugin's
    overrides."""
    flags, layout = run.flags, run.layout
    return run.model.transformer_config(
        tensor_parallel=layout.tp, pipeline_parallel=layout.pp, virtual_pipeline=layout.virtual_pipeline_size,
        context_parallel=layout.cp, sequence_parallel=flags.sequence_parallel,
        params_dtype=torch.bfloat16 if flags.bf16 else torch.float32, cpu=device.type == "cpu",
        recompute_granularity=flags.recompute_granularity, recompute_method=flags.recompute_method,
        recompute_num_layers=flags.recompute_num_layers, **plugin.transformer_config_overrides(run))


def build_optimizer_and_scheduler(run, model):
    flags, gbs = run.flags, run.layout.global_batch_size
    config = OptimizerConfig(
        optimizer="adam", lr=flags.lr, min_lr=flags.min_lr, weight_decay=flags.weight_decay,
        adam_beta1=flags.adam_beta1, adam_beta2=flags.adam_beta2, adam_eps=flags.adam_eps,
        clip_grad=flags.clip_grad, bf16=flags.bf16, params_dtype=torch.bfloat16 if flags.bf16 else torch.float32,
        use_distributed_optimizer=flags.use_distributed_optimizer, overlap_param_gather=flags.overlap_param_gather)
    # None: megatron's standard overrides (no decay on biases and 1-D params); {}: decay everything.
    optimizer = get_megatron_optimizer(config, model, config_overrides=None if flags.wd_exempt_1d else {})
    if flags.use_distributed_optimizer:
        fix_distributed_optimizer_step_on_load()
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=flags.lr_warmup_init, max_lr=flags.lr, min_lr=flags.min_lr,
        lr_warmup_steps=flags.lr_warmup_iters * gbs, lr_decay_steps=flags.lr_decay_iters * gbs,
        lr_decay_style=flags.lr_decay_style, start_wd=flags.weight_decay, end_wd=flags.weight_decay,
        wd_incr_steps=flags.train_iters * gbs, wd_incr_style="constant")
    return optimizer, scheduler


def resolve_load(run, plugin):
    """(checkpoint to load or None, whether it starts a new run) -- errors on a bad path before building.

    ``--load`` equal to ``--save`` is the auto-resume idiom of batch jobs: an empty directory starts
    from scratch (or from ``--pretrained-checkpoint``), a checkpoint there is resumed as it is. The
    recipe's start semantics (``--finetune``: weights only; ``--reset-iteration``: weights and
    optimizer, schedule restarted) apply only when a run *starts* from another checkpoint: from
    ``--pretrained-checkpoint``, or from a ``--load`` that is not this run's ``--save``.
    """
    flags = run.flags
    own = bool(flags.load and flags.save and os.path.abspath(flags.load) == os.path.abspath(flags.save))
    if flags.load and not (own and (not os.path.isdir(flags.load) or _empty(flags.load))):
        return _checked(run, plugin, flags.load, "--load"), not own
    if flags.pretrained_checkpoint:
        return _checked(run, plugin, flags.pretrained_checkpoint, "--pretrained-checkpoint"), True
    if own and torch.distributed.get_rank() == 0:
        print(f"--load {flags.load} holds no checkpoint yet: starting from scratch", flush=True)
    return None, False


def _empty(save_dir: str) -> bool:
    try:
        return checkpointing.latest_iteration(save_dir) is None
    except checkpointing.CheckpointError as e:
        raise SystemExit(f"error: --load {save_dir}: {e}")


def _checked(run, plugin, path, flag):
    try:
        path = checkpointing.resolve_checkpoint_dir(path)
        checkpoint_check.check_readable(path, flag)
        meta = checkpointing.read_meta(path)
    except (checkpointing.CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: {flag} {path}: {e}")
    plugin.check_resume(run, meta)
    return path
