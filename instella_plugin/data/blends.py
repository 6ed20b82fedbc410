"""Data blends as YAML: load them, resolve sources to Megatron prefixes, turn fractions into weights.

A blend file (``instella_plugin/blends/NAME.yaml`` or any user path) names sources per split::

    name: stage2
    mode: fraction            # or: weight
    train:
      - {name: dclm, prefix: "dolmino/dclm/*", fraction: 0.0323}
      - {name: flan, prefix: dolmino/flan/flan_text_document, fraction: 0.5}
    valid: [...]              # optional, same form; so is test

``prefix`` is relative to ``--data-root`` and may be a glob (``**`` recursive; each match of
``PATTERN.idx`` is one Megatron dataset; a source is usually many shards). In ``fraction`` mode
(default 1.0: the whole source; above 1 repeats it) a source contributes ``fraction x tokens`` per
epoch of the blend, so its Megatron weight is ``fraction x tokens``; ``fraction: 1.0`` everywhere is
the natural proportion. In ``weight`` mode the weights are the share of sampled tokens. Either way a
source's weight is split over its shards by their token counts, read from the ``.idx`` files
(validated against the ``.bin``). ``kind: sft`` blends name SFT stores (``PREFIX_tokens``/``PREFIX_mask``,
see ``sft.py``) and count examples instead of tokens, since each example fills one padded sample.
Optional ``total_tokens`` adds the epochs each source is seen at that budget to the table.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import yaml

from instella_plugin.data.indexed import check_pair

SPLITS = ("train", "valid", "test")
BLEND_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "blends")


class BlendError(ValueError):
    """A blend that cannot be loaded or resolved."""


def known_blends() -> List[str]:
    """Names of the built-in blends."""
    return sorted(f[:-5] for f in os.listdir(BLEND_DIR) if f.endswith(".yaml"))


def load_blend(name_or_path: str) -> dict:
    """Parse and validate a blend: a built-in name or a YAML path. Returns the blend as a dict."""
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(BLEND_DIR, f"{name_or_path}.yaml")
        if not os.path.isfile(path):
            raise BlendError(f"unknown blend {name_or_path!r}: not a file, and the built-in blends are "
                             f"{', '.join(known_blends())}")
    with open(path, encoding="utf-8") as f:
        blend = yaml.safe_load(f)
    if not isinstance(blend, dict) or not blend.get("train"):
        raise BlendError(f"{path}: a blend needs a non-empty 'train' list of sources")
    mode = blend.setdefault("mode", "fraction")
    if mode not in ("fraction", "weight"):
        raise BlendError(f"{path}: mode must be 'fraction' or 'weight', not {mode!r}")
    blend.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    for split in SPLITS:
        for n, src in enumerate(blend.get(split) or []):
            where = f"{path}: {split}[{n}]"
            if not isinstance(src, dict) or "prefix" not in src:
                raise BlendError(f"{where}: each source needs a 'prefix' (relative to --data-root)")
            src.setdefault("name", os.path.basename(str(src["prefix"])))
            other = "weight" if mode == "fraction" else "fraction"
            if other in src:
                raise BlendError(f"{where} ({src['name']}): '{other}' given in a {mode}-mode blend")
            value = src.setdefault(mode, 1.0)
            if not isinstance(value, (int, float)) or value < 0:
                raise BlendError(f"{where} ({src['name']}): {mode} must be a number >= 0, got {value!r}")
    if blend.setdefault("kind", "gpt") not in ("gpt", "sft"):
        raise BlendError(f"{path}: kind must be 'gpt' or 'sft', not {blend['kind']!r}")
    return blend


@dataclass
class SourceRow:
    """One source of one split after resolution."""

    split: str
    name: str
    prefixes: List[str]
    shard_tokens: List[int]
    documents: int
    tokens: int
    weight: float = 0.0  # normalised share of samples within its split
    epoch_tokens: float = 0.0  # tokens drawn per epoch of the blend

    shard_sizes: List[int] = field(default_factory=list)  # what weights are split by (tokens or examples)

    def shard_weights(self) -> List[float]:
        sizes = self.shard_sizes or self.shard_tokens
        total = sum(sizes) or 1
        return [self.weight * t / total for t in sizes]


@dataclass
class ResolvedBlend:
    """A blend with every source found on disk and its Megatron weights computed."""

    name: str
    mode: str
    data_root: str
    kind: str = "gpt"
    total_tokens: Optional[float] = None
    rows: List[SourceRow] = field(default_factory=list)

    def split_rows(self, split: str) -> List[SourceRow]:
        return [r for r in self.rows if r.split == split]

    def blend_for(self, split: str) -> Optional[Tuple[List[str], List[float]]]:
        """Megatron ``(prefixes, weights)`` of one split, or None when the blend has no such split."""
        rows = self.split_rows(split)
        if not rows:
            return None
        pairs = [(p, w) for r in rows for p, w in zip(r.prefixes, r.shard_weights()) if w > 0]
        return [p for p, _ in pairs], [w for _, w in pairs]

    @property
    def blend(self) -> Tuple[List[str], List[float]]:
        """The train split, for ``GPTDatasetConfig(blend=...)``."""
        return self.blend_for("train")

    @property
    def blend_per_split(self) -> List[Optional[Tuple[List[str], List[float]]]]:
        """``[train, valid, test]`` for ``GPTDatasetConfig(blend_per_split=...)``."""
        return [self.blend_for(s) for s in SPLITS]

    def per_split(self) -> Dict[str, list]:
        """``{"train": [w1, prefix1, ...], ...}``: what ``--per-split-data-args-path`` reads."""
        out = {}
        for split in SPLITS:
            b = self.blend_for(split)
            if b is not None:
                out[split] = [x for p, w in zip(*b) for x in (w, p)]
        return out

    def write_per_split_json(self, path: str, overwrite: bool = True) -> str:
        """Write ``per_split()`` atomically to ``path`` (an existing file only with ``overwrite``)."""
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"output {path} already exists; pass --overwrite to replace it, or choose "
                                  "another --output")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.per_split(), f, indent=1)
        os.replace(tmp, path)
        return path

    def table(self) -> str:
        """Human table: source, documents, tokens, weight, tokens per epoch of the blend."""
        unit = "examples/epoch" if self.kind == "sft" else "tokens/epoch"
        head = f"{'split':<6} {'source':<28} {'shards':>6} {'documents':>14} {'tokens':>18} {'weight':>9} {unit:>18}"
        if self.total_tokens:
            head += f" {'epochs@total':>12}"
        lines = [f"blend {self.name} ({self.mode} mode), data root {self.data_root}", head, "-" * len(head)]
        for r in self.rows:
            line = (f"{r.split:<6} {r.name[:28]:<28} {len(r.prefixes):>6} {r.documents:>14,} {r.tokens:>18,} "
                    f"{r.weight:>9.5f} {r.epoch_tokens:>18,.0f}")
            if self.total_tokens:
                line += f" {r.weight * self.total_tokens / max(r.tokens, 1):>12.3f}"
            lines.append(line)
        return "\n".join(lines)


def _expand(data_root: str, prefix: str) -> List[str]:
    pattern = os.path.join(data_root, prefix)
    if any(ch in prefix for ch in "*?["):
        return sorted(p[:-4] for p in glob.glob(pattern + ("" if pattern.endswith(".idx") else ".idx"), recursive=True))
    return [pattern] if os.path.isfile(pattern + ".idx") else []


def resolve_blend(name_or_path: str, data_root: str) -> ResolvedBlend:
    """Find every source's shards under ``data_root``, read their token counts, compute weights.

    Raises ``BlendError`` listing every source that matched no ``.idx`` (not just the first) and every
    source with a weight above zero but no tokens (it would silently drop out of the blend), and
    ``IndexedDataError`` for a pair whose ``.idx`` does not match its ``.bin``.
    """
    blend = load_blend(name_or_path)
    mode, sft = blend["mode"], blend["kind"] == "sft"
    resolved = ResolvedBlend(blend["name"], mode, os.path.abspath(data_root), blend["kind"], blend.get("total_tokens"))
    missing = []
    suffix = "_tokens" if sft else ""
    for split in SPLITS:
        for src in blend.get(split) or []:
            prefixes = _expand(data_root, str(src["prefix"]) + suffix)
            if not prefixes:
                missing.append(f"{split}/{src['name']}: {os.path.join(data_root, str(src['prefix']) + suffix)}(.bin/.idx)")
                continue
            infos = [check_pair(p) for p in prefixes]
            if sft:
                infos = [check_pair(p[: -len(suffix)] + "_mask") and i for p, i in zip(prefixes, infos)]
                prefixes = [p[: -len(suffix)] for p in prefixes]
            resolved.rows.append(SourceRow(split, src["name"], prefixes, [i.tokens for i in infos],
                                           sum(i.documents for i in infos), sum(i.tokens for i in infos),
                                           weight=float(src[mode]),
                                           shard_sizes=[i.documents for i in infos] if sft else []))
    if missing:
        raise BlendError(f"blend {blend['name']}: {len(missing)} source(s) have no data under {data_root}:\n  "
                         + "\n  ".join(missing) + "\nprepare them with `instella data prepare` or fix --data-root")
    unit = "examples" if sft else "tokens"
    empty = [f"{r.split}/{r.name} ({mode} {r.weight:g}): {', '.join(p + ('_tokens' if sft else '') for p in r.prefixes)}"
             for r in resolved.rows if r.weight > 0 and (r.documents if sft else r.tokens) == 0]
    if empty:
        raise BlendError(f"blend {blend['name']}: {len(empty)} source(s) with a {mode} above zero hold no {unit}, so "
                         "they would drop out of the blend:\n  " + "\n  ".join(empty)
                         + f"\nre-prepare them, or give them {mode} 0 in the blend")
    for split in SPLITS:
        rows = resolved.split_rows(split)
        size = (lambda r: r.documents) if sft else (lambda r: r.tokens)
        raw = [r.weight * size(r) if mode == "fraction" else r.weight for r in rows]
        total = sum(raw)
        if rows and total <= 0:
            raise BlendError(f"blend {blend['name']}: the {split} split has zero total weight")
        for r, w in zip(rows, raw):
            r.weight = w / total if total else 0.0
        if mode == "fraction":
            for r, w in zip(rows, raw):
                r.epoch_tokens = w
        else:  # an epoch ends when the first source runs out at these weights
            budget = min((size(r) / r.weight for r in rows if r.weight > 0), default=0.0)
            for r in rows:
                r.epoch_tokens = r.weight * budget
    return resolved
