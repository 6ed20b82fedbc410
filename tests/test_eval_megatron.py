"""The Megatron backend: a converted checkpoint scores like the Hugging Face directory it came from,
at TP=2 and PP=2, and data-parallel ranks split the work without changing a single number (all in the slow tier).

The tiny model of ``test_eval_parity`` is converted with ``hf_to_megatron``; two gloo ranks load it
with the evaluation's Megatron backend (megatron-core inference) at TP=2 and must give the HF
backend's per-example log-likelihoods within 1e-4 and the same metrics (multiple choice, and greedy
generation). At TP=1 the two ranks are data-parallel: the result must equal, exactly, what one rank
computes alone (DP=1) on the same batches.
"""
import pytest

from instella_plugin.evaluation.hf_backend import HFBackend
from instella_plugin.evaluation.runner import evaluate
from instella_plugin.evaluation.task_config import load_task, task_from_dict
from instella_plugin.hf.convert import hf_to_megatron
from instella_plugin.testing.distributed import run_distributed

from test_eval_parity import write_task_data, write_tiny_model

pytestmark = pytest.mark.dist
LIMIT = 4


def _tasks():
    gen = task_from_dict({"name": "gen", "output": "generate", "dataset": {"path": "openai/gsm8k", "name": "main"},
                          "test_split": "test", "doc_to_text": "Q: {{question}}\nA:",
                          "doc_to_target": "{{ answer | after('####') | trim }}", "metrics": ["exact_match"],
                          "generation": {"max_new_tokens": 12, "until": ["Q:", "\n\n"]},
                          "answer": {"fallback": "text"}}, "test-gen")
    return [load_task("arc_challenge"), load_task("winogrande"), load_task("mmlu"), gen]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_eval")
    hf = write_tiny_model(root / "hf")
    hf_to_megatron(str(hf), str(root / "ckpt"))
    return hf, root / "ckpt", write_task_data(root / "data", n=8)


def _megatron_worker(ckpt, data_dir, tp, dp1_too, pp=1, hf_dir=None):
    from instella_plugin.evaluation.megatron_backend import MegatronBackend

    backend = MegatronBackend(str(ckpt), tp=tp, pp=pp, batch_size=3)
    out = {"dp": backend.dp_size, "result": evaluate(_tasks(), backend, str(data_dir), limit=LIMIT)}
    if dp1_too:   # the same model, one rank doing every batch: the DP=1 computation
        backend.dp_rank, backend.dp_size, backend.gather = 0, 1, lambda obj: [obj]
        out["dp1"] = evaluate(_tasks(), backend, str(data_dir), limit=LIMIT)
    if hf_dir is not None:   # the HF backend splits over the default process group the same way
        hf = HFBackend(str(hf_dir), batch_size=3)
        out["hf_dp"] = hf.dp_size
        out["hf_dp2"] = evaluate(_tasks(), hf, str(data_dir), limit=LIMIT)
        hf.dp_rank, hf.dp_size, hf.gather = 0, 1, lambda obj: [obj]
        out["hf_dp1"] = evaluate(_tasks(), hf, str(data_dir), limit=LIMIT)
    return out


def _compare(a, b, tol):
    worst = 0.0
    for task in a["samples"]:
        for x, y in zip(a["samples"][task], b["samples"][task], strict=True):
            assert x["metrics"] == y["metrics"], (task, x["index"])
            if "lls" in x:
                worst = max(worst, max(abs(p - q) for p, q in zip(x["lls"], y["lls"], strict=True)))
            else:
                assert x["responses"] == y["responses"]
    assert worst <= tol
    return worst


@pytest.mark.slow
def test_megatron_tp2_equals_hf_backend(files):
    hf, ckpt, data = files
    ours_hf = evaluate(_tasks(), HFBackend(str(hf), batch_size=3), str(data), limit=LIMIT)
    ranks = run_distributed(_megatron_worker, 2, ckpt, data, 2, False, tp=2)
    assert ranks[0]["dp"] == 1
    assert ranks[0]["result"]["samples"] == ranks[1]["result"]["samples"]
    worst = _compare(ranks[0]["result"], ours_hf, 1e-4)
    print(f"Megatron TP=2 vs HF: max |loglikelihood difference| {worst:.2e}")
    assert sum(len(s["responses"][0]) for s in ours_hf["samples"]["gen"]) > 0


@pytest.mark.slow
def test_megatron_pp2_equals_hf_backend(files):
    hf, ckpt, data = files
    ours_hf = evaluate(_tasks(), HFBackend(str(hf), batch_size=3), str(data), limit=LIMIT)
    ranks = run_distributed(_megatron_worker, 2, ckpt, data, 1, False, 2, pp=2)
    assert ranks[0]["dp"] == 1 and ranks[0]["result"]["samples"] == ranks[1]["result"]["samples"]
    print(f"Megatron PP=2 vs HF: max |loglikelihood difference| {_compare(ranks[0]['result'], ours_hf, 1e-4):.2e}")


@pytest.mark.slow
def test_data_parallel_ranks_give_the_dp1_numbers(files):
    hf, ckpt, data = files
    ranks = run_distributed(_megatron_worker, 2, ckpt, data, 1, True, 1, hf, tp=1)
    assert ranks[0]["dp"] == 2 and ranks[0]["hf_dp"] == 2
    assert ranks[0]["hf_dp2"] == ranks[1]["hf_dp2"] and ranks[0]["hf_dp2"] == ranks[0]["hf_dp1"]
    assert ranks[0]["result"] == ranks[1]["result"]       # every rank holds all results
    assert ranks[0]["result"]["samples"] == ranks[0]["dp1"]["samples"]   # exactly, not within a tolerance
    assert ranks[0]["result"]["results"] == ranks[0]["dp1"]["results"]


@pytest.mark.slow
def test_torchrun_cli_at_tp2_writes_the_hf_numbers(files, tmp_path):
    """`torchrun -m instella_plugin.cli eval --load CKPT --tensor-model-parallel-size 2`: the launcher's
    environment sets up the ranks; rank 0 alone prints and writes; the JSON has the HF backend's metrics."""
    import json
    import os
    import subprocess
    import sys

    hf, ckpt, data = files
    out = tmp_path / "tp2.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "instella_plugin.cli", "eval", "--load", str(ckpt), "--tensor-model-parallel-size",
                           "2", "--tasks", "arc_challenge,winogrande", "--data-dir", str(data), "--limit", str(LIMIT),
                           "--output", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and proc.stdout.count("arc_challenge  acc_norm*") == 1
    record = json.loads(out.read_text())
    assert (record["model"]["backend"], record["model"]["tp"], record["model"]["dp"]) == ("megatron", 2, 1)
    ours_hf = evaluate(_tasks()[:2], HFBackend(str(hf), batch_size=3), str(data), limit=LIMIT)
    for task in ("arc_challenge", "winogrande"):
        assert record["results"][task]["metrics"] == ours_hf["results"][task]["metrics"]
