"""A Megatron checkpoint, or a live model, as an evaluation backend (megatron-core inference).

``MegatronBackend(path, tp, pp)`` reads the checkpoint's record first (a bad path or layout fails
before anything heavy), sets up the process group for ``torchrun``'s ranks as TP x PP x DP (DP =
world / (TP x PP); gloo and the CPU mode without a GPU), then loads the weights at that layout with
the generation engine's loader. ``LiveBackend`` wraps a model that is already built (the trainer's,
weights shared, no copy). Scoring and generation are the engine's ``loglikelihood`` and
``generate``; the ranks of one model-parallel group run the same batches, the data-parallel ranks
split them (``backend.run_sharded``).
"""
import os

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from instella_plugin import cpu_mode
from instella_plugin.inference.engine import MegatronGenerator
from instella_plugin.inference.loading import DTYPES, check_tokenizer, checkpoint_plan, load_generator


def init_parallel(tp: int, pp: int, seed: int = 1234) -> torch.device:
    """Process group and parallel state for TP x PP x DP ranks (DP from the world size)."""
    use_cpu = not cpu_mode.gpu_available()
    if use_cpu:
        cpu_mode.enable()
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        raise ValueError(f"{world} processes do not split into --tensor-model-parallel-size {tp} x "
                         f"--pipeline-model-parallel-size {pp} x data-parallel ranks; launch a multiple of {tp * pp}")
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29513")
        torch.distributed.init_process_group("gloo" if use_cpu else "nccl",
                                             rank=int(os.environ.get("RANK", "0")), world_size=world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return device


class LiveBackend:
    """A backend on a ``MegatronGenerator`` (a loaded checkpoint or the trainer's live model)."""

    def __init__(self, generator: MegatronGenerator, batch_size: int = 8, description: dict = None):
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.max_length = generator.max_sequence_length
        self.batch_size = batch_size
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self._group = parallel_state.get_data_parallel_group()
        self.description = {"backend": "megatron", **(description or {}),
                            "tp": parallel_state.get_tensor_model_parallel_world_size(),
                            "pp": parallel_state.get_pipeline_model_parallel_world_size(), "dp": self.dp_size}

    @classmethod
    def from_model(cls, model_chunks, tokenizer, max_length: int, batch_size: int = 8):
        return cls(MegatronGenerator(model_chunks, tokenizer, max_sequence_length=max_length,
                                     max_batch_size=batch_size), batch_size, {"live": True})

    def loglikelihood(self, pairs):
        return self.generator.loglikelihood(pairs)

    def generate(self, prompts, params):
        return self.generator.generate(prompts, params)

    def gather(self, obj) -> list:
        if self.dp_size == 1:
            return [obj]
        out = [None] * self.dp_size
        torch.distributed.all_gather_object(out, obj, group=self._group)
        return out


class MegatronBackend(LiveBackend):
    def __init__(self, path: str, tp: int = 1, pp: int = 1, dtype: str = "float32", batch_size: int = 8):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        plan = checkpoint_plan(path, tp, pp)
        device = init_parallel(tp, pp)
        generator = load_generator(plan, dtype=DTYPES[dtype], device=device, max_batch_size=batch_size)
        check_tokenizer(plan, generator.tokenizer)
        super().__init__(generator, batch_size, {"path": os.path.abspath(path), "iteration": plan.iteration,
                                                 "dtype": dtype, "spec": plan.spec})
