"""The synthesis summary as a picture: how many problems each stage passed, and why the others failed.

``OUTPUT.summary.png`` beside ``OUTPUT.summary.json``: left, the stages (seeds, abstracted, verified,
re-instantiated, decontaminated, agreed, kept); right, the rejection reasons, largest first.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from instella_plugin.training.progress import save_figure  # noqa: E402

STAGES = ("seeds", "abstracted", "verified", "reinstantiated", "decontaminated", "agreed", "kept")
LABELS = ("seeds", "abstracted (seeds)", "verified (seeds)", "re-instantiated (problems)",
          "decontaminated (dropped)", "agreed (problems)", "kept (problems)")


def plot_summary(summary: dict, path: str, title: str = "GSM8K-synthetic") -> str:
    """Write the two bar charts of ``summary`` (``Summary.as_dict()``) to ``path`` (PNG, atomically)."""
    reasons = sorted(summary.get("rejected", {}).items(), key=lambda kv: kv[1])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    counts = [summary.get(s, 0) for s in STAGES]
    left.barh(range(len(STAGES)), counts, color="tab:blue")
    left.set_yticks(range(len(STAGES)), LABELS)
    left.invert_yaxis()
    left.set_title(f"{title}: stages")
    for y, c in enumerate(counts):
        left.text(c, y, f" {c:,}", va="center")
    if reasons:
        right.barh(range(len(reasons)), [n for _, n in reasons], color="tab:red")
        right.set_yticks(range(len(reasons)), [r for r, _ in reasons], fontsize=8)
    right.set_title("rejected, by reason")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return path
