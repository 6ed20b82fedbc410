"""In-loop downstream evaluation: a short tiny run scores --eval-tasks at each eval interval, and the
logged scores equal `instella eval` on the checkpoint saved at the same iteration.

Two gloo ranks train instella-tiny (real tokenizer, TP=2) on mock data for 4 iterations, evaluating
and saving every 2; the scores go to the progress line and ``train_log.jsonl`` as ``eval/TASK/METRIC``.
`instella eval --load SAVE/iter_N` (one process, TP=1) on the same task files must print the same values.
"""
import json
import subprocess
import sys

import pytest

from instella_plugin.testing.trainer import run_trainer

from test_eval_parity import write_task_data

pytestmark = [pytest.mark.slow, pytest.mark.dist]
TASKS = "arc_easy,boolq"


def test_in_loop_scores_equal_instella_eval_on_the_saved_checkpoint(tmp_path):
    data = write_task_data(tmp_path / "data", n=6)
    save = tmp_path / "run"
    args = ["--plugin", "instella", "--model-preset", "instella-tiny", "--seq-length", "128", "--mock-data",
            "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
            "--log-interval", "1", "--device", "cpu", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1",
            "--save", save, "--save-interval", "2", "--tensor-model-parallel-size", "2",
            "--eval-tasks", TASKS, "--eval-tasks-data", data, "--eval-tasks-limit", "4"]
    proc = run_trainer(2, args)
    assert "eval at iteration 2 | eval loss" in proc.stdout and "arc_easy/acc_norm" in proc.stdout
    logged = {}
    for line in (save / "train_log.jsonl").read_text().splitlines():
        r = json.loads(line)
        scores = {k[len("eval/"):]: v for k, v in r.items() if k.startswith("eval/")}
        if scores:
            logged[r["iteration"]] = scores
    assert sorted(logged) == [2, 4]
    assert (save / "eval_scores.png").read_bytes()[:4] == b"\x89PNG"   # the loss plot's companion
    assert set(logged[2]) == {"arc_easy/acc", "arc_easy/acc_norm", "boolq/acc", "boolq/acc_norm"}
    for it in (2, 4):
        out = tmp_path / f"eval{it}.json"
        subprocess.run([sys.executable, "-m", "instella_plugin.cli", "eval", "--load", str(save / f"iter_{it:07d}"),
                        "--tasks", TASKS, "--data-dir", str(data), "--limit", "4", "--output", str(out)],
                       check=True, capture_output=True, text=True, timeout=600)
        results = json.loads(out.read_text())["results"]
        offline = {f"{t}/{m}": v for t, r in results.items() for m, v in r["metrics"].items()
                   if not m.endswith("_stderr")}
        assert offline == logged[it], it
        assert results["arc_easy"]["n"] == 4
