"""A hostile new user across the CLI: no command destroys good data, no source silently vanishes,
every corrupt file is named.

Each case checks the exit code, that the message names the file or flag at fault, and that the good
output written before is byte-identical afterwards (checksums before and after). Commands run in
this process through ``instella_plugin.cli.main`` except where a real process is the point: kill -9
during ``data prepare``, and (slow tier) the trainer reading a checkpoint whose newest iteration is
damaged, then loading the iteration its error suggests. One tiny trained checkpoint (one rank, two
iterations) is shared by every checkpoint case.
"""
import hashlib
import json
import os
import signal

import numpy as np
import pytest
import yaml

from instella_plugin.cli import main as instella
from instella_plugin.testing.killed_prepare import kill_prepare_mid_write
from instella_plugin.testing.trainer import TINY_MODEL, run_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digest(*paths) -> dict:
    """sha256 of every file under the given files/directories (symlinks followed)."""
    out = {}
    for top in map(str, paths):
        files = [top] if os.path.isfile(top) else sorted(
            os.path.join(d, f) for d, _, names in os.walk(top) for f in names)
        for f in files:
            with open(f, "rb") as fh:
                out[f] = hashlib.sha256(fh.read()).hexdigest()
    assert out, f"nothing to digest under {paths}"
    return out


def run(capsys, *argv):
    """(exit code, stdout + stderr) of ``instella ARGV``; argparse errors give their exit code."""
    try:
        code = instella([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def _jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(path)


@pytest.fixture()
def good_pair(tmp_path, capsys):
    """A valid prepared pair at tmp/good (and its source), checked into the test by checksum."""
    src = _jsonl(tmp_path / "good.jsonl", [f"document number {i} about rivers." for i in range(40)])
    code, _ = run(capsys, "data", "prepare", src, "--output-prefix", tmp_path / "good", "--no-progress")
    assert code == 0
    return str(tmp_path / "good")


def _readable(prefix, documents):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    assert len(ds.document_indices) - 1 == documents and ds[documents - 1].size > 0


# ---- data prepare -----------------------------------------------------------------------------------
def test_prepare_onto_a_good_pair_needs_overwrite_and_a_failed_one_keeps_it(tmp_path, good_pair, capsys):
    before = digest(good_pair + ".bin", good_pair + ".idx")
    other = _jsonl(tmp_path / "other.jsonl", ["another text"] * 5)
    code, msg = run(capsys, "data", "prepare", other, "--output-prefix", good_pair, "--no-progress")
    assert code == 2 and good_pair + ".bin" in msg and "--overwrite" in msg
    assert digest(good_pair + ".bin", good_pair + ".idx") == before
    bad = tmp_path / "bad.jsonl"  # fails on line 3, after documents were written
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": broken\n')
    code, msg = run(capsys, "data", "prepare", bad, "--output-prefix", good_pair, "--overwrite", "--no-progress")
    assert code == 2 and "bad.jsonl:3" in msg
    assert digest(good_pair + ".bin", good_pair + ".idx") == before
    _readable(good_pair, 40)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]
    code, _ = run(capsys, "data", "prepare", other, "--output-prefix", good_pair, "--overwrite", "--no-progress")
    assert code == 0 and digest(good_pair + ".bin", good_pair + ".idx") != before
    _readable(good_pair, 5)


def test_kill_9_during_prepare_onto_a_good_pair_leaves_it_byte_identical(tmp_path, good_pair):
    """The input is a FIFO the test holds open, so the kill surely lands while the new pair is written."""
    before = digest(good_pair + ".bin", good_pair + ".idx")

    def old_pair_intact():  # mid-write, the old pair is untouched
        assert digest(good_pair + ".bin", good_pair + ".idx") == before

    code = kill_prepare_mid_write((f"new document {i}" for i in range(1500)), good_pair,
                                  str(tmp_path / "stream.jsonl"), ["--overwrite"], midway=old_pair_intact)
    assert code == -signal.SIGKILL
    assert digest(good_pair + ".bin", good_pair + ".idx") == before
    _readable(good_pair, 40)


def test_prepare_that_writes_nothing_fails_naming_the_input(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, msg = run(capsys, "data", "prepare", empty, "--output-prefix", tmp_path / "e", "--no-progress")
    assert code == 2 and str(empty) in msg and "empty" in msg
    skipped = tmp_path / "skipped.jsonl"
    skipped.write_text('{"text": broken\n{"txt": "wrong key"}\n{"text": "   "}\n')
    code, msg = run(capsys, "data", "prepare", skipped, "--output-prefix", tmp_path / "s", "--skip-bad-lines",
                    "--no-progress")
    assert code == 2 and str(skipped) in msg and "all 3 records were skipped (2 malformed" in msg
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("e.", "s."))]  # no pair megatron cannot open


# ---- data blend / index / sft -----------------------------------------------------------------------
def test_blend_source_with_weight_and_no_tokens_fails_the_blend(tmp_path, good_pair, capsys):
    from instella_plugin.data.indexed import PartialPairWriter

    with PartialPairWriter(str(tmp_path / "hollow")) as w:  # an empty pair, as older tools could leave
        w.commit()
    blend = tmp_path / "half.yaml"
    blend.write_text(yaml.safe_dump({"mode": "fraction", "train": [
        {"name": "good", "prefix": "good", "fraction": 1.0}, {"name": "hollow", "prefix": "hollow", "fraction": 1.0}]}))
    out = tmp_path / "split.json"
    code, msg = run(capsys, "data", "blend", blend, "--data-root", tmp_path, "--output", out)
    assert code == 2 and "train/hollow" in msg and str(tmp_path / "hollow") in msg and "no tokens" in msg
    assert not out.exists()
    blend.write_text(yaml.safe_dump({"mode": "weight", "train": [
        {"name": "good", "prefix": "good", "weight": 0.5}, {"name": "hollow", "prefix": "hollow", "weight": 0.5}]}))
    code, msg = run(capsys, "data", "blend", blend, "--data-root", tmp_path)
    assert code == 2 and "train/hollow (weight 0.5)" in msg
    blend.write_text(yaml.safe_dump({"mode": "weight", "train": [
        {"name": "good", "prefix": "good", "weight": 1}, {"name": "hollow", "prefix": "hollow", "weight": 0}]}))
    code, _ = run(capsys, "data", "blend", blend, "--data-root", tmp_path, "--output", out)
    assert code == 0  # weight 0 says the user means it
    before = digest(out)
    code, msg = run(capsys, "data", "blend", blend, "--data-root", tmp_path, "--output", out)
    assert code == 2 and str(out) in msg and "--overwrite" in msg and digest(out) == before


def test_index_names_an_empty_token_file_and_keeps_an_existing_pair(tmp_path, capsys):
    empty = tmp_path / "part-0-00000.npy"
    empty.write_bytes(b"")
    code, msg = run(capsys, "data", "index", empty, "--output-dir", tmp_path / "idx")
    assert code == 2 and str(empty) in msg and "empty token file" in msg
    assert not (tmp_path / "idx" / "part-0-00000.idx").exists()
    tokens = tmp_path / "part-1.npy"
    np.array([5, 6, 0, 7, 0], dtype=np.uint16).tofile(tokens)
    assert run(capsys, "data", "index", tokens, "--output-dir", tmp_path / "idx", "--bin-mode", "copy")[0] == 0
    pair = [tmp_path / "idx" / f"part-1{e}" for e in (".bin", ".idx")]
    before = digest(*pair)
    np.array([9, 0], dtype=np.uint16).tofile(tokens)
    code, msg = run(capsys, "data", "index", tokens, "--output-dir", tmp_path / "idx", "--bin-mode", "copy")
    assert code == 2 and str(pair[0]) in msg and "--overwrite" in msg and digest(*pair) == before
    code, _ = run(capsys, "data", "index", tokens, "--output-dir", tmp_path / "idx", "--bin-mode", "copy",
                  "--overwrite")
    assert code == 0 and digest(*pair) != before
    _readable(str(tmp_path / "idx" / "part-1"), 1)


def test_sft_refuses_an_existing_store_and_an_empty_input(tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    prefix = tmp_path / "sft"
    assert run(capsys, "data", "sft", chats, "--output-prefix", prefix)[0] == 0
    store = [f"{prefix}_{part}{e}" for part in ("tokens", "mask") for e in (".bin", ".idx")]
    before = digest(*store)
    code, msg = run(capsys, "data", "sft", chats, "--output-prefix", prefix)
    assert code == 2 and f"{prefix}_tokens.bin" in msg and "--overwrite" in msg and digest(*store) == before
    empty = tmp_path / "none.jsonl"
    empty.write_text("\n")
    code, msg = run(capsys, "data", "sft", empty, "--output-prefix", prefix, "--overwrite")
    assert code == 2 and str(empty) in msg and "no chats" in msg and digest(*store) == before


# ---- numeric flags ----------------------------------------------------------------------------------
def test_numeric_flags_that_must_be_positive_say_so(tmp_path, capsys):
    from instella_plugin.training.arguments import parse_args

    for flag in ("--train-iters", "--micro-batch-size", "--global-batch-size"):
        argv = ["--train-iters", "5", "--lr", "1e-3", "--mock-data", flag, "0"]
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}: must be a positive integer (>= 1), got 0" in err
    base = ["submit", "--recipe", "tiny-cpu", "--profile", "local-cpu", "--blend", "tiny", "--dry-run",
            "--set", f"output_root={tmp_path}/runs", "--set", f"data_root={tmp_path}/data"]
    for flag in ("--nodes", "--micro-batch-size", "--global-batch-size", "--train-iters", "--tp"):
        code, msg = run(capsys, *base, "--run-name", "r", flag, "0")
        assert code == 2 and f"argument {flag}" in msg and "positive" in msg, flag
    assert not (tmp_path / "runs").exists()


def test_submit_does_not_replace_another_submissions_scripts_without_overwrite(tmp_path, capsys):
    base = ["submit", "--recipe", "tiny-cpu", "--profile", "local-cpu", "--blend", "tiny", "--dry-run",
            "--run-name", "r", "--set", f"output_root={tmp_path}/runs", "--set", f"data_root={tmp_path}/data"]
    assert run(capsys, *base, "--train-iters", "20")[0] == 0
    submit_dir = tmp_path / "runs" / "r"
    before = digest(submit_dir)
    assert run(capsys, *base, "--train-iters", "20")[0] == 0 and digest(submit_dir) == before  # same: resume
    code, msg = run(capsys, *base, "--train-iters", "40")
    assert code == 2 and str(submit_dir / "submit" / "train.sbatch") in msg and "--overwrite" in msg
    assert digest(submit_dir) == before
    assert run(capsys, *base, "--train-iters", "40", "--overwrite")[0] == 0
    assert "--train-iters 40" in (submit_dir / "submit" / "train.sbatch").read_text()


# ---- checkpoints: one tiny trained run, its newest iteration damaged --------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SAVE with iterations 1 and 2 of a tiny one-rank run (mock data); iteration 2's largest shard is
    truncated to half. Returns (save dir, damaged shard)."""
    save = tmp_path_factory.mktemp("ckpt") / "save"
    run_trainer(1, [*TINY_MODEL, "--train-iters", "2", "--save-interval", "1", "--save", save,
                    "--global-batch-size", "2", "--lr-warmup-iters", "0"])
    it2 = save / "iter_0000002"
    shard = max(it2.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return save, shard


def test_convert_and_merge_name_the_damaged_shard_and_the_intact_iteration(trained, tmp_path, capsys):
    save, shard = trained
    before = digest(save)
    code, msg = run(capsys, "convert", "--input", save, "--output", tmp_path / "hf")
    assert code == 2 and str(shard) in msg and "truncated" in msg and "iteration 2" in msg
    assert f"--input {save / 'iter_0000001'}" in msg and not (tmp_path / "hf").exists()
    code, msg = run(capsys, "merge", "--inputs", save / "iter_0000001", save, "--output", tmp_path / "m")
    assert code == 2 and str(shard) in msg and f"--inputs {save / 'iter_0000001'}" in msg
    code, msg = run(capsys, "convert", "--input", save / "iter_0000001", "--output", save, "--overwrite")
    assert code == 2 and f"output {save} contains the input" in msg  # would have replaced the whole run
    code, msg = run(capsys, "merge", "--inputs", save / "iter_0000001", save / "iter_0000001", "--output",
                    save / "iter_0000001", "--overwrite")
    assert code == 2 and "is the input" in msg
    assert digest(save) == before
    assert run(capsys, "convert", "--input", save / "iter_0000001", "--output", tmp_path / "hf")[0] == 0


def test_trainer_load_names_the_damaged_shard_and_the_intact_iteration(trained):
    """The trainer's --load decision (``setup.resolve_load``, run before the model is built), in process."""
    from instella_plugin.training.arguments import parse_args
    from instella_plugin.training.setup import resolve_load

    save, shard = trained
    before = digest(save)
    run, plugin = parse_args([*map(str, TINY_MODEL), "--train-iters", "3", "--save", str(save), "--load", str(save)])
    with pytest.raises(SystemExit) as e:
        resolve_load(run, plugin)
    msg = str(e.value.code)
    assert msg.startswith("error: --load") and str(shard) in msg and "checkpoint iteration 2" in msg
    assert "truncated" in msg and f"--load {save / 'iter_0000001'}" in msg
    assert digest(save) == before


@pytest.mark.slow
def test_trainer_process_names_the_damaged_shard_and_loads_the_suggested_iteration(trained, tmp_path):
    save, shard = trained
    before = digest(save)
    proc = run_trainer(1, [*TINY_MODEL, "--train-iters", "3", "--save", save, "--load", save], check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert str(shard) in err and "checkpoint iteration 2" in err and "truncated" in err
    assert f"--load {save / 'iter_0000001'}" in err and "failed finding central directory" not in err
    assert digest(save) == before
    new = tmp_path / "resumed"
    proc = run_trainer(1, [*TINY_MODEL, "--train-iters", "2", "--global-batch-size", "2", "--lr-warmup-iters", "0",
                           "--load", save / "iter_0000001", "--save", new])
    assert "(iteration 1); resuming at iteration 1" in proc.stdout
    assert (new / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
