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
