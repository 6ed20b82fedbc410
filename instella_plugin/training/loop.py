"""The pre-training loop: ``Trainer``'s parts in order, plus progress, evaluation, saves and exits.

Per iteration: the global batch from the training split, ``Trainer.train_step``, logging, then eval,
save and exit checks (``--eval-interval``, ``--save-interval``, ``--exit-interval``,
``--exit-duration-in-mins``, ``--exit-signal-handler``). The end of a run is always evaluated and saved.
"""
import time
from typing import Optional

import torch

from instella_plugin.training.collectives import all_reduce_host
from instella_plugin.training.datasets import dataset_sizes
from instella_plugin.training.progress import Progress
from instella_plugin.training.signals import ExitSignalHandler
from instella_plugin.training.trainer import Trainer


def pretrain(run, plugin) -> dict:
    """Train as the run config says; return a summary (final iteration, losses seen on this rank)."""
    flags = run.flags
    trainer = Trainer(run, plugin)
    train_ds, valid_ds, _ = plugin.build_datasets(run, dataset_sizes(run))
    is_reporting = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    progress = Progress(run, trainer.iteration, is_reporting,
                        getattr(trainer.forward_step, "sequences_per_sample", 1))
    handler = ExitSignalHandler() if flags.exit_signal_handler else None
    start_time = time.time()
    losses, exit_reason = {}, None

    def evaluate():
        loss = None
        if valid_ds is not None and flags.eval_iters and (flags.eval_interval or flags.skip_train):
            loss = trainer.evaluate(valid_ds)
        scores = plugin.downstream_eval(run, trainer.model, trainer.iteration)  # --eval-tasks, when given
        if loss is not None or scores:
            progress.eval(trainer.iteration, loss, scores)

    if flags.skip_train:
        evaluate()
        progress.finish()
        return {"iteration": trainer.iteration, "losses": losses}
    while trainer.iteration < flags.train_iters:
        m = trainer.train_step(trainer.batches(train_ds, trainer.consumed))
        it = m["iteration"]
        if m["loss"] is not None:
            losses[it] = m["loss"]
        progress.step(it, m["loss"], m["lr"], m["grad_norm"], m["theta"])
        if flags.eval_interval and it % flags.eval_interval == 0:
            evaluate()
        if flags.save and flags.save_interval and it % flags.save_interval == 0:
            trainer.save()
        exit_reason = stop_reason(flags, it, start_time, handler)
        if exit_reason:
            break

    if flags.eval_interval and trainer.iteration % flags.eval_interval:
        evaluate()  # the end of a run (or an early exit) is always evaluated
    if flags.save and trainer.checkpoint_iteration != trainer.iteration:
        trainer.save()
    if is_reporting and exit_reason:
        print(f"exiting at iteration {trainer.iteration}: {exit_reason}", flush=True)
    progress.finish()
    return {"iteration": trainer.iteration, "losses": losses}


def stop_reason(flags, step: int, start_time: float, handler) -> Optional[str]:
    """Why to stop after this step (``--exit-interval`` in the loop's own steps, ``--exit-duration-in-mins``,
    a signal under ``--exit-signal-handler``), agreed by every rank; None to go on. Outer loops (GRPO) use it too."""
    if flags.exit_interval and step % flags.exit_interval == 0:
        return f"--exit-interval {flags.exit_interval}"
    stop = torch.zeros(2)
    if flags.exit_duration_in_mins and (time.time() - start_time) / 60 > flags.exit_duration_in_mins:
        stop[0] = 1
    if handler is not None and handler.signals_received():
        stop[1] = 1
    if torch.distributed.is_initialized() and (flags.exit_duration_in_mins or handler is not None):
        stop = all_reduce_host(stop, op=torch.distributed.ReduceOp.MAX)
    if stop[0]:
        return f"--exit-duration-in-mins {flags.exit_duration_in_mins}"
    return "exit signal received" if stop[1] else None
