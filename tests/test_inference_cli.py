"""``instella generate`` end to end on a tiny checkpoint saved by the trainer's ``save_checkpoint``, and its
refusals of bad input (each before any model is built).

The checkpoint holds a 2-layer model with the real tokenizer's vocabulary. The command streams one
prompt's text to the terminal; a prompts file (a plain prompt, a chat, an id) gives one JSON line per
prompt whose greedy text equals the streamed one and whose chat prompt has the chat template's tokens.
The slow tier runs the command under torchrun at TP=2 and with two data-parallel replicas and
checks they write the same tokens, and loads a checkpoint written by ``pretrain_gpt.py``.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from instella_plugin.inference import loading  # noqa: F401  (megatron's inference calls faulthandler.enable()
from instella_plugin.inference.cli import main  # at import, which needs a real stderr: import before capsys)
from instella_plugin.model.config import InstellaConfig
from instella_plugin.testing.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = InstellaConfig(num_layers=2, hidden_size=64, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=128,
                     vocab_size=50280, padded_vocab_size=50304, seq_length=64, preset="gen-cli-test")
PROMPT = "The capital of France is"


def _save_worker(cfg, save_dir):
    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.training.checkpointing import save_checkpoint

    chunks = build_gpt_chunks(cfg, cfg.transformer_config(), init_seed=4)
    with torch.no_grad():  # a sharper output distribution than the init's, so text differs between prompts
        chunks[0].output_layer.weight.mul_(40.0)
    save_checkpoint(save_dir, 3, chunks, cfg, save_rng=False,
                    extra_meta={"spec": "instella", "rotary_base": cfg.rotary_base, "seq_length": cfg.seq_length,
                                "tokenizer": "instella"})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gencli")
    run_distributed(_save_worker, 1, CFG, str(root / "ckpt"))
    return root


def _instella(*args, nproc=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "instella_plugin.cli", "generate", *args]
    else:
        cmd = [sys.executable, "-m", "instella_plugin.cli", "generate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _prompts_file(path):
    rows = [{"id": "plain", "prompt": PROMPT},
            {"id": "chat", "messages": [{"role": "user", "content": "Name a prime."}]},
            {"prompt": "1, 2, 3,"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def tp1_file_run(ckpt):
    """The prompts file at TP=1 (one process): its JSON lines, the reference of every other layout."""
    rows = _prompts_file(ckpt / "prompts.jsonl")
    out = ckpt / "out.jsonl"
    done = _instella("--load", str(ckpt / "ckpt"), "--prompts-file", str(ckpt / "prompts.jsonl"), "--output",
                     str(out), "--max-new-tokens", "12", "--ignore-eos", "--logprobs")
    assert done.returncode == 0, done.stderr[-3000:]
    return rows, [json.loads(line) for line in out.read_text().splitlines()]


def test_stream_and_file_give_the_same_greedy_text(ckpt, tp1_file_run):
    from instella_plugin.data.tokenizer import load_tokenizer

    streamed = _instella("--load", str(ckpt / "ckpt"), "--prompt", PROMPT, "--max-new-tokens", "12", "--ignore-eos")
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    assert "finished by: length" in streamed.stderr and "12 tokens" in streamed.stderr
    assert "static requests" not in streamed.stderr  # megatron's progress bar is off while streaming
    rows, got = tp1_file_run
    assert [g.get("id") for g in got] == ["plain", "chat", None] and len(got) == len(rows)
    assert streamed.stdout == got[0]["completion"] + "\n"
    tok = load_tokenizer()
    assert got[0]["prompt_tokens"] == len(tok.encode(PROMPT, add_special_tokens=False))
    chat_ids = tok.apply_chat_template(rows[1]["messages"], tokenize=True, add_generation_prompt=True,
                                       return_dict=False)
    assert got[1]["prompt_tokens"] == len(chat_ids)
    for g in got:
        assert len(g["tokens"]) == 12 == len(g["logprobs"]) and g["finish_reason"] == "length"
        assert g["completion"] == tok.decode(g["tokens"], skip_special_tokens=True)
    assert got[0]["completion"] != got[2]["completion"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], []], ids=["tp2", "dp2"])
def test_two_ranks_under_torchrun_write_the_same_tokens(ckpt, tp1_file_run, layout):
    """TP=2, and two data-parallel replicas (TP=1) splitting the prompts: the TP=1 tokens, in order."""
    _, reference = tp1_file_run
    out = ckpt / f"out_{layout[-1] if layout else 'dp'}2.jsonl"
    done = _instella("--load", str(ckpt / "ckpt"), "--prompts-file", str(ckpt / "prompts.jsonl"), "--output",
                     str(out), "--max-new-tokens", "12", "--ignore-eos", *layout, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["tokens"] for g in got] == [g["tokens"] for g in reference]
    assert [g.get("id") for g in got] == ["plain", "chat", None]


# ---- bad input: a clear message, exit code 2, nothing built -------------------------------------------------
def _refused(capsys, *argv):
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_missing_checkpoint(tmp_path, capsys):
    err = _refused(capsys, "--load", str(tmp_path / "nope"), "--prompt", "hi")
    assert "no such checkpoint directory" in err and "nope" in err


def test_directory_without_checkpoint(tmp_path, capsys):
    err = _refused(capsys, "--load", str(tmp_path), "--prompt", "hi")
    assert "holds no checkpoint" in err


def test_tp_not_dividing_heads(ckpt, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    err = _refused(capsys, "--load", str(ckpt / "ckpt"), "--prompt", "hi", "--tensor-model-parallel-size", "3")
    assert "attention heads (2) is not divisible by --tensor-model-parallel-size 3" in err


def test_wrong_process_count(ckpt, capsys, monkeypatch):
    err = _refused(capsys, "--load", str(ckpt / "ckpt"), "--prompt", "hi", "--tensor-model-parallel-size", "2")
    assert "1 processes for --tensor-model-parallel-size 2" in err and "a multiple of TP x PP = 2" in err
    monkeypatch.setenv("WORLD_SIZE", "3")
    err = _refused(capsys, "--load", str(ckpt / "ckpt"), "--prompt", "hi", "--tensor-model-parallel-size", "2")
    assert "3 processes" in err


def test_prompts_file_missing_or_malformed(ckpt, tmp_path, capsys):
    err = _refused(capsys, "--load", str(ckpt / "ckpt"), "--prompts-file", str(tmp_path / "none.jsonl"))
    assert "no such file" in err
    for text, expect in (('{"prompt": "a"}\n{"prompt": \n', "bad.jsonl:2: not valid JSON"),
                         ('{"text": "a"}\n', "bad.jsonl:1: give exactly one of the fields \"prompt\""),
                         ('{"prompt": 3}\n', "field \"prompt\" must be a non-empty string"),
                         ('{"messages": [{"role": "user"}]}\n', "field \"messages\" must be a non-empty list"),
                         ('\n\n', "holds no prompts")):
        (tmp_path / "bad.jsonl").write_text(text)
        err = _refused(capsys, "--load", str(ckpt / "ckpt"), "--prompts-file", str(tmp_path / "bad.jsonl"))
        assert expect in err, err


def test_prompt_longer_than_context(ckpt, capsys):
    err = _refused(capsys, "--load", str(ckpt / "ckpt"), "--prompt", ("word " * 70).strip(), "--max-new-tokens", "4")
    assert "the model's context of 64 tokens" in err and "prompt 0 has 70 tokens" in err
    err = _refused(capsys, "--load", str(ckpt / "ckpt"), "--prompt", "hi", "--max-new-tokens", "100")
    assert "max_new_tokens 100" in err


def test_bad_sampling_values(ckpt, capsys):
    err = _refused(capsys, "--load", str(ckpt / "ckpt"), "--prompt", "hi", "--top-p", "0")
    assert "top_p must be in (0, 1]" in err
    err = _refused(capsys, "--load", str(ckpt / "ckpt"), "--prompt", "hi", "--stop", "")
    assert "stop strings must be non-empty" in err


@pytest.mark.slow
def test_generate_from_a_trainer_run(tmp_path):
    """pretrain_gpt.py (3 iterations, instella-tiny: the real vocabulary) saves; `instella generate` loads
    its checkpoint by the save directory and writes the same tokens as the engine on the same weights."""
    from instella_plugin.testing.trainer import TINY_MODEL, run_trainer

    run_trainer(1, TINY_MODEL + ["--model-preset", "instella-tiny", "--micro-batch-size", 1, "--global-batch-size",
                                 1, "--train-iters", 3, "--save", tmp_path / "run"])
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": PROMPT}) + "\n")
    done = _instella("--load", str(tmp_path / "run"), "--prompts-file", str(tmp_path / "p.jsonl"), "--output",
                     str(tmp_path / "out.jsonl"), "--max-new-tokens", "6", "--ignore-eos")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iteration 3" in done.stderr and "instella-tiny" in done.stderr
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(row["tokens"]) == 6
    (want,) = run_distributed(_engine_tokens_worker, 1, str(tmp_path / "run"), PROMPT, 6)
    assert row["tokens"] == want


def _engine_tokens_worker(load, prompt, new):
    from instella_plugin.inference.api import SamplingParams
    from instella_plugin.inference.loading import checkpoint_plan, load_generator

    gen = load_generator(checkpoint_plan(load))
    return list(gen.generate([prompt], SamplingParams(max_new_tokens=new, stop_at_eos=False))[0].tokens)


def test_chat_flag_renders_one_user_turn():
    """``--chat`` on a plain prompt: the Instella chat template around one user turn, assistant turn open."""
    from instella_plugin.data.tokenizer import load_tokenizer
    from instella_plugin.inference.prompts import prompt_ids

    tok = load_tokenizer()
    ids = prompt_ids(tok, {"prompt": "Name a prime."}, chat=True)
    assert tok.decode(ids) == "<|endoftext|><|user|>\nName a prime.\n<|assistant|>\n"
    assert prompt_ids(tok, "Name a prime.", chat=False) == tok.encode("Name a prime.", add_special_tokens=False)
