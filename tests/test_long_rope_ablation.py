"""The RoPE-method ablation: its table from run folders (fast), and the tiny CPU run end to end (slow)."""
import json
import os
import subprocess

import pytest

from instella_plugin.evaluation import rope_ablation
from instella_plugin.testing.trainer import REPO


def _fake_runs(work, values):
    for method, (acc, loss) in values.items():
        os.makedirs(work / method / "niah")
        os.makedirs(work / method / "short")
        (work / method / "niah" / "niah_single.json").write_text(json.dumps(
            {"accuracy": acc, "per_length": {"128": acc, "240": acc / 2}}))
        (work / method / "short" / "train_log.jsonl").write_text(
            json.dumps({"iteration": 0, "eval_loss": loss + 1}) + "\n" + json.dumps({"iteration": 0, "eval_loss": loss}) + "\n")


def test_table_and_plot_from_run_folders(tmp_path, capsys):
    values = {"base-law": (0.5, 3.25), "linear": (0.25, 3.5), "ntk": (0.75, 3.0), "yarn": (1.0, 3.125)}
    _fake_runs(tmp_path, values)
    assert rope_ablation.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for method, (acc, loss) in values.items():
        line = next(x for x in out.splitlines() if x.startswith(method + " "))
        assert f"{100 * acc:.1f}" in line and f"{100 * acc / 2:.1f}" in line and f"{loss:.4f}" in line
    rows = json.loads((tmp_path / "rope_ablation.json").read_text())["rows"]
    assert [r["method"] for r in rows] == list(values) and rows[3]["short_loss"] == 3.125
    assert (tmp_path / "rope_ablation.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="unknown RoPE method"):
        rope_ablation.main([str(tmp_path), "--methods", "linear,rope9"])
    with pytest.raises(SystemExit, match="no niah_"):
        rope_ablation.main([str(tmp_path / "nowhere")])


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(1800)  # 7 launches (one short model; per method: extend, retrieve, retention); two methods
# here (the law and YaRN): each method alone is covered by test_long_rope.py, the script runs all four
def test_tiny_ablation_end_to_end(tmp_path):
    venv_python = os.path.join(REPO, ".venv", "bin", "python")
    env = dict(os.environ, TINY="1", WORK=str(tmp_path), METHODS="base-law yarn",
               PYTHON=venv_python if os.path.exists(venv_python) else "python3")
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "rope_ablation.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("RoPE method ablation"):]
    print(table)
    rows = json.loads((tmp_path / "rope_ablation.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["base-law", "yarn"]
    assert all(r["short_loss"] is not None and 0 < r["short_loss"] < 15 for r in rows)
    assert all(0.0 <= r["niah"] <= 1.0 for r in rows)
    # each method really ran as itself: the checkpoints record it, and base-law's theta is the law's
    metas = {m: json.loads((tmp_path / m / "iter_0000006" / "instella_meta.json").read_text()) for m in
             ("base-law", "yarn")}
    assert metas["yarn"]["rope_scaling"]["method"] == "yarn" and metas["yarn"]["rope_scaling"]["factor"] == 4.0
    assert metas["yarn"]["rope_theta"] == 10000.0 and round(metas["base-law"]["rope_theta"]) > 10000
