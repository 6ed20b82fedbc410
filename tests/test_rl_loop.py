"""GRPO end to end on CPU: bad input refused before anything is built, the loop's parts, a tiny multi-step
run at TP=2 whose reward rises, and an interrupted run that resumes into the uninterrupted one's steps.

The toy task (the tests generate it): prompts "Q: a+b=" from the real tokenizer, a randomly initialised
tiny Instella, and a dense reward the untrained policy can already find (the share of response tokens
that are numbers: about 4 % of the vocabulary), so that a few dozen GRPO updates visibly move it. The
math reward itself is covered by ``test_rl_reward.py``; here the loop takes its reward as a parameter.
The learning test instead trains on arithmetic identities ("37+0=", "0*12=") with the math reward and
measures `instella eval` pass@1 on held-out problems of the same forms (``IDENTITY_FORMS`` below).
"""
import json
import os
import re

import pytest
import torch

from instella_plugin.rl.loop import Rollouts, token_budget_groups
from instella_plugin.rl.prompts import load_problems, problem_order
from instella_plugin.testing.distributed import free_port, run_distributed
from instella_plugin.training.arguments import parse_args

MODEL = ["--plugin", "instella", "--model-preset", "instella-test", "--num-layers", "2", "--hidden-size", "64",
         "--num-attention-heads", "4", "--ffn-hidden-size", "128", "--vocab-size", "50280",
         "--padded-vocab-size", "50304", "--seq-length", "64", "--device", "cpu", "--tensor-model-parallel-size", "2",
         "--min-lr", "0", "--lr-decay-style", "constant", "--weight-decay", "0.0", "--adam-beta2", "0.99",
         "--seed", "7"]
TINY = MODEL + ["--dataset-type", "grpo", "--lr", "3e-3"]


def _write_prompts(path, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = (int(x) for x in torch.randint(0, 50, (2,), generator=g))
            f.write(json.dumps({"prompt": f"Q: {a}+{b}=", "answer": str(a + b)}) + "\n")
    return str(path)


def _grpo_args(prompts, *extra):
    return TINY + ["--data-path", prompts, "--no-grpo-chat-template", "--grpo-group-size", "8",
                   "--grpo-prompts-per-step", "8", "--global-batch-size", "32", "--grpo-max-prompt-tokens", "16",
                   "--grpo-max-response-tokens", "4", "--grpo-micro-batch-tokens", "128",
                   "--grpo-kl-beta", "0.001", *map(str, extra)]


# ---- bad input: refused while the arguments are read ---------------------------------------------------
@pytest.mark.parametrize("change,message", [
    ({"--grpo-group-size": "1"}, "at least 2 rollouts per prompt"),
    ({"--grpo-dual-clip": "0.5"}, "--grpo-dual-clip 0.5: .* c must be > 1 .*give 0 to turn it off"),
    ({"--grpo-prompts-per-step": "6"}, "a mini-batch of 4 prompts .* does not divide --grpo-prompts-per-step 6"),
    ({"--global-batch-size": "30"}, "--global-batch-size 30 .* is not a multiple of --grpo-group-size 8"),
    ({"--grpo-max-response-tokens": "60"}, "16 \\+ --grpo-max-response-tokens 60 = 76 is beyond the context"),
    ({"--grpo-answer-key": "solution"}, "no field 'solution' \\(--grpo-answer-key\\); the rows have \\['answer', 'prompt'\\]"),
    ({"--data-path": "/nonexistent.jsonl"}, "prompt file /nonexistent.jsonl does not exist"),
    ({"--pipeline-model-parallel-size": "2"}, "use tensor and data parallelism \\(PP = CP = 1\\)"),
    ({"--train-iters": "5"}, "--train-iters 5 counts optimizer updates; a GRPO step makes 2"),
])
def test_bad_grpo_command_lines_fail_before_anything_is_built(tmp_path, monkeypatch, change, message):
    monkeypatch.setenv("WORLD_SIZE", "4" if "--pipeline-model-parallel-size" in change else "2")
    argv = _grpo_args(_write_prompts(tmp_path / "p.jsonl"), "--train-iters", "4")
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert re.search(message, str(e.value)), str(e.value)


def test_rows_without_answers_and_a_missing_data_path(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n{"prompt": "3+3=", "answer": ""}\n')
    with pytest.raises(SystemExit, match="bad.jsonl row 1: no answer \\(field 'answer'\\)"):
        parse_args(_grpo_args(str(bad), "--train-iters", "4"))
    argv = _grpo_args("x", "--train-iters", "4")
    argv = argv[:argv.index("--data-path")] + argv[argv.index("--data-path") + 2:]
    with pytest.raises(SystemExit, match="--dataset-type grpo needs --data-path FILE"):
        parse_args(argv)


# ---- the loop's parts ------------------------------------------------------------------------------
def test_prompt_loading_filters_long_prompts_and_orders_by_seed(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"q": "word " * k, "a": str(k)}) + "\n" for k in (1, 3, 30, 2)))
    problems, too_long = load_problems(str(path), None, "q", "a", max_prompt_tokens=10, chat_template=False)
    assert too_long == 1 and [p.answer for p in problems] == ["1", "3", "2"]
    chat, _ = load_problems(str(path), None, "q", "a", max_prompt_tokens=100, chat_template=True)
    assert chat[0].prompt_ids[0] == 0 and len(chat[0].prompt_ids) > len(problems[0].prompt_ids)  # BOS, markers
    first = problem_order(5, seed=3, start=0, count=12)
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))  # each epoch a permutation
    assert problem_order(5, seed=3, start=7, count=5) == first[7:12]  # a resumed run sees the same problems
    assert first[:5] != first[5:10] or first[:5] != problem_order(5, seed=4, start=0, count=5)


def test_parquet_rows_and_chat_message_prompts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "1+1?", "solution": "2"}, {"problem": "2+3?", "solution": "5"}]),
                   str(path))
    problems, too_long = load_problems(str(path), None, "problem", "solution", max_prompt_tokens=64)
    assert too_long == 0 and [p.answer for p in problems] == ["2", "5"]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "1+1?"}], "answer": 2}) + "\n")
    (problem,), _ = load_problems(str(chat), None, "prompt", "answer", max_prompt_tokens=64)
    from instella_plugin.data.tokenizer import load_tokenizer

    text = load_tokenizer().decode(problem.prompt_ids)
    assert text == "<|endoftext|><|system|>\nBe brief.\n<|user|>\n1+1?\n<|assistant|>\n" and problem.answer == "2"


def test_token_budget_groups_and_response_masks():
    assert token_budget_groups([10, 10, 10, 30, 5], budget=30) == [[0, 1, 2], [3], [4]]
    assert token_budget_groups([50], budget=10) == [[0]]  # a longer row goes alone

    class C:  # a completion: prompt [7, 8, 9], response [4, 5]
        prompt_tokens, tokens, finish_reason = (7, 8, 9), (4, 5), "eos"

    r = Rollouts([C(), C()], [1.0, 0.0], group_size=2)
    f = r.fields(0)
    assert f["tokens"] == [7, 8, 9, 4] and f["labels"] == [8, 9, 4, 5]
    assert f["loss_mask"] == [0.0, 0.0, 1.0, 1.0]  # the labels 4 and 5 are the response
    assert r.advantages[0] > 0 > r.advantages[1]


# ---- end to end ------------------------------------------------------------------------------------
def number_share(response: str, answer: str) -> float:
    """The toy reward: the share of whitespace-separated words of the response that are numbers."""
    words = response.split()
    return sum(w.isdigit() for w in words) / len(words) if words else 0.0


def _run(argv):
    from instella_plugin.rl.loop import grpo

    run, plugin = parse_args(argv)
    return grpo(run, plugin, plugin.grpo_settings(run), reward_fn=number_share)


def _save_initial(argv, path):
    """The starting weights as a checkpoint (iteration 0): the run's --pretrained-checkpoint and KL reference."""
    from instella_plugin.training.trainer import Trainer

    at = argv.index("--pretrained-checkpoint")
    run, plugin = parse_args(argv[:at] + argv[at + 2:] + ["--save", path])
    Trainer(run, plugin).save()


# The learning task: identities of arithmetic ("37+0=", "0*12=", "5-5=", ...), 8 forms x the numbers 2..49, whose
# answer is one of the operands or 0 (numbers below 100 are single tokens, the same in prompt and answer).
# The skill is shared across problems (per form: which operand, or 0), so a policy that learns it on the training
# problems answers the held-out ones (other numbers in the same forms) alike; 288 training problems are more than
# the 16 x 8 prompts GRPO sees, so it cannot memorise them. Each form's wrong answer is its other operand.
IDENTITY_FORMS = (("{a}+0=", "a", "0"), ("0+{a}=", "a", "0"), ("{a}-0=", "a", "0"), ("{a}*1=", "a", "1"),
                  ("1*{a}=", "a", "1"), ("{a}*0=", "0", "a"), ("0*{a}=", "0", "a"), ("{a}-{a}=", "0", "a"))


def _write_identity_problems(train_path, held_out_path, held_out_share=4):
    """All 384 problems in a seeded order; every ``held_out_share``-th is held out (a quarter: 96), the rest
    (288) train. Rows carry the answer and the form's wrong answer (the noisy SFT's other target)."""
    import random

    rows = [{"prompt": f.format(a=a), "answer": str(a) if right == "a" else right,
             "wrong": str(a) if wrong == "a" else wrong} for a in range(2, 50) for f, right, wrong in IDENTITY_FORMS]
    random.Random(0).shuffle(rows)
    held = rows[::held_out_share]
    train = [r for i, r in enumerate(rows) if i % held_out_share]
    for path, part in ((train_path, train), (held_out_path, held)):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return str(train_path), str(held_out_path)


def _sft_on_noisy_answers(prompts, path, steps=100, batch=64):
    """A brief SFT of the tiny model (LM objective, Trainer.train_step on our own batches, ``batch`` sequences
    drawn at random each step) on "\\boxed{N}" answers that are right for half the samples and the form's wrong
    answer for the other half, saved to ``path``: a policy that answers about 50 % correctly at best (about
    40 % after this many steps), which GRPO with the math reward can sharpen."""
    from instella_plugin.data.tokenizer import load_tokenizer
    from instella_plugin.training.trainer import Trainer

    tok = load_tokenizer()
    rows = [json.loads(line) for line in open(prompts, encoding="utf-8")]
    seqs = []
    for row in rows:
        for answer in (row["answer"], row["wrong"]):
            p, r = tok.encode(row["prompt"]), tok.encode(f"\\boxed{{{answer}}}") + [tok.eos_token_id]
            seqs.append((p + r, len(p)))
    width = max(len(q) for q, _ in seqs) - 1
    tokens = torch.ones(len(seqs), width, dtype=torch.long)
    labels = torch.ones(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width)
    for i, (q, n) in enumerate(seqs):
        tokens[i, :len(q) - 1], labels[i, :len(q) - 1] = torch.tensor(q[:-1]), torch.tensor(q[1:])
        mask[i, n - 1:len(q) - 1] = 1.0
    positions = torch.arange(width).expand(batch, -1)
    run, plugin = parse_args(MODEL + ["--mock-data", "--lr", "1e-2", "--train-iters", str(steps), "--global-batch-size",
                                      str(batch), "--micro-batch-size", str(batch), "--save", path])
    trainer = Trainer(run, plugin)
    g = torch.Generator().manual_seed(1)  # the same draws on every rank
    losses = []
    for _ in range(steps):
        pick = torch.randperm(len(seqs), generator=g)[:batch]
        losses.append(trainer.train_step([dict(tokens=tokens[pick], labels=labels[pick], loss_mask=mask[pick],
                                               position_ids=positions)])["loss"])
    trainer.save()
    return losses


GRPO_STEPS = 24
# Observed (this seed, 2-core CPU): held-out pass@1 0.306 at the SFT start -> 0.411 after 24 steps (lr 1e-3, 16
# prompts a step); lr 2e-3 for 32 steps gave 0.395, lr 3e-3 with 8 prompts a step for 32 steps 0.419 (unstable).
HELD_OUT_RISE = 0.06


def _learning_worker(prompts, out):
    import time

    t0 = time.time()
    init = os.path.join(out, "sft")
    sft_losses = _sft_on_noisy_answers(prompts, init)
    t1 = time.time()
    from instella_plugin.rl.loop import grpo

    run, plugin = parse_args(_grpo_args(prompts, "--train-iters", 2 * GRPO_STEPS, "--finetune", "--pretrained-checkpoint",
                                        init, "--save", os.path.join(out, "run"), "--grpo-samples-interval", "8",
                                        "--grpo-max-response-tokens", "8", "--lr", "1e-3",
                                        "--grpo-prompts-per-step", "16", "--global-batch-size", "64"))
    res = grpo(run, plugin, plugin.grpo_settings(run))  # the math reward (DeepScaleR's rule)
    records = {k: {s: r[k] for s, r in res["records"].items()} for k in ("accuracy", "reward_mean", "kl")}
    return {"sft_losses": sft_losses[::10], "sft_s": t1 - t0, "grpo_s": time.time() - t1, **records}


@pytest.mark.slow
def test_held_out_accuracy_rises_over_a_tiny_sft_then_grpo_run_at_tp2(tmp_path):
    prompts, held_out = _write_identity_problems(tmp_path / "train.jsonl", tmp_path / "held_out.jsonl")
    train_prompts = {json.loads(line)["prompt"] for line in open(prompts)}
    assert len(train_prompts) == 288 and not train_prompts & {json.loads(line)["prompt"] for line in open(held_out)}
    rank0, _ = run_distributed(_learning_worker, 2, prompts, str(tmp_path), tp=2)
    acc = rank0["accuracy"]
    first = sum(acc[s] for s in range(1, 5)) / 4
    last = sum(acc[s] for s in range(GRPO_STEPS - 7, GRPO_STEPS + 1)) / 8  # 16 x 8 fresh rollouts a step: noisy
    print(f"SFT {rank0['sft_s']:.0f} s, loss every 10 steps: {[round(x, 3) for x in rank0['sft_losses']]}")
    print(f"GRPO {rank0['grpo_s']:.0f} s; training accuracy (math reward) by step: {[round(acc[s], 3) for s in sorted(acc)]}")
    print(f"steps 1-4: {first:.3f}; steps {GRPO_STEPS - 7}-{GRPO_STEPS}: {last:.3f}")
    assert 0.2 < first < 0.6  # the noisy SFT leaves both answers likely
    assert last > first + 0.12, acc
    assert rank0["reward_mean"] == acc  # the rule reward is 0/1: its mean is the accuracy
    assert all(v >= 0 for v in rank0["kl"].values()) and max(rank0["kl"].values()) > 0
    log = [json.loads(line) for line in open(tmp_path / "run" / "grpo_log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, GRPO_STEPS + 1))
    samples = [json.loads(line) for line in open(tmp_path / "run" / "grpo_rollouts.jsonl")]
    assert {s["step"] for s in samples} == {1, 8, 16, 24} and len(samples) == 4 * 128
    assert all(s["reward"] in (0.0, 1.0) for s in samples) and {s["prompt"] for s in samples} <= train_prompts
    assert os.path.getsize(tmp_path / "run" / "grpo_curves.png") > 0
    # `instella eval` on both checkpoints: pass@1 over 8 samples of each of the 96 HELD-OUT problems (math checker)
    before, after = (_eval_pass_at_1(tmp_path, tmp_path / name, held_out) for name in ("sft", "run"))
    print(f"held-out instella eval pass@1 (96 problems x 8 samples): SFT start {before:.3f}, after GRPO {after:.3f}")
    assert 0.2 < before < 0.6 and after > before + HELD_OUT_RISE



def _eval_pass_at_1(tmp_path, checkpoint, prompts) -> float:
    import subprocess
    import sys

    data = tmp_path / "eval-data"
    (data / "toy-identities").mkdir(parents=True, exist_ok=True)
    (data / "toy-identities" / "test.jsonl").write_text(open(prompts, encoding="utf-8").read())
    task = tmp_path / "toy-identities.yaml"
    task.write_text("name: toy-identities\nversion: 1\noutput: generate\ndataset: {path: toy-identities}\n"
                    "test_split: test\nchat: false\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
                    "generation: {max_new_tokens: 8, temperature: 1.0, n: 8, seed: 99}\nchecker: math\n"
                    "metrics: [pass@1]\n")
    out = tmp_path / f"eval-{os.path.basename(checkpoint)}.json"
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    res = subprocess.run([sys.executable, "-m", "instella_plugin.evaluation.cli", "--load", str(checkpoint), "--tasks",
                          str(task), "--data-dir", str(data), "--output", str(out), "--dtype", "float32"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.load(open(out))["results"]["toy-identities"]["metrics"]["pass@1"]


def _resume_worker(prompts, out):
    init = os.path.join(out, "init")
    base = _grpo_args(prompts, "--train-iters", 2 * 4, "--finetune", "--pretrained-checkpoint", init, "--no-plot")
    _save_initial(base, init)
    straight = _run(base + ["--save", os.path.join(out, "straight")])["records"]
    killed = os.path.join(out, "killed")
    first = _run(base + ["--save", killed, "--load", killed, "--exit-interval", "2"])
    resumed = _run(base + ["--save", killed, "--load", killed])
    keys = ("reward_mean", "loss", "kl", "grad_norm", "clip_fraction", "entropy", "response_length_mean")
    return {"straight": {s: [r[k] for k in keys] for s, r in straight.items()},
            "first_stop": first["step"], "resumed": {s: [r[k] for k in keys] for s, r in resumed["records"].items()}}


@pytest.mark.slow
def test_an_interrupted_run_resumes_into_the_same_steps(tmp_path):
    prompts = _write_prompts(tmp_path / "p.jsonl")
    rank0, _ = run_distributed(_resume_worker, 2, prompts, str(tmp_path), tp=2)
    assert rank0["first_stop"] == 2 and sorted(rank0["resumed"]) == [3, 4]
    for step in (3, 4):
        assert rank0["resumed"][step] == rank0["straight"][step], step  # bitwise: weights, optimizer, data, seeds


@pytest.mark.slow
def test_pretrain_gpt_runs_grpo_from_the_command_line(tmp_path, tp=1):
    """`pretrain_gpt.py --dataset-type grpo` reaches the GRPO loop through the plugin (torchrun, 2 ranks at DP=2:
    each rank generates for its half of every mini-batch and the step's figures add up; TP=2 runs in the
    resubmission test below)."""
    from instella_plugin.testing.trainer import run_trainer

    prompts = _write_prompts(tmp_path / "p.jsonl")
    save = tmp_path / "run"
    proc = run_trainer(2, _grpo_args(prompts, "--train-iters", 4, "--save", save, "--no-plot",
                                     "--tensor-model-parallel-size", tp))
    assert "grpo: 16 prompts" in proc.stdout and "grpo step     2/2" in proc.stdout
    log = [json.loads(line) for line in open(save / "grpo_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2] and all(r["iteration"] == 2 * r["step"] for r in log)
    assert all(r["rollouts"] == 64 and r["response_length_mean"] > 0 for r in log)  # 8 prompts x 8, all ranks
    meta = json.load(open(save / "iter_0000004" / "instella_meta.json"))
    assert meta["grpo"] == {"step": 2, "reference": "the run's initial weights"}


@pytest.mark.parametrize("stage", [1, 3])
def test_example_launcher_prints_a_command_the_trainer_accepts(tmp_path, monkeypatch, stage):
    import shlex
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prompts = _write_prompts(tmp_path / "p.jsonl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", PYTHON=sys.executable, STAGE=str(stage), PROMPTS=prompts, INIT_FROM=str(tmp_path / "sft"),
               SAVE_DIR=str(tmp_path / "run"), TP="2")
    res = subprocess.run(["bash", os.path.join(root, "examples", "grpo.sh")], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert f"grpo-stage{stage}: TP=2 DP=4; each rank: 8 prompts" in res.stdout
    line = next(x for x in res.stdout.splitlines() if x.startswith(f"+ {sys.executable} -m torch.distributed.run"))
    words = shlex.split(line[2:])
    argv = words[words.index(os.path.join(root, "pretrain_gpt.py")) + 1:]
    monkeypatch.setenv("WORLD_SIZE", "8")
    run, plugin = parse_args(argv)
    settings = plugin.grpo_settings(run)
    assert (run.layout.tp, run.layout.dp, settings.rollout_batch, run.flags.pretrained_checkpoint) == \
        (2, 4, 16, str(tmp_path / "sft"))
    bad = subprocess.run(["bash", os.path.join(root, "examples", "grpo.sh")], capture_output=True, text=True,
                         env=dict(env, NPROC="6", TP="1"))
    assert bad.returncode == 2 and "DP=6, which must divide the 32 prompts" in bad.stderr


def _initial_checkpoint_worker(argv, path):
    _save_initial(argv + ["--pretrained-checkpoint", path], path)


@pytest.mark.slow
def test_a_resubmitted_command_line_run_continues_with_the_same_prompts_and_rollouts(tmp_path):
    """Across processes: a job stopped after step 1 and resubmitted samples step 2 exactly as an uninterrupted
    job does (data position and sampling seeds follow from the checkpoint's iteration)."""
    from instella_plugin.testing.trainer import run_trainer

    prompts = _write_prompts(tmp_path / "p.jsonl")
    init = str(tmp_path / "init")
    base = _grpo_args(prompts, "--train-iters", 4, "--no-plot", "--grpo-samples-interval", 1, "--finetune")
    run_distributed(_initial_checkpoint_worker, 2, base, init, tp=2)
    base += ["--pretrained-checkpoint", init]
    run_trainer(2, base + ["--save", tmp_path / "straight"])
    own = tmp_path / "own"
    run_trainer(2, base + ["--save", own, "--load", own, "--exit-interval", 1])
    proc = run_trainer(2, base + ["--save", own, "--load", own])
    assert "steps 1 -> 2" in proc.stdout

    def step2(run):
        rows = [json.loads(line) for line in open(tmp_path / run / "grpo_rollouts.jsonl")]
        return [(r["prompt"], r["response"], r["reward"]) for r in rows if r["step"] == 2]

    assert len(step2("straight")) == 64 and step2("own") == step2("straight")
