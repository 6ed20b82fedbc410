"""The training loop, built from megatron-core parts only.

Parallel state, DDP, the distributed optimizer, pipeline schedules (plain and interleaved), dist
checkpointing, ``OptimizerParamScheduler`` and blended GPT datasets all come from megatron-core; this
file sequences them: set up, load, then per iteration (RoPE hook, forward-backward over the
micro-batches, optimizer step, scheduler, logging, eval, save, exit checks).
"""
import logging
import math
import time

import torch

from instella_plugin.training import checkpointing
from instella_plugin.training.datasets import dataset_sizes, microbatches
from instella_plugin.training.forward_step import forward_step, run_forward_backward
from instella_plugin.training.model_setup import describe, wrap_ddp
from instella_plugin.training.progress import Progress
from instella_plugin.training.setup import (
    build_optimizer_and_scheduler,
    initialize_distributed,
    resolve_load,
)
from instella_plugin.training.signals import ExitSignalHandler

log = logging.getLogger(__name__)


def _reduce_loss(reports, group) -> torch.Tensor:
    """[loss sum, token count] of this step over micro-batches and the data-parallel group."""
    total = torch.zeros(2, dtype=torch.float64)
    for r in reports:
        total += r["lm loss"].double().cpu()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, group=group)
    return total


def evaluate(model, dataset, args, cfg, plugin, consumed: int, dp_rank: int, dp_size: int, device,
             step=forward_step) -> float:
    from megatron.core import parallel_state as ps

    for m in model:
        m.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for k in range(args.eval_iters):
        batches = [plugin.batch_hook(args, b) for b in microbatches(
            dataset, consumed + k * args.global_batch_size, global_batch=args.global_batch_size,
            micro_batch=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, device=device)]
        with torch.no_grad():
            reports = run_forward_backward(model, batches, seq_length=cfg.seq_length,
                                           micro_batch_size=args.micro_batch_size,
                                           num_microbatches=len(batches), forward_only=True,
                                           step=step)
        total += _reduce_loss(reports, ps.get_data_parallel_group(with_context_parallel=True))
    for m in model:
        m.train()
    loss = torch.tensor([total[0] / max(total[1], 1)], dtype=torch.float64)
    if torch.distributed.is_initialized():  # the last pipeline stage has it; share with every rank
        torch.distributed.broadcast(loss, src=torch.distributed.get_world_size() - 1)
    return float(loss.item())


def pretrain(args, plugin) -> dict:
    """Train as the arguments say; return a summary (final iteration, losses seen on this rank)."""
    device = initialize_distributed(args)
    from megatron.core import parallel_state as ps

    cfg = plugin.model_config(args)
    cfg.validate(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                 args.virtual_pipeline_size, args.context_parallel_size)
    load_path, starts_new_run = resolve_load(args, plugin)  # errors on a bad --load before building
    resumed_own_run = bool(load_path) and not starts_new_run
    plugin.check_start(args, resumed_own_run)
    tcfg = cfg.transformer_config(
        tensor_parallel=args.tensor_model_parallel_size, pipeline_parallel=args.pipeline_model_parallel_size,
        virtual_pipeline=args.virtual_pipeline_size, context_parallel=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        cpu=device.type == "cpu",
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        **plugin.transformer_config_overrides(args))
    chunks = plugin.build_model(args, cfg, tcfg)
    if torch.distributed.get_rank() == 0:
        print(describe(chunks, device.type), flush=True)
    if device.type != "cpu":
        chunks = [c.to(device) for c in chunks]
    model = wrap_ddp(chunks, use_distributed_optimizer=args.use_distributed_optimizer,
                     overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather)
    optimizer, scheduler = build_optimizer_and_scheduler(args, model)

    iteration, consumed = 0, 0
    if load_path:
        finetune = starts_new_run and args.finetune
        reset = finetune or (starts_new_run and args.reset_iteration)
        meta = checkpointing.load_checkpoint(
            load_path, model, optimizer=None if (finetune or args.no_load_optim) else optimizer,
            scheduler=None if reset else scheduler, load_rng=not (reset or args.no_load_rng), new_run=reset)
        if not reset:
            iteration, consumed = meta["iteration"], meta["consumed_samples"]
        else:  # the optimizer's LR/WD come from the fresh scheduler, not from the loaded param groups
            scheduler.step(0)
        if torch.distributed.get_rank() == 0:
            how = ("weights only, " if finetune else "") + (
                "starting at iteration 0" if reset else f"resuming at iteration {iteration}")
            print(f"loaded checkpoint {load_path} (iteration {meta['iteration']}); {how}", flush=True)

    step = plugin.forward_step(args, cfg, tcfg, model, resumed_own_run=resumed_own_run, device=device)

    dp_rank = ps.get_data_parallel_rank()
    dp_size = ps.get_data_parallel_world_size()
    train_ds, valid_ds, _ = plugin.build_datasets(args, cfg, dataset_sizes(args))
    is_reporting = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    progress = Progress(args, cfg, iteration, is_reporting, getattr(step, "sequences_per_sample", 1))
    handler = ExitSignalHandler() if args.exit_signal_handler else None
    start_time = time.time()
    losses, theta = {}, None
    dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)

    def save(it):
        if args.save:
            checkpointing.save_checkpoint(
                args.save, it, model, cfg, optimizer=optimizer, scheduler=scheduler, consumed_samples=consumed,
                extra_meta=dict(plugin.checkpoint_meta(args, it), args=_plain_args(args)))
            if torch.distributed.get_rank() == 0:
                print(f"saved checkpoint at iteration {it} to {args.save}", flush=True)

    exit_reason = None
    saved_at = iteration if load_path else None

    def final_eval():
        if valid_ds is not None and args.eval_iters and (args.eval_interval or args.skip_train):
            progress.eval(iteration, evaluate(model, valid_ds, args, cfg, plugin, 0, dp_rank, dp_size, device, step))

    if args.skip_train:
        final_eval()
        progress.finish()
        return {"iteration": iteration, "losses": losses}
    while iteration < args.train_iters:
        new_theta = plugin.rope_theta(args, iteration)
        if new_theta is not None and new_theta != theta:
            plugin.apply_rope_theta(model, new_theta)
            theta = new_theta
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        batches = [plugin.batch_hook(args, b) for b in microbatches(
            train_ds, consumed, global_batch=args.global_batch_size, micro_batch=args.micro_batch_size,
            dp_rank=dp_rank, dp_size=dp_size, device=device)]
        reports = run_forward_backward(model, batches, seq_length=cfg.seq_length,
                                       micro_batch_size=args.micro_batch_size, num_microbatches=len(batches),
                                       step=step)
        total = _reduce_loss(reports, dp_cp_group)
        loss = float(total[0] / total[1]) if reports else None
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at iteration {iteration + 1} on rank "
                                     f"{torch.distributed.get_rank()}; stopping (last checkpoint: {saved_at})")
        ok, grad_norm, _ = optimizer.step()
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise FloatingPointError(f"gradient norm is {grad_norm} at iteration {iteration + 1} on rank "
                                     f"{torch.distributed.get_rank()}; stopping (last checkpoint: {saved_at})")
        scheduler.step(increment=args.global_batch_size)
        iteration += 1
        consumed += args.global_batch_size
        if loss is not None:
            losses[iteration] = loss
        progress.step(iteration, loss, optimizer.param_groups[0]["lr"], grad_norm, theta)

        if args.eval_interval and iteration % args.eval_interval == 0:
            final_eval()
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save(iteration)
            saved_at = iteration
        exit_reason = _exit_reason(args, iteration, start_time, handler)
        if exit_reason:
            break

    if args.eval_interval and iteration % args.eval_interval:
        final_eval()  # the end of a run (or an early exit) is always evaluated
    if args.save and saved_at != iteration:
        save(iteration)
    if is_reporting and exit_reason:
        print(f"exiting at iteration {iteration}: {exit_reason}", flush=True)
    progress.finish()
    return {"iteration": iteration, "losses": losses}


def _exit_reason(args, iteration, start_time, handler):
    if args.exit_interval and iteration % args.exit_interval == 0:
        return f"--exit-interval {args.exit_interval}"
    flags = torch.zeros(2)
    if args.exit_duration_in_mins and (time.time() - start_time) / 60 > args.exit_duration_in_mins:
        flags[0] = 1
    if handler is not None and handler.signals_received():
        flags[1] = 1
    if torch.distributed.is_initialized() and (args.exit_duration_in_mins or handler is not None):
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    if flags[0]:
        return f"--exit-duration-in-mins {args.exit_duration_in_mins}"
    if flags[1]:
        return "exit signal received"
    return None


def _plain_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
