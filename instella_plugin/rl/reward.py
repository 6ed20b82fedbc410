"""The rule-based reward of Instella-Math's GRPO stages (DeepScaleR's): 1 for a verified correct final
answer, 0 otherwise (no boxed answer, a truncated box, a wrong value). No format bonus, no partial credit;
the answer checking itself is ``evaluation.math_check``, shared with Pass@k evaluation."""
from typing import Sequence

from instella_plugin.evaluation.math_check import check


def math_reward(response: str, gold: str) -> float:
    """1.0 when the response's final boxed answer equals ``gold`` (see ``math_check``), else 0.0."""
    return 1.0 if check(response, gold).correct else 0.0


def math_rewards(responses: Sequence[str], golds: Sequence[str]) -> list:
    """``math_reward`` of each response against its problem's ground truth."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} ground-truth answers")
    return [math_reward(r, g) for r, g in zip(responses, golds)]
