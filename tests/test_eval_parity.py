"""Evaluation against lm-eval-harness 0.4.13 on the same tiny model and the same local examples.

A tiny Instella model (2 layers, hidden 64, the real tokenizer) is written as a Hugging Face
directory; small task files in the public datasets' field layouts are written here (made-up
questions, not benchmark data). lm-eval's own ``HFLM`` scores lm-eval task YAMLs that point at the
same files; our evaluator (HF backend) must give the same per-example log-likelihoods (1e-4), the
same acc / acc_norm / acc_mutual_info per example, and the same greedy exact match on a generation
task. The helpers here (``write_tiny_model``, ``write_task_data``) serve the other eval tests too.
"""
import json
import math
import random

import pytest
import torch

from instella_plugin.evaluation.hf_backend import HFBackend
from instella_plugin.evaluation.runner import evaluate
from instella_plugin.evaluation.task_config import load_task, task_from_dict
from instella_plugin.hf import formats
from instella_plugin.hf.outputs import write_json
from instella_plugin.hf.safetensors_io import ShardedWriter
from instella_plugin.hf.tokenizer_files import write_tokenizer_files
from instella_plugin.model.config import InstellaConfig
from instella_plugin.model.weight_map import hf_shapes

TINY = InstellaConfig(num_layers=2, hidden_size=64, num_attention_heads=2, num_query_groups=2,
                      ffn_hidden_size=128, vocab_size=50280, padded_vocab_size=50304, seq_length=1024,
                      rotary_base=10000.0, preset="eval-test")


def write_tiny_model(path, seed=0):
    """An Instella HF directory with random weights (norms near 1) and the real tokenizer files."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    plan = formats.export_plan(TINY, "instella", torch.float32)
    shapes = hf_shapes(TINY)
    writer = ShardedWriter(str(path), plan)
    for name, shape, _ in plan:
        inst = next(n for n in shapes if formats.file_name(n, "instella") == name)
        t = 1 + 0.1 * torch.randn(shape, generator=g) if inst.endswith("norm.weight") else \
            torch.randn(shape, generator=g) * (2.0 / math.sqrt(shape[-1]))
        writer.write(name, t)
    writer.finish()
    write_json(str(path / "config.json"), formats.config_json(TINY, "instella", rope_theta=TINY.rotary_base,
                                                              max_positions=TINY.seq_length, dtype=torch.float32))
    write_tokenizer_files(str(path), None, max_length=TINY.seq_length)
    return path


WORDS = ("river stone cloud lamp garden engine window pepper violin copper meadow rocket candle falcon "
         "harbor pencil marble orchard thunder basket").split()


def _phrase(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_task_data(root, n=12, seed=0):
    """Made-up examples in the field layouts of the suite's datasets, under ``root``."""
    rng = random.Random(seed)
    arc = lambda i: {"id": f"q{i}", "question": f"Which {_phrase(rng, 3)} is {_phrase(rng, 2)}?",  # noqa: E731
                     "choices": {"text": [_phrase(rng, rng.randint(1, 4)) for _ in range(4)],
                                 "label": ["A", "B", "C", "D"]}, "answerKey": rng.choice("ABCD")}
    for name in ("ARC-Challenge", "ARC-Easy"):
        _jsonl(root / "allenai/ai2_arc" / name / "test.jsonl", [arc(i) for i in range(n)])
    _jsonl(root / "aps/super_glue/boolq/validation.jsonl",
           [{"question": f"is the {_phrase(rng, 2)} {_phrase(rng, 1)}", "passage": _phrase(rng, 12), "idx": i,
             "label": rng.randint(0, 1)} for i in range(n)])
    _jsonl(root / "Rowan/hellaswag/validation.jsonl",
           [{"ind": i, "activity_label": _phrase(rng, 1).title(), "ctx_a": _phrase(rng, 6) + ".",
             "ctx_b": "then " + _phrase(rng, 2), "ctx": "", "endings": [_phrase(rng, rng.randint(2, 6)) + " [title] x"
                                                                        for _ in range(4)],
             "source_id": "s", "split": "val", "split_type": "indomain", "label": str(rng.randint(0, 3))}
            for i in range(n)])
    _jsonl(root / "baber/piqa/validation.jsonl",
           [{"goal": f"How to {_phrase(rng, 3)}?", "sol1": _phrase(rng, 5), "sol2": _phrase(rng, 4),
             "label": rng.randint(0, 1)} for i in range(n)])
    _jsonl(root / "allenai/sciq/test.jsonl",
           [{"question": f"What {_phrase(rng, 3)}?", "distractor1": _phrase(rng, 1), "distractor2": _phrase(rng, 2),
             "distractor3": _phrase(rng, 1), "correct_answer": _phrase(rng, 2), "support": " " + _phrase(rng, 10)}
            for i in range(n)])
    _jsonl(root / "allenai/winogrande/winogrande_xl/validation.jsonl",
           [{"sentence": f"The {_phrase(rng, 2)} saw the _ {_phrase(rng, 3)}.", "option1": _phrase(rng, 1),
             "option2": _phrase(rng, 2), "answer": rng.choice("12")} for i in range(n)])
    _jsonl(root / "allenai/openbookqa/main/test.jsonl",
           [{"id": f"o{i}", "question_stem": f"A {_phrase(rng, 4)} can", "choices": {
               "text": [_phrase(rng, 2) for _ in range(4)], "label": ["A", "B", "C", "D"]},
             "answerKey": rng.choice("ABCD")} for i in range(n)])
    subjects = ["college_physics", "world_religions"]
    mmlu = lambda i, s: {"question": f"{_phrase(rng, 5)}?", "subject": s,  # noqa: E731
                         "choices": [_phrase(rng, 2) for _ in range(4)], "answer": rng.randint(0, 3)}
    _jsonl(root / "cais/mmlu/all/test.jsonl", [mmlu(i, subjects[i % 2]) for i in range(n)])
    _jsonl(root / "cais/mmlu/all/dev.jsonl", [mmlu(i, s) for s in subjects for i in range(5)])

    def gsm(i):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return {"question": f"A {_phrase(rng, 1)} has {a} {_phrase(rng, 1)}s and gets {b} more. How many?",
                "answer": f"It has {a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\nSo {a + b} in all.\n#### {a + b}"}
    _jsonl(root / "openai/gsm8k/main/test.jsonl", [gsm(i) for i in range(n)])
    _jsonl(root / "openai/gsm8k/main/train.jsonl", [gsm(i) for i in range(20)])
    _jsonl(root / "HuggingFaceH4/MATH-500/test.jsonl",
           [{"problem": f"What is {i} + {i + 1}?", "solution": f"It is $\\boxed{{{2 * i + 1}}}$.",
             "answer": str(2 * i + 1), "subject": "Algebra", "level": 1, "unique_id": f"m{i}"} for i in range(n)])
    for sub in load_task("bbh").subtasks:
        _jsonl(root / "lukaemon/bbh" / sub / "test.jsonl",
               [{"input": f"{_phrase(rng, 6)} is", "target": rng.choice(["True", "False", "(A)", "(B)"])}
                for i in range(2)])
        shots = "\n\n".join(f"Q: {_phrase(rng, 5)} is\nA: Let's think step by step.\n{_phrase(rng, 8)}. "
                            f"So the answer is {rng.choice(['True', 'False'])}." for _ in range(3))
        prompt = root / "suzgunmirac/BIG-Bench-Hard/cot-prompts" / f"{sub}.txt"
        prompt.parent.mkdir(parents=True, exist_ok=True)
        prompt.write_text(f"BBH canary line\n-----\nDecide {sub.replace('_', ' ')}.\n\n{shots}")
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("taskdata"))


LM_EVAL_TASKS = {  # our task -> (lm-eval's task YAML under lm_eval/tasks, split, data file under the data dir)
    "arc_challenge": ("arc/arc_challenge.yaml", "test", "allenai/ai2_arc/ARC-Challenge/test.jsonl"),
    "boolq": ("super_glue/boolq/default.yaml", "validation", "aps/super_glue/boolq/validation.jsonl"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", "Rowan/hellaswag/validation.jsonl"),
    "piqa": ("piqa/piqa.yaml", "validation", "baber/piqa/validation.jsonl"),
    "sciq": ("sciq/sciq.yaml", "test", "allenai/sciq/test.jsonl"),
    "winogrande": ("winogrande/default.yaml", "validation", "allenai/winogrande/winogrande_xl/validation.jsonl"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", "allenai/openbookqa/main/test.jsonl"),
}
MC_METRICS = ["acc", "acc_norm", "acc_mutual_info"]
GEN_TASK = {  # a greedy generation task, the same in both vocabularies
    "doc_to_text": "Q: {{question}}\nA:", "doc_to_target": "{{ answer | after('####') | trim }}",
}


def _lm_eval_yaml(folder, ours, data_dir):
    import lm_eval

    rel, split, data = LM_EVAL_TASKS[ours]
    base = f"{lm_eval.__path__[0]}/tasks/{rel}"
    metrics = "".join(f"\n  - metric: {m}" for m in MC_METRICS)
    (folder / f"p_{ours}.yaml").write_text(
        f"include: {base}\ntask: p_{ours}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    {split}: {data_dir / data}\n"
        f"training_split: null\nvalidation_split: {split if split == 'validation' else 'null'}\n"
        f"test_split: {split if split == 'test' else 'null'}\nmetric_list:{metrics}\n")


def _lm_eval_gen_yaml(folder, data_dir):
    (folder / "p_gen.yaml").write_text(
        "task: p_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data_dir / 'openai/gsm8k/main/test.jsonl'}\noutput_type: generate_until\ntest_split: test\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: \"{{answer.split('####')[-1].strip()}}\"\n"
        "generation_kwargs:\n  until: [\"Q:\", \"\\n\\n\"]\n  do_sample: false\n  max_gen_toks: 24\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def lm_eval_run(tiny_dir, data_dir, tmp_path_factory):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lmeval_tasks")
    for ours in LM_EVAL_TASKS:
        _lm_eval_yaml(folder, ours, data_dir)
    _lm_eval_gen_yaml(folder, data_dir)
    lm = HFLM(pretrained=str(tiny_dir), dtype="float32", batch_size=4, device="cpu")
    out = simple_evaluate(model=lm, tasks=[f"p_{t}" for t in LM_EVAL_TASKS] + ["p_gen"], num_fewshot=0,
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                          log_samples=True, limit=6)
    return {name[2:]: sorted(samples, key=lambda s: s["doc_id"]) for name, samples in out["samples"].items()}


@pytest.fixture(scope="module")
def ours_run(tiny_dir, data_dir):
    from dataclasses import replace

    tasks = [replace(load_task(t), metrics=tuple(MC_METRICS)) for t in LM_EVAL_TASKS]
    gen = task_from_dict({"name": "gen", "output": "generate", "dataset": {"path": "openai/gsm8k", "name": "main"},
                          "test_split": "test", **GEN_TASK, "metrics": ["exact_match"],
                          "generation": {"max_new_tokens": 24, "until": ["Q:", "\n\n"]},
                          "answer": {"fallback": "text"}}, "parity-gen")
    backend = HFBackend(str(tiny_dir), batch_size=5)
    return evaluate(tasks + [gen], backend, str(data_dir), limit=6)


@pytest.mark.parametrize("task", list(LM_EVAL_TASKS))
def test_multiple_choice_matches_lm_eval_per_example(task, lm_eval_run, ours_run):
    theirs, ours = lm_eval_run[task], ours_run["samples"][task]
    assert len(theirs) == len(ours) == 6
    worst = 0.0
    for t, o in zip(theirs, ours):
        n = len(o["lls"])
        lls = [r[0][0] for r in t["resps"]]
        assert len(lls) == 2 * n  # conditional, then unconditional (acc_mutual_info)
        worst = max(worst, max(abs(a - b) for a, b in zip(lls, o["lls"] + o["lls_uncond"])))
        assert [bool(r[0][1]) for r in t["resps"][:n]] == o["is_greedy"]
        for m in MC_METRICS:
            assert t[m] == o["metrics"][m], (task, t["doc_id"], m)
    print(f"{task}: max |loglikelihood difference| vs lm-eval {worst:.2e}")
    assert worst < 1e-4


def test_greedy_generation_matches_lm_eval(lm_eval_run, ours_run):
    theirs, ours = lm_eval_run["gen"], ours_run["samples"]["gen"]
    assert len(theirs) == len(ours) == 6
    for t, o in zip(theirs, ours):
        assert t["resps"][0][0] == o["responses"][0]
        assert t["exact_match"] == o["metrics"]["exact_match"]
    assert sum(len(o["responses"][0]) for o in ours) > 0


MMLU_SUBJECTS = ("college_physics", "world_religions")


@pytest.fixture(scope="module")
def lm_eval_mmlu(tiny_dir, data_dir, tmp_path_factory):
    """lm-eval's own 5-shot MMLU subject tasks on our fixture's questions, split into per-subject files."""
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lmeval_mmlu")
    for subject in MMLU_SUBJECTS:
        for split in ("test", "dev"):
            rows = [line for line in (data_dir / f"cais/mmlu/all/{split}.jsonl").read_text().splitlines()
                    if json.loads(line)["subject"] == subject]
            (folder / f"{subject}_{split}.jsonl").write_text("\n".join(rows) + "\n")
        (folder / f"p_mmlu_{subject}.yaml").write_text(
            f"include: {lm_eval.__path__[0]}/tasks/mmlu/default/mmlu_{subject}.yaml\ntask: p_mmlu_{subject}\n"
            f"tag: []\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
            f"    test: {folder / f'{subject}_test.jsonl'}\n    dev: {folder / f'{subject}_dev.jsonl'}\n")
    lm = HFLM(pretrained=str(tiny_dir), dtype="float32", batch_size=4, device="cpu")
    out = simple_evaluate(model=lm, tasks=[f"p_mmlu_{s}" for s in MMLU_SUBJECTS], num_fewshot=5,
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                          log_samples=True, limit=3)
    return {s: sorted(out["samples"][f"p_mmlu_{s}"], key=lambda x: x["doc_id"]) for s in MMLU_SUBJECTS}


def test_mmlu_five_shot_matches_lm_eval_per_example(tiny_dir, data_dir, lm_eval_mmlu):
    ours = evaluate([load_task("mmlu")], HFBackend(str(tiny_dir), batch_size=4), str(data_dir), limit=6)
    by_subject = {s: [r for k, r in enumerate(ours["samples"]["mmlu"]) if MMLU_SUBJECTS[k % 2] == s]
                  for s in MMLU_SUBJECTS}   # the fixture alternates the two subjects
    worst = 0.0
    for subject in MMLU_SUBJECTS:
        theirs = lm_eval_mmlu[subject]
        assert len(theirs) == len(by_subject[subject]) == 3
        for t, o in zip(theirs, by_subject[subject]):
            lls = [r[0][0] for r in t["resps"]]
            worst = max(worst, max(abs(a - b) for a, b in zip(lls, o["lls"], strict=True)))
            assert t["acc"] == o["metrics"]["acc"], (subject, t["doc_id"])
    print(f"mmlu 5-shot: max |loglikelihood difference| vs lm-eval {worst:.2e}")
    assert worst < 1e-4
