"""The "mitchell" initialisation of Instella, independent of the parallel layout.

Truncated normal at +-3 sigma: q/k/v, gate and up projections, embeddings and LM head
sigma = 1/sqrt(hidden); attention output sigma = 1/sqrt(hidden)/sqrt(2(l+1)); MLP down
sigma = 1/sqrt(ffn)/sqrt(2(l+1)) with l the global 0-based layer index; norm weights 1.

Each tensor is drawn in its Hugging Face layout from a generator seeded by (seed, tensor name) and
then sharded by the weight mapping, so the same seed gives the same model at any TP/PP/VPP layout.
"""
import math
import zlib

import torch

from instella_plugin.model.config import InstellaConfig
from instella_plugin.model.weight_map import hf_shapes, load_hf_into_model


def mitchell_sigma(name: str, cfg: InstellaConfig):
    """Sigma of an HF tensor, or None for norm weights (initialised to 1)."""
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return None
    base = 1.0 / math.sqrt(cfg.hidden_size)
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        if name.endswith("o_proj.weight"):
            return base / math.sqrt(2 * (layer + 1))
        if name.endswith("down_proj.weight"):
            return 1.0 / math.sqrt(cfg.ffn_hidden_size) / math.sqrt(2 * (layer + 1))
    return base


def mitchell_tensor(name: str, cfg: InstellaConfig, seed: int, shapes=None, dtype=torch.float32) -> torch.Tensor:
    shape = (shapes or hf_shapes(cfg))[name]
    sigma = mitchell_sigma(name, cfg)
    if sigma is None:
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    t = torch.empty(shape, dtype=torch.float32)
    torch.nn.init.trunc_normal_(t, mean=0.0, std=sigma, a=-3 * sigma, b=3 * sigma, generator=gen)
    return t.to(dtype)


def initialize_model(model_chunks, cfg: InstellaConfig, seed: int) -> None:
    """Mitchell-initialise every parameter of this rank's (unwrapped) model chunks."""
    shapes = hf_shapes(cfg)
    for chunk in model_chunks:
        load_hf_into_model(chunk, lambda n: mitchell_tensor(n, cfg, seed, shapes), cfg)
