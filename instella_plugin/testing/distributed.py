"""Run a function on N CPU processes with gloo and megatron's parallel state: the multi-rank test helper.

``run_distributed(fn, world_size, tp=.., pp=.., ...)`` spawns ``world_size`` processes, each of which
initialises ``torch.distributed`` (gloo), the CPU mode and ``parallel_state``, calls ``fn(*args)``
and sends back its return value (tensors included). A failure on any rank is re-raised in the caller
with that rank's traceback. ``fn`` must be importable (defined at module level).
"""
import os
import socket
import tempfile
import traceback

from instella_plugin.megatron_import import import_megatron_core

import_megatron_core()  # each spawned rank re-imports this module first: it starts ~2.5 s sooner

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from instella_plugin import cpu_mode  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(tp=1, pp=1, vpp=None, cp=1, seed=1234):
    """Megatron parallel state + CPU mode + RNG seeds on an initialised gloo process group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    cpu_mode.enable_if_no_gpu()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _worker(rank, world_size, port, fn, args, parallel, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        init_parallel(**parallel)
        result = fn(*args)
        torch.save({"ok": True, "result": result}, result_path)
    except BaseException:  # noqa: BLE001  (reported to the parent)
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn, world_size: int, *args, tp=1, pp=1, vpp=None, cp=1, seed=1234, timeout=600):
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the list of per-rank results."""
    parallel = dict(tp=tp, pp=pp, vpp=vpp, cp=cp, seed=seed)
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, parallel, out_dir))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise TimeoutError(f"rank process {p.pid} did not finish within {timeout}s")
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r} exited (code {procs[r].exitcode}) without a result")
                continue
            out = torch.load(path, weights_only=False)
            if out["ok"]:
                results.append(out["result"])
            else:
                errors.append(f"rank {r} failed:\n{out['error']}")
        if errors:
            # A rank's own error first; "connection closed" errors are echoes of it on its peers.
            errors.sort(key=lambda e: "Connection closed" in e)
            raise RuntimeError("\n".join(errors))
        return results
