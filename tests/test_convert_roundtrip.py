"""Megatron (TP=2, PP=2) -> HF (instella and olmoe) -> Megatron (TP=1, PP=1), fp32, against known weights.

Known random weights (norms 1 + 0.1 N(0,1)) are loaded into a TP=2/PP=2 megatron model, which saves a
checkpoint through the trainer's ``save_checkpoint`` (RoPE theta 50000, not the default, to see it
carried) and computes logits. The converter must reproduce every weight bitwise in both HF formats;
our ``InstellaForCausalLM`` and transformers' own ``OlmoeForCausalLM`` must give the megatron
logits within 1e-5; the HF -> Megatron checkpoint must hold the original tensors bitwise and load
through the trainer's ``load_model_weights`` at TP=1/PP=1 into a model with the same logits. The
writer's key layout is checked against ``GPTModel.sharded_state_dict()`` of a real model.
"""
import json
import os

import pytest
import torch

from instella_plugin.model.config import get_preset
from instella_plugin.testing.distributed import run_distributed
from instella_plugin.testing.olmoe_reference import random_hf_weights

CFG = get_preset("instella-test", rotary_base=50000.0)
SEQ, MBS = 12, 2


def batch(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(2, cfg.vocab_size, (MBS, SEQ + 1), generator=g)
    return dict(tokens=seq[:, :-1], labels=seq[:, 1:], loss_mask=torch.ones(MBS, SEQ),
                position_ids=torch.arange(SEQ).expand(MBS, SEQ).clone())


def _logits(chunks, b):
    from instella_plugin.training.forward_step import collect_logits
    from instella_plugin.training.model_setup import wrap_ddp

    out = collect_logits(wrap_ddp(chunks), [b], seq_length=SEQ, micro_batch_size=MBS)
    return out[0] if out else None


def _save_worker(cfg, hf, b, save_dir):
    from megatron.core import parallel_state as ps

    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.weight_map import load_hf_into_model
    from instella_plugin.training.checkpointing import save_checkpoint

    tcfg = cfg.transformer_config(tensor_parallel=ps.get_tensor_model_parallel_world_size(),
                                  pipeline_parallel=ps.get_pipeline_model_parallel_world_size())
    chunks = build_gpt_chunks(cfg, tcfg, init_seed=3)
    for c in chunks:
        load_hf_into_model(c, hf.__getitem__, cfg)
    save_checkpoint(save_dir, 7, chunks, cfg, save_rng=False,
                    extra_meta={"spec": "instella", "rotary_base": cfg.rotary_base, "seq_length": 48,
                                "tokenizer": "instella"})
    return _logits(chunks, b)


def _load_worker(cfg, b, ckpt):
    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.weight_map import hf_from_megatron_shards, iter_local_params
    from instella_plugin.training.checkpointing import load_model_weights

    chunks = build_gpt_chunks(cfg, cfg.transformer_config(), init_seed=11)
    layout, objects = {}, set()
    for entry in chunks[0].sharded_state_dict().values():
        for sh in (entry.build() if hasattr(entry, "build") else [entry]):  # SwiGLU fc1 is a factory
            if sh.key.endswith("_extra_state"):
                objects.add(sh.unique_key)
            else:
                layout[sh.key] = tuple(sh.global_shape)
    load_model_weights(ckpt, chunks)
    weights = {}
    for name, layer, p in iter_local_params(chunks[0]):
        weights.update(hf_from_megatron_shards(name, layer, [p.detach().clone()], cfg))
    return dict(logits=_logits(chunks, b), weights=weights, layout=layout, objects=objects)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from instella_plugin.hf.convert import hf_to_megatron, megatron_to_hf

    root = tmp_path_factory.mktemp("roundtrip")
    hf, b = random_hf_weights(CFG), batch(CFG)
    results = run_distributed(_save_worker, 4, CFG, hf, b, str(root / "mg"), tp=2, pp=2)
    logits = next(r for r in results if r is not None)
    for fmt in ("instella", "olmoe"):
        megatron_to_hf(str(root / "mg"), str(root / fmt), fmt=fmt, dtype=torch.float32,
                       max_shard_bytes=4 * 1024 * 1024)  # several shards + an index
    hf_to_megatron(str(root / "olmoe"), str(root / "mg_tp1"), dtype=torch.float32)
    return dict(root=root, hf=hf, batch=b, logits=logits)


@pytest.mark.dist
@pytest.mark.parametrize("fmt", ["instella", "olmoe"])
def test_export_is_bitwise_and_carries_config(exported, fmt):
    from instella_plugin.hf.formats import HFCheckpoint

    d = exported["root"] / fmt
    assert (d / "model.safetensors.index.json").is_file()
    ck = HFCheckpoint(str(d))
    for name, want in exported["hf"].items():
        got = ck.get(name)
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    config = json.loads((d / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 50000.0 and config["max_position_embeddings"] == 48
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 1)
    if fmt == "olmoe":
        from safetensors import safe_open

        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        router = "model.layers.2.mlp.gate.weight"
        with safe_open(str(d / index[router]), "pt") as f:
            assert torch.equal(f.get_tensor(router), torch.zeros(1, CFG.hidden_size))
        assert "model.layers.2.mlp.experts.0.up_proj.weight" in index


@pytest.mark.dist
def test_hf_models_match_megatron_logits(exported):
    import instella_plugin.hf  # noqa: F401  (registers the instella classes)
    from transformers import AutoModelForCausalLM, OlmoeForCausalLM

    want = exported["logits"]
    tokens = exported["batch"]["tokens"]
    models = {"instella": AutoModelForCausalLM.from_pretrained(str(exported["root"] / "instella"),
                                                               attn_implementation="eager"),
              "olmoe": OlmoeForCausalLM.from_pretrained(str(exported["root"] / "olmoe"), attn_implementation="eager")}
    assert type(models["instella"]).__name__ == "InstellaForCausalLM"
    for fmt, model in models.items():
        assert model.config.rope_parameters["rope_theta"] == 50000.0, fmt
        with torch.no_grad():
            got = model(input_ids=tokens).logits
        assert (got - want).abs().max().item() <= 1e-5, fmt


@pytest.mark.dist
def test_hf_to_megatron_is_bitwise_and_loads_at_tp1(exported):
    from instella_plugin.hf.megatron_io import MegatronCheckpoint, extra_state_objects, param_names, stacked_layout
    from instella_plugin.training.checkpointing import read_meta, resolve_checkpoint_dir

    root = exported["root"]
    meta = read_meta(str(root / "mg_tp1"))
    assert meta["contents"] == ["model"] and meta["rotary_base"] == 50000.0
    orig = MegatronCheckpoint(resolve_checkpoint_dir(str(root / "mg")), CFG.num_layers)
    back = MegatronCheckpoint(resolve_checkpoint_dir(str(root / "mg_tp1")), CFG.num_layers)
    for name in param_names(CFG.num_layers):
        assert torch.equal(orig.read_param(name), back.read_param(name)), name
    (res,) = run_distributed(_load_worker, 1, CFG, exported["batch"], str(root / "mg_tp1"))
    assert res["layout"] == stacked_layout(CFG)
    assert res["objects"] == set(extra_state_objects(CFG.num_layers)) == set(back.objects)
    for name, want in exported["hf"].items():
        assert torch.equal(res["weights"][name], want), name
    assert (res["logits"] - exported["logits"]).abs().max().item() <= 1e-5
    assert not any(f.startswith("iter_") and f.endswith(".partial") for f in os.listdir(root / "mg_tp1"))
