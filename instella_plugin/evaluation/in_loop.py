"""Downstream tasks on the live model during training (``--eval-tasks`` at each ``--eval-interval``).

``InLoopEvaluation`` reads and renders the tasks once, when the run starts (a missing file or an
unknown task stops the run before the first step); each call scores them on the trainer's model
chunks through the generation engine (weights shared, no copy, no save/reload) and returns
``{"TASK/METRIC": value}`` for the progress line, ``train_log.jsonl`` and TensorBoard/wandb.
The data-parallel ranks split the examples; every rank returns the same scores.
"""
from typing import Dict, List, Optional

from instella_plugin.evaluation.megatron_backend import LiveBackend
from instella_plugin.evaluation.runner import evaluate, prepare
from instella_plugin.evaluation.task_config import TaskConfig, available_suites, resolve_tasks


def parse_eval_tasks(spec: str) -> List[TaskConfig]:
    """``--eval-tasks``: a suite name, or task names / task YAML paths separated by commas."""
    if spec in available_suites():
        return resolve_tasks(None, spec)
    return resolve_tasks(spec, None)


def flat_scores(results: Dict[str, dict]) -> Dict[str, float]:
    """{"task/metric": value} of every task's metrics (standard errors left out)."""
    return {f"{task}/{m}": v for task, r in results.items() for m, v in r["metrics"].items()
            if not m.endswith("_stderr")}


class InLoopEvaluation:
    def __init__(self, spec: str, data_dir: Optional[str], limit: Optional[int], tokenizer, max_length: int,
                 batch_size: int = 8):
        if not data_dir:
            raise ValueError("--eval-tasks needs --eval-tasks-data DIR (the local task files; see docs/evaluation.md)")
        self.tasks = parse_eval_tasks(spec)
        self.prepared = prepare(self.tasks, data_dir, limit)
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size

    def __call__(self, model_chunks) -> Dict[str, float]:
        backend = LiveBackend.from_model(model_chunks, self.tokenizer, self.max_length, self.batch_size)
        return flat_scores(evaluate(self.tasks, backend, prepared=self.prepared)["results"])
