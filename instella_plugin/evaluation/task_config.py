"""Task and suite definitions: the YAML files under ``tasks/`` and ``suites/`` as frozen configs.

A task file holds lm-eval's vocabulary (``doc_to_text``, ``doc_to_choice``, ``doc_to_target``,
``target_delimiter``, ``fewshot_delimiter``, ``num_fewshot``, metrics) plus where its data live
(``dataset: {path, name}``; ``subtasks`` for families such as BBH whose parts are dataset configs).
Every key is checked when the file is read: an unknown key, a wrong type, a missing required key
or a template that does not parse is refused with the file's name, before any model is loaded.
"""
import os
from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Optional, Tuple

import yaml

from instella_plugin.evaluation import templates
from instella_plugin.evaluation.checkers import CHECKERS
from instella_plugin.evaluation.metrics import GENERATION_METRICS, MC_METRICS, parse_pass_at

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS_DIR = os.path.join(HERE, "tasks")
SUITES_DIR = os.path.join(HERE, "suites")
OUTPUTS = ("multiple_choice", "generate")


class TaskDefinitionError(ValueError):
    """A task or suite that does not exist or whose YAML is malformed."""


@dataclass(frozen=True)
class Generation:
    """Decoding of a generation task: greedy by default; ``n`` samples per prompt for pass@k."""
    max_new_tokens: int = 256
    until: Tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int = 1234


@dataclass(frozen=True)
class Answer:
    """Answer extraction: the ``regex`` group (first or last match); ``fallback`` when it finds nothing."""
    regex: Optional[str] = None
    group_select: str = "first"          # first | last
    fallback: str = "none"               # none (empty answer) | last_number | text
    normalize: Tuple[str, ...] = ("strip",)


@dataclass(frozen=True)
class TaskConfig:
    name: str
    output: str
    dataset: Dict[str, Optional[str]]
    test_split: str
    doc_to_text: str
    doc_to_target: str
    metrics: Tuple[str, ...]
    version: int = 1
    doc_to_choice: Optional[str] = None
    choices_in: str = "continuation"     # continuation (one context, n continuations) | context (winogrande)
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    fewshot_split: Optional[str] = None
    fewshot_file: Optional[str] = None   # a prompt file holding the shots (BBH's cot-prompts), {subtask} filled
    fewshot_target: Optional[str] = None  # how a shot's answer is written (CoT: the worked solution)
    fewshot_seed: int = 1234
    fewshot_sampler: str = "random"      # random (seeded per example) | first_n (the pool's first shots, in order)
    fewshot_group_by: Optional[str] = None  # draw shots among examples with the same value (MMLU's subject)
    subtasks: Tuple[str, ...] = ()
    generation: Generation = field(default_factory=Generation)
    answer: Answer = field(default_factory=Answer)
    checker: str = "exact_match"
    chat: bool = False                   # generation prompt through the tokenizer's chat template (instruct models)
    primary_metric: Optional[str] = None
    source: str = ""                     # the YAML file it came from

    @property
    def primary(self) -> str:
        return self.primary_metric or self.metrics[0]

    @property
    def parts(self) -> List[Optional[str]]:
        """The dataset configs read: each subtask, or the one ``dataset.name``."""
        return list(self.subtasks) or [self.dataset.get("name")]


_REQUIRED = ("name", "output", "dataset", "test_split", "doc_to_text", "doc_to_target", "metrics")
_NESTED = {"generation": Generation, "answer": Answer}


def _fail(source: str, msg: str):
    raise TaskDefinitionError(f"{source}: {msg}")


def _nested(cls, value, source, key):
    if not isinstance(value, dict):
        _fail(source, f"{key} must be a mapping, got {type(value).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        _fail(source, f"unknown key(s) {unknown} under {key}; known: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})


def task_from_dict(raw, source: str) -> TaskConfig:
    """A checked ``TaskConfig`` from a parsed YAML mapping."""
    if not isinstance(raw, dict):
        _fail(source, f"a task file holds a mapping of keys, got {type(raw).__name__}")
    known = {f.name for f in fields(TaskConfig)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        _fail(source, f"unknown key(s) {unknown}; known keys: {sorted(known)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        _fail(source, f"missing required key(s) {missing}")
    values = dict(raw)
    for key, cls in _NESTED.items():
        if key in values:
            values[key] = _nested(cls, values[key], source, key)
    for key in ("metrics", "subtasks"):
        if key in values:
            if not isinstance(values[key], list) or not values[key]:
                _fail(source, f"{key} must be a non-empty list")
            values[key] = tuple(values[key])
    if not isinstance(values["dataset"], dict) or "path" not in values["dataset"]:
        _fail(source, "dataset must be a mapping with a 'path' (and optionally a 'name')")
    cfg = TaskConfig(source=source, **values)
    _check(cfg)
    return cfg


def _check(cfg: TaskConfig) -> None:
    src = cfg.source
    if cfg.output not in OUTPUTS:
        _fail(src, f"output must be one of {OUTPUTS}, got {cfg.output!r}")
    allowed = MC_METRICS if cfg.output == "multiple_choice" else GENERATION_METRICS
    for m in cfg.metrics:
        if m not in allowed and not (cfg.output == "generate" and parse_pass_at(m)):
            _fail(src, f"metric {m!r} is not one of {sorted(allowed)}" +
                  (" or pass@K" if cfg.output == "generate" else "") + f" for a {cfg.output} task")
    if cfg.primary not in cfg.metrics:
        _fail(src, f"primary_metric {cfg.primary!r} is not among metrics {list(cfg.metrics)}")
    if cfg.output == "multiple_choice" and not cfg.doc_to_choice:
        _fail(src, "a multiple_choice task needs doc_to_choice (an expression giving the list of choices)")
    if cfg.choices_in not in ("continuation", "context"):
        _fail(src, f"choices_in must be 'continuation' or 'context', got {cfg.choices_in!r}")
    if cfg.chat and cfg.output != "generate":
        _fail(src, "chat: true applies to generation tasks only")
    if cfg.checker not in CHECKERS:
        _fail(src, f"checker {cfg.checker!r} is not one of {sorted(CHECKERS)}")
    if not isinstance(cfg.num_fewshot, int) or cfg.num_fewshot < 0:
        _fail(src, f"num_fewshot must be an integer >= 0, got {cfg.num_fewshot!r}")
    if cfg.num_fewshot and not (cfg.fewshot_split or cfg.fewshot_file):
        _fail(src, f"num_fewshot is {cfg.num_fewshot} but neither fewshot_split nor fewshot_file is given")
    if cfg.fewshot_sampler not in ("random", "first_n"):
        _fail(src, f"fewshot_sampler must be 'random' or 'first_n', got {cfg.fewshot_sampler!r}")
    if cfg.answer.group_select not in ("first", "last"):
        _fail(src, f"answer.group_select must be 'first' or 'last', got {cfg.answer.group_select!r}")
    if cfg.answer.fallback not in ("none", "last_number", "text"):
        _fail(src, f"answer.fallback must be none, last_number or text, got {cfg.answer.fallback!r}")
    n_needed = max([parse_pass_at(m) or 1 for m in cfg.metrics])
    if cfg.generation.n < n_needed:
        _fail(src, f"pass@{n_needed} needs generation.n >= {n_needed}, got {cfg.generation.n}")
    try:
        templates.check_syntax(cfg.doc_to_text)
        templates.check_syntax(cfg.description)
        if cfg.fewshot_target:
            templates.check_syntax(cfg.fewshot_target)
        if cfg.output == "multiple_choice":
            templates.check_syntax(cfg.doc_to_choice, expression=True)
            templates.check_syntax(cfg.doc_to_target, expression=True)
        else:
            templates.check_syntax(cfg.doc_to_target)
    except templates.TemplateError as e:
        _fail(src, str(e))


def cap_new_tokens(cfg: TaskConfig, cap: int) -> TaskConfig:
    """The task with generation limited to ``cap`` new tokens (multiple-choice tasks unchanged)."""
    if cfg.output != "generate" or cfg.generation.max_new_tokens <= cap:
        return cfg
    return replace(cfg, generation=replace(cfg.generation, max_new_tokens=cap))


def _read_yaml(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise TaskDefinitionError(f"{path}: malformed YAML: {e}") from None


def available_tasks(tasks_dir: str = TASKS_DIR) -> List[str]:
    return sorted(f[:-5] for f in os.listdir(tasks_dir) if f.endswith(".yaml"))


def available_suites() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(SUITES_DIR) if f.endswith(".yaml"))


def load_task(name_or_path: str, tasks_dir: str = TASKS_DIR) -> TaskConfig:
    """A task by name (``tasks/NAME.yaml``) or by the path of a YAML file."""
    if name_or_path.endswith((".yaml", ".yml")):
        path = name_or_path
        if not os.path.isfile(path):
            raise TaskDefinitionError(f"task file {path} does not exist")
    else:
        path = os.path.join(tasks_dir, f"{name_or_path}.yaml")
        if not os.path.isfile(path):
            raise TaskDefinitionError(f"unknown task {name_or_path!r}; available: {', '.join(available_tasks(tasks_dir))} "
                                      "(or give the path of a task YAML)")
    cfg = task_from_dict(_read_yaml(path), path)
    if not name_or_path.endswith((".yaml", ".yml")) and cfg.name != name_or_path:
        raise TaskDefinitionError(f"{path}: name is {cfg.name!r}, the file name says {name_or_path!r}")
    return cfg


def load_suite(name: str) -> List[TaskConfig]:
    """The tasks of ``suites/NAME.yaml`` (a mapping with ``tasks: [names]``)."""
    path = os.path.join(SUITES_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        raise TaskDefinitionError(f"unknown suite {name!r}; available: {', '.join(available_suites())}")
    raw = _read_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list) or not raw["tasks"]:
        raise TaskDefinitionError(f"{path}: a suite is a mapping with a non-empty list under 'tasks'")
    return [load_task(t) for t in raw["tasks"]]


def resolve_tasks(tasks: Optional[str], suite: Optional[str]) -> List[TaskConfig]:
    """``--tasks a,b`` (names or YAML paths) or ``--suite NAME``, exactly one of them."""
    if bool(tasks) == bool(suite):
        raise TaskDefinitionError("give exactly one of --tasks A,B and --suite NAME "
                                  f"(suites: {', '.join(available_suites())})")
    if suite:
        return load_suite(suite)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    cfgs = [load_task(t) for t in names]
    dup = sorted({c.name for c in cfgs if sum(d.name == c.name for d in cfgs) > 1})
    if dup:
        raise TaskDefinitionError(f"task(s) {dup} given more than once")
    return cfgs
