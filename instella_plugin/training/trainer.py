"""The parts of a training run that any outer loop can drive, built from megatron-core parts only.

``Trainer(run, plugin)`` builds: distributed state, the model (through the plugin), megatron's DDP,
the (distributed) optimizer and ``OptimizerParamScheduler``, loads ``--load`` / ``--pretrained-checkpoint``
and makes the plugin's forward step (the objective). Then:

- ``batches(dataset, consumed)``: this data-parallel rank's micro-batches of one global batch;
- ``train_step(batches) -> metrics``: RoPE hook, forward-backward over the micro-batches (megatron's
  pipeline schedules), optimizer and scheduler step;
- ``evaluate(dataset) -> loss``; ``save()`` / ``load(path)``.

``loop.pretrain`` sequences them for pre-training and fine-tuning; another outer loop (RL rollouts,
evaluation) calls the same parts. Nothing here writes to the run configuration.
"""
import math
from typing import List, Optional

import torch
from megatron.core import parallel_state as ps

from instella_plugin.training import checkpointing
from instella_plugin.training.collectives import all_reduce_host, broadcast_host
from instella_plugin.training.datasets import microbatches
from instella_plugin.training.forward_step import run_forward_backward
from instella_plugin.training.model_setup import describe, wrap_ddp
from instella_plugin.training.setup import (
    build_optimizer_and_scheduler,
    initialize_distributed,
    resolve_load,
    transformer_config,
)


def reduce_loss(reports, group) -> torch.Tensor:
    """[loss sum, token count] of this step over micro-batches and the data-parallel group."""
    total = torch.zeros(2, dtype=torch.float64)
    for r in reports:
        total += r["lm loss"].double().cpu()
    return all_reduce_host(total, group=group)


class Trainer:
    def __init__(self, run, plugin):
        self.run, self.plugin = run, plugin
        self.device = initialize_distributed(run)
        load_path, starts_new_run = resolve_load(run, plugin)  # errors on a bad --load before building
        self.resumed_own_run = bool(load_path) and not starts_new_run
        plugin.check_start(run, self.resumed_own_run)
        self.transformer_config = transformer_config(run, plugin, self.device)
        chunks = plugin.build_model(run, self.transformer_config)
        if torch.distributed.get_rank() == 0:
            print(describe(chunks, self.device.type), flush=True)
        if self.device.type != "cpu":
            chunks = [c.to(self.device) for c in chunks]
        flags = run.flags
        self.model = wrap_ddp(chunks, use_distributed_optimizer=flags.use_distributed_optimizer,
                              overlap_grad_reduce=flags.overlap_grad_reduce,
                              overlap_param_gather=flags.overlap_param_gather)
        self.optimizer, self.scheduler = build_optimizer_and_scheduler(run, self.model)
        self.iteration = self.consumed = 0
        self.checkpoint_iteration: Optional[int] = None  # the iteration last saved or loaded
        if load_path:
            self.load(load_path, new_run=starts_new_run)
        self.forward_step = plugin.forward_step(run, self.transformer_config, self.model,
                                                resumed_own_run=self.resumed_own_run, device=self.device)
        self.theta = None
        self.dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)

    # ---- data ---------------------------------------------------------------------------------
    def batches(self, dataset, consumed: int) -> List[dict]:
        """This DP rank's micro-batches of the global batch starting at sample ``consumed``, after the
        plugin's batch hook."""
        layout = self.run.layout
        return [self.plugin.batch_hook(self.run, b) for b in microbatches(
            dataset, consumed, global_batch=layout.global_batch_size, micro_batch=layout.micro_batch_size,
            dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(), device=self.device)]

    # ---- one optimizer step ----------------------------------------------------------------------
    def apply_rope(self) -> None:
        theta = self.plugin.rope_theta(self.run, self.iteration)
        if theta is not None and theta != self.theta:
            self.plugin.apply_rope_theta(self.model, theta)
            self.theta = theta

    def train_step(self, batches: List[dict]) -> dict:
        """One optimizer step over ``batches`` (this rank's micro-batches of one global batch).

        Returns ``{"iteration", "loss" (None off the last pipeline stage), "grad_norm", "lr", "theta"}``.
        """
        self.apply_rope()
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = run_forward_backward(self.model, batches, seq_length=self.run.model.seq_length,
                                       micro_batch_size=self.run.layout.micro_batch_size,
                                       num_microbatches=len(batches), step=self.forward_step)
        total = reduce_loss(reports, self.dp_cp_group)
        loss = float(total[0] / total[1]) if reports else None
        self._check_finite("loss", loss)
        _, grad_norm, _ = self.optimizer.step()
        self._check_finite("gradient norm", grad_norm)
        gbs = self.run.layout.global_batch_size
        self.scheduler.step(increment=gbs)
        self.iteration += 1
        self.consumed += gbs
        return {"iteration": self.iteration, "loss": loss, "grad_norm": grad_norm,
                "lr": self.optimizer.param_groups[0]["lr"], "theta": self.theta}

    def _check_finite(self, what: str, value) -> None:
        if value is not None and not math.isfinite(value):
            raise FloatingPointError(f"{what} is {value} at iteration {self.iteration + 1} on rank "
                                     f"{torch.distributed.get_rank()}; stopping (last checkpoint: "
                                     f"{self.checkpoint_iteration})")

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate(self, dataset, consumed: int = 0) -> float:
        """Mean loss over ``--eval-iters`` global batches of ``dataset`` from sample ``consumed``."""
        for m in self.model:
            m.eval()
        total = torch.zeros(2, dtype=torch.float64)
        gbs = self.run.layout.global_batch_size
        for k in range(self.run.flags.eval_iters):
            batches = self.batches(dataset, consumed + k * gbs)
            with torch.no_grad():
                reports = run_forward_backward(self.model, batches, seq_length=self.run.model.seq_length,
                                               micro_batch_size=self.run.layout.micro_batch_size,
                                               num_microbatches=len(batches), forward_only=True,
                                               step=self.forward_step)
            total += reduce_loss(reports, self.dp_cp_group)
        for m in self.model:
            m.train()
        loss = torch.tensor([total[0] / max(total[1], 1)], dtype=torch.float64)
        if torch.distributed.is_initialized():  # the last pipeline stage has it; share with every rank
            loss = broadcast_host(loss, src=torch.distributed.get_world_size() - 1)
        return float(loss.item())

    # ---- checkpoints -------------------------------------------------------------------------------
    def save(self, save_dir: Optional[str] = None) -> None:
        """A checkpoint of the current iteration in ``save_dir`` (default ``--save``), published atomically."""
        save_dir = save_dir or self.run.flags.save
        checkpointing.save_checkpoint(
            save_dir, self.iteration, self.model, self.run.model, optimizer=self.optimizer,
            scheduler=self.scheduler, consumed_samples=self.consumed,
            extra_meta=dict(self.plugin.checkpoint_meta(self.run, self.iteration), args=_plain(self.run.flags)))
        self.checkpoint_iteration = self.iteration
        if torch.distributed.get_rank() == 0:
            print(f"saved checkpoint at iteration {self.iteration} to {save_dir}", flush=True)

    def load(self, path: str, new_run: bool = False) -> None:
        """Load a checkpoint. ``new_run``: it starts this run from another one (the recipe's
        ``--finetune`` keeps weights only, ``--reset-iteration`` restarts the schedule)."""
        flags = self.run.flags
        finetune = new_run and flags.finetune
        reset = finetune or (new_run and flags.reset_iteration)
        meta = checkpointing.load_checkpoint(
            path, self.model, optimizer=None if (finetune or flags.no_load_optim) else self.optimizer,
            scheduler=None if reset else self.scheduler, load_rng=not (reset or flags.no_load_rng), new_run=reset)
        if not reset:
            self.iteration, self.consumed = meta["iteration"], meta["consumed_samples"]
        else:  # the optimizer's LR/WD come from the fresh scheduler, not from the loaded param groups
            self.scheduler.step(0)
        self.checkpoint_iteration = self.iteration
        if torch.distributed.get_rank() == 0:
            how = ("weights only, " if finetune else "") + (
                "starting at iteration 0" if reset else f"resuming at iteration {self.iteration}")
            print(f"loaded checkpoint {path} (iteration {meta['iteration']}); {how}", flush=True)


def _plain(flags) -> dict:
    """The flags as JSON-friendly values, for checkpoint metadata."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flags.as_dict().items()
            if isinstance(v, (int, float, str, bool, tuple, type(None)))}
