"""The seed-soup report end to end (slow): the tiny stage-2 seed workflow, then examples/merge_report.sh.

examples/stage2_seeds_merge_tiny.sh trains a tiny stage 1 and three stage-2 seeds on CPU (real
megatron-core, gloo); examples/merge_report.sh then scores the seeds, stage 1, every method of the
bundled method list and 5 points between every pair of seeds on the tiny blend's valid split. Checked:
the files are written; every score is finite; the curve ends are the seeds' own scores; each barrier
is the excess over the chord computed from the curve; stage 2 improves on stage 1; the uniform merge is
no worse than the mean of the seeds (the seeds share one basin after 20 steps from one stage 1). The
figures (which method won, barrier heights) are printed.
"""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_tiny_seed_soup_report(tmp_path):
    env = {**os.environ, "WORK": str(tmp_path), "PYTHON": sys.executable, "PYTHONPATH": ROOT,
           "S1_ITERS": "30", "S2_ITERS": "12", "EVAL_ITERS": "2"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "stage2_seeds_merge_tiny.sh")], env=env,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env.update(RUN_DIR=str(tmp_path), SEED_SUBDIR="", BASE=str(tmp_path / "stage1"), OUTPUT=str(tmp_path / "report"),
               HELDOUT_BLEND="tiny", DATA_ROOT=str(tmp_path / "data"), EVAL_SAMPLES="12", EVAL_SEQ_LENGTH="128")
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "merge_report.sh")], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout[-4000:])
    out = tmp_path / "report"
    assert sorted(os.listdir(out)) == ["barrier.png", "methods.png", "report.json", "report.md"]
    rep = json.loads((out / "report.json").read_text())
    seeds = rep["inputs"]
    assert len(seeds) == 3 and all(math.isfinite(s) for s in seeds.values())
    assert set(rep["methods"]) == {"uniform", "greedy-soup", "slerp", "layerwise", "ties", "dare-linear", "dare-ties"}
    assert all(math.isfinite(m["score"]) for m in rep["methods"].values()), rep["methods"]
    assert rep["base"]["score"] > max(seeds.values())  # stage 2 improves on stage 1
    assert rep["methods"]["uniform"]["score"] <= sum(seeds.values()) / 3 + 0.02
    assert len(rep["barriers"]) == 3
    for b in rep["barriers"]:
        assert b["scores"][0] == seeds[b["a"]] and b["scores"][-1] == seeds[b["b"]] and len(b["t"]) == 5
        chord = [(1 - t) * b["scores"][0] + t * b["scores"][-1] for t in b["t"]]
        assert b["barrier"] == pytest.approx(max(s - c for s, c in list(zip(b["scores"], chord))[1:-1]))
    print("best method:", rep["best_method"], {k: round(v["score"], 4) for k, v in rep["methods"].items()},
          "barriers:", [round(b["barrier"], 4) for b in rep["barriers"]])
