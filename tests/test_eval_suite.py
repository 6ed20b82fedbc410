"""`instella eval --suite instella-base` end to end on small fixture files (every task of the suite),
the results JSON, and `instella eval compare` (table and PNG)."""
import json

import pytest

from instella_plugin.evaluation import cli
from instella_plugin.evaluation.results import table

from test_eval_parity import data_dir, tiny_dir  # noqa: F401  (fixtures)

SUITE = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande", "openbookqa", "mmlu",
         "bbh", "gsm8k"]


def _record(scores):
    return {"format_version": 1, "model": {}, "results": {
        t: {"metrics": {"acc": s, "acc_stderr": 0.01}, "n": 10, "num_fewshot": 0, "primary_metric": "acc",
            "version": 1, "output": "multiple_choice"} for t, s in scores.items()}}


def test_compare_prints_and_plots(tmp_path, capsys):
    a, b = tmp_path / "step100.json", tmp_path / "step200.json"
    a.write_text(json.dumps(_record({"arc_easy": 0.5, "boolq": 0.625})))
    b.write_text(json.dumps(_record({"arc_easy": 0.75, "piqa": 0.25})))
    assert cli.main(["compare", str(a), str(b), "--plot", str(tmp_path / "cmp.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["task", "step100", "step200"]
    assert out[1].split() == ["arc_easy", "50.00", "75.00"] and out[2].split() == ["boolq", "62.50", "-"]
    assert out[3].split() == ["piqa", "-", "25.00"]
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="has no 'results'"):
        (tmp_path / "bad.json").write_text("{}")
        cli.main(["compare", str(tmp_path / "bad.json")])
    lines = table(_record({"arc_easy": 0.5, "boolq": 0.625})["results"]).splitlines()
    assert lines[2].split() == ["arc_easy", "acc*", "50.00", "1.00", "0", "10"]
    assert lines[-1].split() == ["average", "primary*", "56.25"]


@pytest.mark.slow
def test_suite_end_to_end(tiny_dir, data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "results.json"
    assert cli.main(["--hf", str(tiny_dir), "--suite", "instella-base", "--data-dir", str(data_dir), "--limit", "1",
                     "--output", str(out), "--log-samples", "--max-new-tokens", "24"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert list(record["results"]) == SUITE
    for name, r in record["results"].items():
        assert r["version"] == 1 and r["n"] == (27 if name == "bbh" else 1), name
        assert r["primary_metric"] in r["metrics"] and f"{r['primary_metric']}_stderr" in r["metrics"]
        assert name in printed
    assert record["results"]["mmlu"]["num_fewshot"] == 5 and record["results"]["gsm8k"]["num_fewshot"] == 8
    assert record["results"]["bbh"]["num_fewshot"] == 3 and len(record["results"]["bbh"]["subtasks"]) == 27
    assert record["results"]["gsm8k"]["generation"]["checker"] == "exact_match"
    assert record["model"]["backend"] == "hf" and record["limit"] == 1 and record["max_new_tokens_cap"] == 24
    assert len(record["samples"]["gsm8k"][0]["responses"]) == 1
