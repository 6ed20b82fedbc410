"""``instella convert`` carries a checkpoint's RoPE method (``--rope-scaling linear|ntk|yarn``) both ways.

One tiny model (known random weights) is saved by the trainer's ``save_checkpoint`` with each method
recorded as the plugin records it; megatron logits come from ``test_long_rope``'s reference (the model
built with the method). The export's config.json must hold the ``rope_parameters`` of each method
(checked against hand-written dicts and the NTK-aware base in closed form), our
``InstellaForCausalLM`` and transformers' ``OlmoeForCausalLM`` loaded from it must give the megatron
logits within 1e-5, converting back must record the same method, and a rope type the megatron model
cannot run must be refused by name before anything is written.
"""
import json
import math
import re
import shutil

import pytest
import torch
from test_long_rope import CFG, METHODS, _megatron_logits

from instella_plugin.rope.methods import RopeScaling
from instella_plugin.testing.distributed import run_distributed
from instella_plugin.testing.olmoe_reference import random_hf_weights


def scaling_of(name, factor):
    return RopeScaling(name, factor, CFG.seq_length // int(factor))  # as test_long_rope's reference builds it


def _save_worker(cfg, hf, tokens, dirs):
    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.weight_map import load_hf_into_model
    from instella_plugin.training.checkpointing import save_checkpoint

    logits = _megatron_logits(cfg, hf, tokens, METHODS)
    chunks = build_gpt_chunks(cfg, cfg.transformer_config(cpu=True), init_seed=3)
    for c in chunks:
        load_hf_into_model(c, hf.__getitem__, cfg)
    for (name, factor), d in zip(METHODS, dirs):
        save_checkpoint(d, 4, chunks, cfg, save_rng=False, extra_meta={
            "spec": "instella", "rotary_base": cfg.rotary_base, "seq_length": cfg.seq_length, "tokenizer": "instella",
            "rope_scaling": scaling_of(name, factor).to_meta()})
    return {k: v for k, v in logits.items() if not k.endswith("-applied")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from instella_plugin.hf.convert import megatron_to_hf

    root = tmp_path_factory.mktemp("convert_rope")
    hf = random_hf_weights(CFG, seed=5)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_length), generator=torch.Generator().manual_seed(2))
    dirs = [str(root / f"mg_{name}") for name, _ in METHODS]
    logits = run_distributed(_save_worker, 1, CFG, hf, tokens, dirs)[0]
    for (name, _), d in zip(METHODS, dirs):
        for fmt in ("instella", "olmoe"):
            megatron_to_hf(d, str(root / f"{fmt}_{name}"), fmt=fmt, dtype=torch.float32)
    return dict(root=root, tokens=tokens, logits=logits)


def expected_rope_parameters(name, factor):
    theta, d = CFG.rotary_base, CFG.head_dim
    if name == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if name == "ntk":  # static NTK-aware base theta * factor ** (d / (d - 2)), plain RoPE tables at it
        return {"rope_type": "default", "rope_theta": theta * factor ** (d / (d - 2))}
    return {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
            "original_max_position_embeddings": CFG.seq_length // int(factor), "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": True}


@pytest.mark.dist
@pytest.mark.parametrize("name,factor", METHODS)
def test_config_json_carries_the_method(exported, name, factor):
    want = expected_rope_parameters(name, factor)
    for fmt in ("instella", "olmoe"):
        config = json.loads((exported["root"] / f"{fmt}_{name}" / "config.json").read_text())
        got = config["rope_parameters"]
        assert set(got) == set(want), (fmt, got)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-12) if isinstance(v, float) else got[k] == v, (fmt, k)
        assert config["rope_theta"] == pytest.approx(want["rope_theta"], rel=1e-12)
        assert config["instella_rope_scaling"] == {**scaling_of(name, factor).to_meta(), "rope_theta": CFG.rotary_base}


@pytest.mark.dist
def test_hf_models_give_the_megatron_logits(exported, tmp_path):
    import instella_plugin.hf  # noqa: F401  (registers the instella classes)
    from transformers import AutoModelForCausalLM, OlmoeForCausalLM

    from instella_plugin.checkpoint_layout import read_meta
    from instella_plugin.hf.convert import hf_to_megatron

    root, tokens = exported["root"], exported["tokens"]
    load = dict(attn_implementation="eager", dtype=torch.float32)
    for name, factor in METHODS:
        want = exported["logits"][name].float()
        inst = AutoModelForCausalLM.from_pretrained(str(root / f"instella_{name}"), **load).eval()
        olmoe = OlmoeForCausalLM.from_pretrained(str(root / f"olmoe_{name}"), **load).eval()
        assert type(inst).__name__ == "InstellaForCausalLM"
        scaling = scaling_of(name, factor)
        rot = inst.model.rotary_emb
        assert torch.allclose(rot.inv_freq, scaling.inv_freq(CFG.rotary_base, CFG.head_dim), rtol=1e-6, atol=0)
        assert rot.attention_scaling == pytest.approx(scaling.attention_factor, rel=1e-12)
        # what transformers saves (a model fine-tuned there) converts back with the method
        inst.save_pretrained(str(tmp_path / name))
        hf_to_megatron(str(tmp_path / name), str(tmp_path / f"mg_{name}"))
        assert read_meta(str(tmp_path / f"mg_{name}"))["rope_scaling"] == scaling.to_meta()
        with torch.no_grad():
            errs = {m: (model(input_ids=tokens).logits - want).abs().max().item()
                    for m, model in (("instella", inst), ("olmoe", olmoe))}
            inst.config.rope_parameters = {"rope_type": "default", "rope_theta": CFG.rotary_base}
            inst.model.rotary_emb = type(rot)(inst.config)  # the same weights with plain RoPE
            plain = (inst(input_ids=tokens).logits - want).abs().max().item()
        print(f"rope {name}: max |logit diff| megatron vs HF instella {errs['instella']:.2e}, "
              f"olmoe {errs['olmoe']:.2e}; plain RoPE {plain:.2e}")
        assert max(errs.values()) <= 1e-5, (name, errs)
        assert plain > 1e-3, (name, plain)  # the method is what makes them agree


@pytest.mark.dist
@pytest.mark.parametrize("name,factor", METHODS)
def test_round_trip_keeps_the_method(exported, tmp_path, name, factor):
    from instella_plugin.checkpoint_layout import read_meta
    from instella_plugin.hf.convert import hf_to_megatron, megatron_to_hf
    from instella_plugin.rope.apply import checkpoint_rope

    scaling, root = scaling_of(name, factor), exported["root"]
    hf_to_megatron(str(root / f"olmoe_{name}"), str(tmp_path / "mg"), dtype=torch.float32)
    meta = read_meta(str(tmp_path / "mg"))
    assert meta["rope_scaling"] == scaling.to_meta() and meta["rotary_base"] == CFG.rotary_base
    assert checkpoint_rope(str(tmp_path / "mg"))[1] == scaling
    megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "hf"), fmt="instella")
    again = json.loads((tmp_path / "hf" / "config.json").read_text())
    first = json.loads((root / f"instella_{name}" / "config.json").read_text())
    keys = ("rope_theta", "rope_parameters", "instella_rope_scaling")
    assert {k: again[k] for k in keys} == {k: first[k] for k in keys}

    # a config.json written elsewhere (no record of the method): read off rope_parameters
    shutil.copytree(root / f"instella_{name}", tmp_path / "bare")
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    del config["instella_rope_scaling"]
    (tmp_path / "bare" / "config.json").write_text(json.dumps(config))
    hf_to_megatron(str(tmp_path / "bare"), str(tmp_path / "mg_bare"))
    meta = read_meta(str(tmp_path / "mg_bare"))
    if name == "ntk":  # plain RoPE at the NTK-aware base: the same tables, recorded as such
        assert "rope_scaling" not in meta
        assert meta["rotary_base"] == pytest.approx(scaling.ntk_theta(CFG.rotary_base, CFG.head_dim), rel=1e-12)
    else:
        assert meta["rope_scaling"] == scaling.to_meta() and meta["rotary_base"] == CFG.rotary_base


@pytest.mark.dist
@pytest.mark.parametrize("change,match", [
    ({"rope_parameters": {"rope_type": "rope9", "rope_theta": 10000.0, "factor": 4.0}}, "rope_type 'rope9'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}}, "rope_type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "attention_factor": 1.0,
                          "original_max_position_embeddings": 16}}, "attention factor 1"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
     "instella_rope_scaling .*restore rope_parameters"),
])
def test_rope_parameters_the_model_cannot_run_are_refused(exported, tmp_path, change, match, capsys):
    from instella_plugin.hf import convert_cli

    src = tmp_path / "hf"
    shutil.copytree(exported["root"] / "instella_linear", src)
    config = json.loads((src / "config.json").read_text())
    if "instella_rope_scaling" not in match:
        del config["instella_rope_scaling"]
    (src / "config.json").write_text(json.dumps({**config, **change}))
    assert convert_cli.main(["--to", "megatron", "--input", str(src), "--output", str(tmp_path / "mg")]) != 0
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not (tmp_path / "mg").exists()


def test_unknown_rope_type_refused_by_the_hf_config():
    from instella_plugin.hf.configuration_instella import InstellaConfig

    with pytest.raises(ValueError, match="rope_type 'rope9', which transformers does not define"):
        InstellaConfig(rope_parameters={"rope_type": "rope9", "rope_theta": 10000.0})
    plain = InstellaConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert plain.rope_parameters["rope_type"] == "default" and not hasattr(plain, "instella_rope_scaling")
    assert math.isclose(plain.rope_base, 10000.0)


@pytest.mark.dist
def test_a_malformed_method_record_in_the_checkpoint_is_refused(exported, tmp_path, capsys):
    from instella_plugin.checkpoint_layout import META, resolve_checkpoint_dir
    from instella_plugin.hf import convert_cli

    src = tmp_path / "mg"
    shutil.copytree(exported["root"] / "mg_yarn", src)
    meta_path = f"{resolve_checkpoint_dir(str(src))}/{META}"
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    meta["rope_scaling"] = {**meta["rope_scaling"], "beta_medium": 4.0}
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    assert convert_cli.main(["--to", "hf", "--input", str(src), "--output", str(tmp_path / "hf")]) != 0
    err = capsys.readouterr().err
    assert "rope_scaling" in err and "beta_medium" in err and "not a RoPE method record" in err, err
    assert not (tmp_path / "hf").exists()
