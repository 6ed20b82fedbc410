"""A task's examples as text: the prompt (few-shot prefix included), the choices and the gold answer.

Prompts are built as lm-eval builds them: ``description`` + each shot (``doc_to_text``,
``target_delimiter``, its answer, ``fewshot_delimiter``) + ``doc_to_text`` of the example. Multiple
choice puts each choice in the continuation (``target_delimiter`` + choice) or, with
``choices_in: context`` (WinoGrande's partial scoring), each choice in the context and the rest of
the sentence in the continuation. Shots are drawn from the few-shot split by a generator seeded with
(seed, task, subtask, example index), so an example's prompt does not depend on ``--limit``, on the
other examples or on the data-parallel rank; ``fewshot_sampler: first_n`` takes the pool's first shots
in order instead (MMLU, as lm-eval and the MMLU paper do). With ``fewshot_group_by`` shots come from
examples with the same value of that field (MMLU's subject). BBH's shots come from its chain-of-thought prompt file.
"""
import random
from dataclasses import dataclass
from typing import Dict, List, Optional

from instella_plugin.evaluation import templates
from instella_plugin.evaluation.task_config import TaskConfig
from instella_plugin.evaluation.task_data import TaskDataError, load_split, read_text


@dataclass
class Example:
    task: str
    part: Optional[str]
    index: int
    contexts: List[str]          # multiple choice: one per request; generation: [prompt]
    continuations: List[str]
    choices: List[str]           # multiple choice: the choice strings (their lengths normalise acc_norm)
    gold: object                 # multiple choice: index; generation: answer text


def prompt_file_shots(text: str, source: str, num_fewshot: int) -> str:
    """The description and shots of a BBH chain-of-thought prompt file, as a prompt prefix."""
    body = text.split("\n-----\n")[-1].strip("\n")
    description, *shots = body.split("\n\n")
    if len(shots) != num_fewshot:
        raise TaskDataError(f"{source} holds {len(shots)} shots (blocks separated by a blank line after the "
                            f"description); the task asks for num_fewshot {num_fewshot}")
    return description + "\n\n" + "".join(s + "\n\n" for s in shots)


def _gold_index(cfg: TaskConfig, doc: dict, n_choices: int, where: str) -> int:
    gold = templates.evaluate(cfg.doc_to_target, doc)
    if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
        gold = int(gold)
    if not isinstance(gold, int) or not 0 <= gold < n_choices:
        raise TaskDataError(f"{where}: doc_to_target {cfg.doc_to_target!r} gives {gold!r}, not a choice index "
                            f"in [0, {n_choices})")
    return gold


def _choices(cfg: TaskConfig, doc: dict, where: str) -> List[str]:
    choices = templates.evaluate(cfg.doc_to_choice, doc)
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise TaskDataError(f"{where}: doc_to_choice {cfg.doc_to_choice!r} gives {choices!r}, not a list of "
                            "two or more strings")
    return list(choices)


def shot_text(cfg: TaskConfig, doc: dict, where: str) -> str:
    """One solved shot, without the trailing fewshot_delimiter."""
    text = templates.render(cfg.doc_to_text, doc)
    if cfg.fewshot_target:
        return text + cfg.target_delimiter + templates.render(cfg.fewshot_target, doc)
    if cfg.output == "generate":
        return text + cfg.target_delimiter + templates.render(cfg.doc_to_target, doc)
    choices = _choices(cfg, doc, where)
    answer = choices[_gold_index(cfg, doc, len(choices), where)]
    return answer + cfg.target_delimiter + text if cfg.choices_in == "context" else text + cfg.target_delimiter + answer


class ShotSampler:
    """Seeded few-shot draws from a pool of examples (optionally grouped by a field)."""

    def __init__(self, cfg: TaskConfig, part: Optional[str], pool: List[dict], same_split: bool, where: str):
        self.cfg, self.part, self.pool, self.same_split, self.where = cfg, part, pool, same_split, where
        self.groups: Dict[object, List[int]] = {}
        for i, doc in enumerate(pool):
            key = doc.get(cfg.fewshot_group_by) if cfg.fewshot_group_by else None
            self.groups.setdefault(key, []).append(i)

    def prefix(self, doc: dict, index: int) -> str:
        cfg = self.cfg
        key = doc.get(cfg.fewshot_group_by) if cfg.fewshot_group_by else None
        candidates = [i for i in self.groups.get(key, []) if not (self.same_split and i == index)]
        if len(candidates) < cfg.num_fewshot:
            group = f" with {cfg.fewshot_group_by} = {key!r}" if cfg.fewshot_group_by else ""
            raise TaskDataError(f"{self.where}: num_fewshot {cfg.num_fewshot} but the few-shot split "
                                f"{cfg.fewshot_split!r} holds {len(candidates)} example(s){group}")
        if cfg.fewshot_sampler == "first_n":
            picks = candidates[:cfg.num_fewshot]
        else:
            picks = random.Random(f"{cfg.fewshot_seed}/{cfg.name}/{self.part}/{index}").sample(candidates, cfg.num_fewshot)
        return "".join(shot_text(cfg, self.pool[i], self.where) + cfg.fewshot_delimiter for i in picks)


def build_examples(cfg: TaskConfig, data_dir: Optional[str], limit: Optional[int] = None) -> List[Example]:
    """All examples of a task (each subtask's first ``limit``), prompts rendered; errors before any model work."""
    out = []
    ds = cfg.dataset
    for part in cfg.parts:
        where = f"task {cfg.name}" + (f" ({part})" if cfg.subtasks else "")
        docs = load_split(data_dir, ds["path"], part, cfg.test_split)
        if limit is not None:
            docs = docs[:limit]
        file_prefix, sampler = "", None
        if cfg.num_fewshot and cfg.fewshot_file:
            rel = cfg.fewshot_file.format(subtask=part)
            file_prefix = prompt_file_shots(read_text(data_dir, rel), rel, cfg.num_fewshot)
        elif cfg.num_fewshot:
            same = cfg.fewshot_split == cfg.test_split
            pool = docs if same and limit is None else load_split(data_dir, ds["path"], part, cfg.fewshot_split)
            sampler = ShotSampler(cfg, part, pool, same, where)
        for index, doc in enumerate(docs):
            here = f"{where} example {index}"
            prefix = templates.render(cfg.description, doc) + file_prefix
            if sampler is not None:
                prefix += sampler.prefix(doc, index)
            text = templates.render(cfg.doc_to_text, doc)
            if cfg.output == "generate":
                out.append(Example(cfg.name, part, index, [prefix + text], [""], [],
                                   templates.render(cfg.doc_to_target, doc)))
                continue
            choices = _choices(cfg, doc, here)
            gold = _gold_index(cfg, doc, len(choices), here)
            if cfg.choices_in == "context":
                contexts = [prefix + c for c in choices]
                continuations = [cfg.target_delimiter + text] * len(choices)
            else:
                contexts = [prefix + text] * len(choices)
                continuations = [cfg.target_delimiter + c for c in choices]
            out.append(Example(cfg.name, part, index, contexts, continuations, choices, gold))
    if not out:
        raise TaskDataError(f"task {cfg.name}: the {cfg.test_split!r} split holds no examples")
    return out
