"""The parallel layout: TP x PP x CP x DP over the ranks, and the batch arithmetic, checked in one place.

``DP = world / (TP x PP x CP)`` and ``global batch = micro-batch x DP x accumulation steps``. The
trainer, ``instella submit`` and the examples' shell helper (through ``instella layout check``) all
use ``ParallelLayout``; what the model itself needs of a layout (heads divisible by TP, layers by the
pipeline stages) is ``InstellaConfig.validate``.
"""
import argparse
import sys
from dataclasses import dataclass
from typing import Optional


class LayoutError(ValueError):
    """A layout that cannot run; the message says how to fix it."""


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    micro_batch_size: Optional[int] = None
    global_batch_size: Optional[int] = None
    gpus_per_node: Optional[int] = None  # set by launchers: TP and CP groups must stay inside a node
    layers_per_virtual_stage: Optional[int] = None
    num_layers: Optional[int] = None

    @property
    def nodes(self) -> Optional[int]:
        return self.world_size // self.gpus_per_node if self.gpus_per_node else None

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def num_microbatches(self) -> Optional[int]:
        """Gradient-accumulation steps per optimizer step on each DP rank."""
        if self.micro_batch_size and self.global_batch_size:
            return self.global_batch_size // (self.micro_batch_size * self.dp)
        return None

    accumulation = num_microbatches

    @property
    def virtual_pipeline_size(self) -> Optional[int]:
        if not self.layers_per_virtual_stage:
            return None
        return self.num_layers // self.pp // self.layers_per_virtual_stage

    def describe(self) -> str:
        ranks = (f"{self.nodes} node(s) x {self.gpus_per_node} = {self.world_size} ranks" if self.gpus_per_node
                 else f"{self.world_size} rank(s)")
        text = f"{ranks} = TP {self.tp} x PP {self.pp} x CP {self.cp} x DP {self.dp}"
        if self.num_microbatches:
            text += (f"; global batch {self.global_batch_size} = micro {self.micro_batch_size} x DP {self.dp}"
                     f" x {self.num_microbatches} accumulation step(s)")
        return text

    def check(self) -> "ParallelLayout":
        """Raise ``LayoutError`` when the layout cannot run; return it otherwise."""
        for name in ("world_size", "tp", "pp", "cp", "micro_batch_size", "global_batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise LayoutError(f"{name} must be a positive integer, got {v!r}")
        model = self.tp * self.pp * self.cp
        if self.world_size % model:
            ranks = (f"nodes x gpus_per_node = {self.nodes} x {self.gpus_per_node} = {self.world_size}"
                     if self.gpus_per_node else f"world size {self.world_size}")
            raise LayoutError(
                f"{ranks} is not divisible by TP x PP x CP = {self.tp} x {self.pp} x {self.cp} = {model}; change "
                "the number of ranks or the parallel sizes so that the ranks split into whole model replicas")
        if self.gpus_per_node and self.tp * self.cp > self.gpus_per_node:
            raise LayoutError(
                f"TP x CP = {self.tp} x {self.cp} = {self.tp * self.cp} is larger than the {self.gpus_per_node} GPUs "
                "of one node; tensor- and context-parallel groups must stay inside a node (xGMI/NVLink), so lower "
                "TP or CP and use PP or DP across nodes")
        if self.micro_batch_size and self.global_batch_size:
            step = self.micro_batch_size * self.dp
            if self.global_batch_size % step:
                raise LayoutError(
                    f"global batch {self.global_batch_size} is not divisible by micro-batch {self.micro_batch_size} "
                    f"x DP {self.dp} = {step} (--global-batch-size not divisible by --micro-batch-size "
                    f"{self.micro_batch_size} x data-parallel size {self.dp}; DP = {self.world_size} ranks / "
                    f"(TP {self.tp} x PP {self.pp} x CP {self.cp})); pick a global batch that is a multiple of {step}, "
                    "or change the micro-batch or the parallel sizes")
        if self.layers_per_virtual_stage:
            if self.pp < 2:
                raise LayoutError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
            per_stage = self.num_layers // self.pp
            if per_stage % self.layers_per_virtual_stage:
                raise LayoutError(f"{per_stage} layers per pipeline stage do not split into virtual stages of "
                                  f"{self.layers_per_virtual_stage}")
            if self.num_microbatches and self.num_microbatches % self.pp:
                raise LayoutError(f"the interleaved schedule needs the number of micro-batches "
                                  f"({self.num_microbatches}) to be a multiple of PP {self.pp}")
        return self


def main(argv=None) -> int:
    """``instella layout check WORLD TP PP CP MBS GBS``: prints ``DP ACC`` and a description line, or the
    error (exit 1)."""
    p = argparse.ArgumentParser(prog="instella layout", description="check a parallel layout; print DP and "
                                "the accumulation steps")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("check")
    for name in ("world", "tp", "pp", "cp", "micro_batch_size", "global_batch_size"):
        c.add_argument(name, type=int)
    c.add_argument("--gpus-per-node", type=int)
    a = p.parse_args(argv)
    layout = ParallelLayout(a.world, a.tp, a.pp, a.cp, a.micro_batch_size, a.global_batch_size, a.gpus_per_node)
    try:
        layout.check()
    except LayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(layout.dp, layout.num_microbatches)
    print(f"layout: {layout.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
