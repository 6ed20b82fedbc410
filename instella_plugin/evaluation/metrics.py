"""Per-example metrics and their aggregation (mean with standard error).

Multiple choice, from the log-likelihood ``ll[i]`` of each choice's continuation (lm-eval's
definitions): ``acc`` argmax ll; ``acc_norm`` argmax ll / len(choice in characters); ``acc_per_token``
argmax ll / (continuation tokens); ``acc_mutual_info`` argmax ll - ll_uncond, the unconditional
log-likelihood of ``target_delimiter + choice`` after only the BOS/EOS token (with choices in the
context, WinoGrande's partial scoring, that is the filled-in context: lm-eval's definition). Ties go to the first choice
(numpy's argmax). Generation: ``exact_match`` of the first sample's extracted answer; ``pass@k`` over
``n`` samples with ``c`` correct by the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021,
"Evaluating Large Language Models Trained on Code").
"""
import math
import re
from typing import Dict, List, Optional, Sequence

import numpy as np

MC_METRICS = frozenset({"acc", "acc_norm", "acc_per_token", "acc_mutual_info"})
GENERATION_METRICS = frozenset({"exact_match"})
_PASS_AT = re.compile(r"^pass@(\d+)$")


def parse_pass_at(name: str) -> Optional[int]:
    """k of a ``pass@k`` metric name, else None."""
    m = _PASS_AT.match(name)
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None


def multiple_choice(metrics: Sequence[str], lls: Sequence[float], gold: int, choice_chars: Sequence[int],
                    choice_tokens: Sequence[int], lls_uncond: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """{metric: 0.0 or 1.0} for one example."""
    lls = np.asarray(lls, dtype=np.float64)
    scores = {
        "acc": lls,
        "acc_norm": lambda: lls / np.asarray(choice_chars, dtype=np.float64),
        "acc_per_token": lambda: lls / np.asarray(choice_tokens, dtype=np.float64),
        "acc_mutual_info": lambda: lls - np.asarray(lls_uncond, dtype=np.float64),
    }
    out = {}
    for m in metrics:
        s = scores[m] if m == "acc" else scores[m]()
        out[m] = 1.0 if int(np.argmax(s)) == gold else 0.0
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or k > n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k / i): the ratio of binomials without large numbers
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def generation(metrics: Sequence[str], correct: Sequence[bool]) -> Dict[str, float]:
    """{metric: value} for one example from the correctness of its samples (the first is exact_match's)."""
    out = {}
    for m in metrics:
        k = parse_pass_at(m)
        out[m] = pass_at_k(len(correct), sum(map(bool, correct)), k) if k else float(bool(correct[0]))
    return out


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation, ddof 1, over sqrt N), as lm-eval reports it."""
    n = len(values)
    if n < 2:
        return float("nan")
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(n))


def aggregate(per_example: List[Dict[str, float]], metrics: Sequence[str]) -> Dict[str, float]:
    """{metric: mean, metric_stderr: standard error} over the examples."""
    out = {}
    for m in metrics:
        values = [e[m] for e in per_example]
        out[m] = float(np.mean(values)) if values else float("nan")
        out[f"{m}_stderr"] = mean_stderr(values)
    return out
