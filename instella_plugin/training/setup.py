"""Set-up steps of the loop: distributed init (NCCL/RCCL on GPUs, gloo + CPU mode otherwise), seeds,
the megatron optimizer and LR scheduler, and the ``--load`` decision."""
import logging
import os

import torch

from instella_plugin.training import checkpoint_check, checkpointing

log = logging.getLogger(__name__)


def initialize_distributed(args) -> torch.device:
    """Process group, megatron parallel state and seeds; returns the device the model lives on."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from instella_plugin import cpu_mode

    use_cpu = args.device == "cpu" or (args.device == "auto" and not cpu_mode.gpu_available())
    if use_cpu:
        cpu_mode.enable(force=args.device == "cpu")
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
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_size,
            context_parallel_size=args.context_parallel_size)
    seed = args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    init_num_microbatches_calculator(torch.distributed.get_rank(), None, args.global_batch_size,
                                     args.micro_batch_size, parallel_state.get_data_parallel_world_size())
    if use_cpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return device


def build_optimizer_and_scheduler(args, model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer, overlap_param_gather=args.overlap_param_gather)
    # None: megatron's standard overrides (no decay on biases and 1-D params); {}: decay everything.
    overrides = None if (args.wd_exempt_1d or not getattr(args, "decay_all_params", False)) else {}
    optimizer = get_megatron_optimizer(config, model, config_overrides=overrides)
    if args.use_distributed_optimizer:
        from instella_plugin.megatron_fixes import fix_distributed_optimizer_step_on_load

        fix_distributed_optimizer_step_on_load()
    gbs = args.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant")
    return optimizer, scheduler


def resolve_load(args, plugin):
    """(checkpoint to load or None, whether it starts a new run) -- errors on a bad path before building.

    ``--load`` equal to ``--save`` is the auto-resume idiom of batch jobs: an empty directory starts
    from scratch (or from ``--pretrained-checkpoint``), a checkpoint there is resumed as it is. The
    recipe's start semantics (``--finetune``: weights only; ``--reset-iteration``: weights and
    optimizer, schedule restarted) apply only when a run *starts* from another checkpoint: from
    ``--pretrained-checkpoint``, or from a ``--load`` that is not this run's ``--save``.
    """
    own = bool(args.load and args.save and os.path.abspath(args.load) == os.path.abspath(args.save))
    if args.load and not (own and (not os.path.isdir(args.load) or _empty(args.load))):
        return _checked(args, plugin, args.load, "--load"), not own
    if args.pretrained_checkpoint:
        return _checked(args, plugin, args.pretrained_checkpoint, "--pretrained-checkpoint"), True
    if own and torch.distributed.get_rank() == 0:
        print(f"--load {args.load} holds no checkpoint yet: starting from scratch", flush=True)
    return None, False


def _empty(save_dir: str) -> bool:
    try:
        return checkpointing.latest_iteration(save_dir) is None
    except checkpointing.CheckpointError as e:
        raise SystemExit(f"error: --load {save_dir}: {e}")


def _checked(args, plugin, path, flag):
    try:
        path = checkpointing.resolve_checkpoint_dir(path)
        checkpoint_check.check_readable(path, flag)
        meta = checkpointing.read_meta(path)
    except (checkpointing.CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: {flag} {path}: {e}")
    plugin.check_resume(args, meta)
    return path
