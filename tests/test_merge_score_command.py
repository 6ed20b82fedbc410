"""Greedy soup scored by an external command (``instella merge --method greedy-soup --score-command``).

Four small HF checkpoints differ only in ``model.norm.weight``, filled with 1, 2, 4 and 8; any soup of
them holds the fp32 mean of its ingredients' values there, so a score script can tell every soup apart.
The script (standard library only) reads that value from the checkpoint's safetensors file, looks its
score up in a table written by the test, appends the checkpoint to a log and prints the score last,
after a line of other numbers, as an evaluation run would. The test checks, through the real CLI, that
every input is scored once, that the inputs are ranked by those scores (higher or lower better), which
candidate soups are tried and kept, the record, and the merged tensor; and that a command that fails,
prints no number or has no ``{checkpoint}`` is refused with a message naming the problem and the fix,
no output written.
"""
import json
import os
import sys

import pytest
import torch

from test_hf_model import write_model

VALUES = {"A": 1.0, "B": 2.0, "C": 4.0, "D": 8.0}
NORM = "model.norm.weight"
# score of a checkpoint by the value of its norm weight (three decimals): the inputs, then every soup the
# two runs below try: {B,C} = 3, {B,C,A} = 7/3, {B,C,D} = 14/3; {D,A} = 4.5, {D,C} = 6
SCORES = {"1.000": 0.50, "2.000": 0.70, "4.000": 0.60, "8.000": 0.40,
          "3.000": 0.75, "2.333": 0.72, "4.667": 0.75, "4.500": 0.45, "6.000": 0.35}

SCRIPT = r'''
import json, os, struct, sys
ckpt, table, log = sys.argv[1:4]
value = None
for f in sorted(os.listdir(ckpt)):
    if f.endswith(".safetensors"):
        with open(os.path.join(ckpt, f), "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
            if NORM in header:
                assert header[NORM]["dtype"] == "F32", header[NORM]
                fh.seek(8 + n + header[NORM]["data_offsets"][0])
                value = struct.unpack("<f", fh.read(4))[0]
if value is None:
    sys.exit(f"no {NORM} in {ckpt}")
key = f"{value:.3f}"
scores = json.load(open(table))
if key not in scores:
    sys.exit(f"no score for a checkpoint whose norm weight is {key}")
with open(log, "a") as fh:
    fh.write(f"{os.path.abspath(ckpt)}\t{key}\n")
print("dev suite: 16 questions, 2 shots, seed 1234")
print(f"accuracy {scores[key]}")
'''.replace("NORM", repr(NORM))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("soup_cmd")
    write_model(root / "A", "instella", seed=3)
    for name in VALUES:
        if name != "A":
            os.makedirs(root / name)
            for f in os.listdir(root / "A"):
                os.link(root / "A" / f, root / name / f)
    for name, value in VALUES.items():  # every input gets its own file (the others are hard links of A's)
        path = root / name / "model.safetensors"
        tensors = load_file(str(path))
        tensors[NORM] = torch.full_like(tensors[NORM], value)
        os.unlink(path)
        save_file(tensors, str(path), metadata={"format": "pt"})
    script = root / "score.py"
    script.write_text(SCRIPT)
    table = root / "scores.json"
    table.write_text(json.dumps(SCORES))
    return root, script, table


def run_soup(root, out, command, *extra):
    from instella_plugin.hf.merge_cli import main

    return main(["--method", "greedy-soup", "--inputs", *[str(root / n) for n in VALUES], "--output", str(out),
                 "--score-command", command, *extra])


def scored(log):
    return [line.split("\t") for line in log.read_text().splitlines()]


@pytest.mark.parametrize("higher", [True, False])
def test_greedy_soup_follows_the_commands_scores(seeds, tmp_path, capsys, higher):
    from safetensors.torch import load_file

    from instella_plugin.hf.formats import HFCheckpoint

    root, script, table = seeds
    log = tmp_path / "scored.log"
    command = f"{sys.executable} {script} {{checkpoint}} {table} {log}"
    out = tmp_path / "soup"
    assert run_soup(root, out, command, *(["--higher-is-better"] if higher else [])) == 0
    if higher:  # accuracy: B .70, C .60, A .50, D .40; +C -> .75 kept, +A -> .72 dropped, +D -> .75 kept (ties keep)
        order, kept, ingredients, score, candidates = "BCAD", [True, True, False, True], "BCD", 0.75, \
            ["3.000", "2.333", "4.667"]
    else:  # a loss: D .40, A .50, C .60, B .70; +A -> .45 dropped, +C -> .35 kept, +B -> .75 dropped
        order, kept, ingredients, score, candidates = "DACB", [True, False, True, False], "DC", 0.35, \
            ["4.500", "6.000", "4.667"]
    calls = scored(log)
    # each input scored once, in input order, then one candidate soup per remaining input
    assert [p for p, _ in calls[:4]] == [str(root / n) for n in VALUES]
    assert [k for _, k in calls[4:]] == candidates and len(calls) == 7
    assert all(p.startswith(str(out) + ".soup-") for p, _ in calls[4:])
    record = json.load(open(out / "instella_merge.json"))["greedy_soup"]
    assert record["higher_is_better"] is higher
    assert record["input_scores"] == {str(root / n): SCORES[f"{v:.3f}"] for n, v in VALUES.items()}
    assert record["order"] == [str(root / n) for n in order]
    assert [s["kept"] for s in record["steps"]] == kept and record["score"] == score
    assert record["ingredients"] == [str(root / n) for n in ingredients]
    assert f"{len(ingredients)} of 4 inputs kept, score {score:.4f}" in capsys.readouterr().out
    # the soup is the fp32 mean of its ingredients, summed in input order; the norm weight: their values
    soup = HFCheckpoint(str(out))
    files = [load_file(str(root / n / "model.safetensors")) for n in VALUES if n in ingredients]
    for name in soup.files.names():
        want = files[0][name].clone()
        for f in files[1:]:
            want += f[name]
        assert torch.equal(soup.get(name), want / len(files)), name
    mean = sum(VALUES[n] for n in ingredients) / len(ingredients)
    assert (soup.get(NORM) - mean).abs().max().item() < 1e-6
    assert sorted(os.listdir(tmp_path)) == ["scored.log", "soup"]  # candidates removed


@pytest.mark.parametrize("body,message", [
    ("import sys\nprint('loading dev suite')\nsys.exit('dev suite mmlu_dev not found')",
     ["score command failed (1)", "dev suite mmlu_dev not found"]),
    ("print('accuracy: n/a (no examples)')", ["score command printed no number", "accuracy: n/a"]),
])
def test_bad_score_commands_are_refused(seeds, tmp_path, capsys, body, message):
    root, _, _ = seeds
    script = tmp_path / "bad.py"
    script.write_text(body)
    out = tmp_path / "soup"
    assert run_soup(root, out, f"{sys.executable} {script} {{checkpoint}}", "--higher-is-better") == 2
    err = capsys.readouterr().err
    assert all(m in err for m in message) and str(root / "A") in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad.py"]  # no output, no scratch soups


def test_score_command_without_checkpoint_placeholder_is_refused(seeds, tmp_path, capsys):
    root, script, table = seeds
    out = tmp_path / "soup"
    assert run_soup(root, out, f"{sys.executable} {script} {table}") == 2
    err = capsys.readouterr().err
    assert "must contain {checkpoint} where the path goes" in err, err
    assert not out.exists()
