"""The primary score of each task for several runs, as grouped bars (PNG, written atomically)."""
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from instella_plugin.evaluation.results import primary_scores  # noqa: E402
from instella_plugin.training.progress import save_figure  # noqa: E402


def plot_scores(names: List[str], records: List[dict], path: str) -> None:
    scores = [primary_scores(r) for r in records]
    tasks = []
    for s in scores:
        tasks += [t for t in s if t not in tasks]
    width = 0.8 / max(len(records), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tasks) + 2), 4))
    for k, (name, s) in enumerate(zip(names, scores)):
        xs = [i + k * width for i, t in enumerate(tasks) if t in s]
        ax.bar(xs, [100 * s[t] for t in tasks if t in s], width, label=name)
    ax.set_xticks([i + width * (len(records) - 1) / 2 for i in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("primary metric (%)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=None)
