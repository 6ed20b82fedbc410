"""Scores of checkpoints for greedy soup and the merge report: held-out loss, or any command's number.

An evaluator is a callable ``path -> float`` with a ``name`` and ``higher_is_better``; greedy soup and
the report take any such object, so another scorer plugs in without touching them:

- ``HeldOutLoss``: mean next-token cross entropy (nats) of the checkpoint on fixed windows of
  ``seq_length + 1`` tokens cut from held-out Megatron ``.bin/.idx`` data (documents concatenated in
  order; windows taken round-robin over the prefixes), lower is better. Too little data is refused
  when the evaluator is built (``windows()``), before any checkpoint is read. The checkpoint runs as the
  transformers ``InstellaForCausalLM`` in fp32 (a Megatron checkpoint's tensors are read one by one
  and translated to Hugging Face names; any TP/PP layout), so the same function scores every input,
  merge and interpolation point.
- ``CommandScore``: runs a command line with ``{checkpoint}`` replaced by the path (for example
  ``instella eval`` on a dev suite) and reads the last number it prints.
"""
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from instella_plugin.data.blends import resolve_blend
from instella_plugin.data.indexed import check_pair, read_documents
from instella_plugin.hf.configuration_instella import InstellaConfig as HFConfig
from instella_plugin.hf.convert import open_megatron
from instella_plugin.hf.megatron_io import param_names
from instella_plugin.hf.modeling_instella import InstellaForCausalLM
from instella_plugin.model.weight_map import hf_from_megatron_shards

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def load_causal_lm(path: str) -> InstellaForCausalLM:
    """A Hugging Face or Megatron checkpoint as an fp32 ``InstellaForCausalLM`` in eval mode."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return InstellaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    _, meta, cfg, ckpt = open_megatron(path, flag="--inputs")
    hf_cfg = HFConfig.from_plugin_config(cfg, rope_theta=float(meta.get("rotary_base", cfg.rotary_base)),
                                         max_position_embeddings=int(meta.get("seq_length", cfg.seq_length)))
    hf_cfg._attn_implementation = "eager"
    model = InstellaForCausalLM(hf_cfg)
    state = {}
    for name in param_names(cfg.num_layers):
        layer = int(name.split(".")[2]) + 1 if name.startswith("decoder.layers.") else 0
        for hf_name, t in hf_from_megatron_shards(name, layer, [ckpt.read_param(name, torch.float32)], cfg).items():
            state[hf_name] = t
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def heldout_prefixes(prefixes: Optional[Sequence[str]] = None, blend: Optional[str] = None,
                     data_root: Optional[str] = None) -> List[str]:
    """The held-out data: prefixes given directly, or the valid split of a blend under ``data_root``."""
    if blend:
        if not data_root:
            raise ValueError("--heldout-blend needs --data-root (where the blend's files are)")
        split = resolve_blend(blend, data_root).blend_for("valid")
        if split is None:
            raise ValueError(f"blend {blend} has no valid split; give --heldout PREFIX instead")
        prefixes = split[0]
    if not prefixes:
        raise ValueError("no held-out data: give --heldout PREFIX... or --heldout-blend NAME --data-root DIR")
    for p in prefixes:
        check_pair(p)  # a missing or damaged pair is named now, before any checkpoint is read
    return list(prefixes)


@dataclass
class HeldOutLoss:
    prefixes: Sequence[str]
    seq_length: int = 128
    num_samples: int = 32
    batch_size: int = 8
    name: str = "held-out loss"
    higher_is_better: bool = False
    _windows: Optional[torch.Tensor] = field(default=None, repr=False)

    def windows(self) -> torch.Tensor:
        """[num_samples, seq_length + 1] token ids, the same for every checkpoint."""
        if self._windows is None:
            n = self.seq_length + 1
            per_prefix = []
            for p in self.prefixes:
                stream = np.concatenate([d.astype(np.int64) for d in read_documents(p)])
                per_prefix.append([stream[i:i + n] for i in range(0, len(stream) - n + 1, n)])
            longest = max(len(g) for g in per_prefix)  # round-robin; a prefix that runs out drops out
            rows = [g[i] for i in range(longest) for g in per_prefix if i < len(g)]
            if len(rows) < self.num_samples:
                raise ValueError(f"the held-out data holds {len(rows)} windows of {n} tokens, fewer than the "
                                 f"{self.num_samples} asked for; lower --eval-samples or --eval-seq-length")
            self._windows = torch.from_numpy(np.stack(rows[:self.num_samples]))
        return self._windows

    @torch.no_grad()
    def __call__(self, path: str) -> float:
        windows = self.windows()
        model = load_causal_lm(path)
        total, count = 0.0, 0
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start:start + self.batch_size]
            logits = model(input_ids=batch[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += batch[:, 1:].numel()
        del model
        return total / count


@dataclass
class CommandScore:
    template: str
    higher_is_better: bool = True
    name: str = "score"

    def __post_init__(self):
        if "{checkpoint}" not in self.template:
            raise ValueError(f"--score-command {self.template!r} must contain {{checkpoint}} where the path goes")

    def __call__(self, path: str) -> float:
        cmd = self.template.replace("{checkpoint}", shlex.quote(path))
        proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"score command failed ({proc.returncode}) on {path}: {cmd}\n{proc.stderr[-2000:]}")
        numbers = _NUMBER.findall(proc.stdout)
        if not numbers:
            raise RuntimeError(f"score command printed no number for {path}: {cmd}\n{proc.stdout[-2000:]}")
        return float(numbers[-1])


def better(a: float, b: float, higher_is_better: bool) -> bool:
    """Is score ``a`` at least as good as ``b``?"""
    return a >= b if higher_is_better else a <= b
