"""RoPE context-extension methods (``--rope-scaling``) against transformers and megatron-core.

References nobody here wrote: transformers' ``ROPE_INIT_FUNCTIONS`` (linear, dynamic, yarn) and its
``OlmoeRotaryEmbedding`` tables, megatron-core's ``YarnRotaryEmbedding``, and, for the export, the
one-expert ``OlmoeForCausalLM`` built with the ``rope_parameters`` our export writes.
"""
import math

import pytest
import torch
from transformers import OlmoeConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from instella_plugin.model.config import get_preset
from instella_plugin.rope.methods import RopeScaling, RopeScalingError
from instella_plugin.testing.distributed import run_distributed
from instella_plugin.testing.olmoe_reference import build_olmoe, random_hf_weights

HEAD_DIM, THETA = 80, 10000.0


def hf_config(params: dict, max_positions: int, head_dim: int = HEAD_DIM) -> OlmoeConfig:
    return OlmoeConfig(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=max_positions, rope_parameters=dict(params))


@pytest.mark.parametrize("factor", [2.0, 4.0, 16.0])
def test_linear_matches_transformers(factor):
    ours = RopeScaling("linear", factor, 4096).inv_freq(THETA, HEAD_DIM)
    want, af = ROPE_INIT_FUNCTIONS["linear"](hf_config({"rope_type": "linear", "rope_theta": THETA,
                                                        "factor": factor}, 4096), "cpu")
    assert torch.allclose(ours, want, rtol=1e-6, atol=0) and af == 1.0
    # hand computation: plain RoPE frequencies divided by the factor
    hand = torch.tensor([1 / (THETA ** (2 * i / HEAD_DIM)) / factor for i in range(HEAD_DIM // 2)],
                        dtype=torch.float64)
    assert torch.allclose(ours.double(), hand, rtol=1e-6, atol=0)


@pytest.mark.parametrize("factor,max_pos", [(4.0, 64), (8.0, 4096), (2.5, 1000)])
def test_ntk_matches_transformers_dynamic(factor, max_pos):
    """transformers' dynamic NTK at sequence length s uses the scale F*s/M - (F - 1); at the s where
    that equals our factor it must give our (static) NTK-aware frequencies."""
    ours = RopeScaling("ntk", factor, max_pos).inv_freq(THETA, HEAD_DIM)
    s = max_pos * (2 * factor - 1) / factor
    want, af = ROPE_INIT_FUNCTIONS["dynamic"](hf_config({"rope_type": "dynamic", "rope_theta": THETA,
                                                         "factor": factor}, max_pos), "cpu", seq_len=s)
    assert torch.allclose(ours, want, rtol=1e-6, atol=0) and af == 1.0
    base = THETA * factor ** (HEAD_DIM / (HEAD_DIM - 2))  # closed form of the NTK-aware base
    assert ours[-1].item() == pytest.approx(base ** (-(HEAD_DIM - 2) / HEAD_DIM), rel=1e-6)
    assert ours[0].item() == 1.0  # the highest frequency is kept


@pytest.mark.parametrize("factor,orig,beta_fast,beta_slow", [(4.0, 4096, 32, 1), (16.0, 2048, 16, 2),
                                                             (2.0, 64, 32, 1)])
def test_yarn_matches_transformers_and_megatron(factor, orig, beta_fast, beta_slow, monkeypatch):
    from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding as myarn

    method = RopeScaling("yarn", factor, orig, beta_fast=beta_fast, beta_slow=beta_slow)
    ours = method.inv_freq(THETA, HEAD_DIM)
    params = method.hf_rope_parameters(THETA, HEAD_DIM)
    want, af = ROPE_INIT_FUNCTIONS["yarn"](hf_config(params, int(orig * factor)), "cpu")
    assert torch.allclose(ours, want, rtol=1e-6, atol=0)
    assert method.attention_factor == pytest.approx(af, rel=1e-12)
    assert af == pytest.approx(0.1 * math.log(factor) + 1.0, rel=1e-12)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # megatron moves its tables there
    mc = myarn.YarnRotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=1.0, rotary_base=THETA, scaling_factor=factor,
                             original_max_position_embeddings=orig, beta_fast=beta_fast, beta_slow=beta_slow,
                             use_cpu_initialization=True)
    emb, mscale = mc.get_emb(3)  # positions 0, 1, 2: angle of position 1 = the frequency
    assert torch.allclose(emb[1, 0, 0, :HEAD_DIM // 2], ours, rtol=1e-6, atol=0)
    assert mscale == pytest.approx(af, rel=1e-12)


@pytest.mark.parametrize("method", ["base-law", "linear", "ntk", "yarn"])
def test_position_tables_match_transformers(method):
    """cos/sin for positions 0..L-1 (times the attention factor) equal transformers' rotary tables.
    Angles in fp32 as megatron's RotaryEmbedding forms them (outer product of positions and inv_freq)."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeRotaryEmbedding

    seq = 512
    scaling = RopeScaling.for_context(method, seq, 128)
    inv = scaling.inv_freq(THETA, HEAD_DIM)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], -1)
    af = scaling.attention_factor
    rot = OlmoeRotaryEmbedding(hf_config(scaling.hf_rope_parameters(THETA, HEAD_DIM), seq))
    cos, sin = rot(torch.zeros(1, seq, HEAD_DIM), torch.arange(seq)[None])
    assert (cos[0] - angles.cos() * af).abs().max().item() <= 1e-6
    assert (sin[0] - angles.sin() * af).abs().max().item() <= 1e-6


def test_softmax_scale_carries_the_attention_factor():
    y = RopeScaling("yarn", 8.0, 4096)
    assert y.softmax_scale(80) == pytest.approx((0.1 * math.log(8) + 1) ** 2 / math.sqrt(80), rel=1e-12)
    assert RopeScaling("linear", 8.0).softmax_scale(80) is None
    assert RopeScaling.for_context("base-law", 65536).theta(10000.0, 65536) == pytest.approx(514640.3, abs=0.05)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="rope2"), "unknown --rope-scaling"),
    (dict(method="linear", factor=0.5), "factor must be"),
    (dict(method="yarn", factor=4.0, beta_fast=1.0, beta_slow=2.0), "beta"),
    (dict(method="yarn", factor=4.0, original_context=3), "original-context"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(RopeScalingError, match=match):
        RopeScaling(**kwargs)


def test_yarn_that_does_not_cover_the_context_is_refused():
    with pytest.raises(RopeScalingError, match="shorter than --seq-length 65536.*factor 16"):
        RopeScaling("yarn", 4.0, 4096).check_context(65536)
    RopeScaling("yarn", 16.0, 4096).check_context(65536)  # fits
    with pytest.raises(RopeScalingError, match="factor 1 changes nothing"):
        RopeScaling.for_context("linear", 2048, 4096).check_context(2048)


def test_cli_flags_refused_before_building(monkeypatch):
    from instella_plugin.training.arguments import parse_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="shorter than --seq-length"):
        parse_args(["--plugin", "instella", "--model-preset", "instella-test", "--seq-length", "1024",
                    "--max-position-embeddings", "1024", "--rope-scaling", "yarn", "--rope-scaling-factor", "2",
                    "--rope-original-context", "128", "--mock-data", "--train-iters", "1",
                    "--global-batch-size", "1", "--micro-batch-size", "1", "--lr", "1e-4"])
    run, plugin = parse_args(["--plugin", "instella", "--model-preset", "instella-test", "--seq-length", "1024",
                              "--max-position-embeddings", "1024", "--rope-scaling", "yarn",
                              "--rope-original-context", "128", "--mock-data", "--train-iters", "1",
                              "--global-batch-size", "1", "--micro-batch-size", "1", "--lr", "1e-4"])
    assert run.plugin_values["rope_scaling"].factor == 8.0
    head_dim = run.model.head_dim
    assert plugin.transformer_config_overrides(run)["softmax_scale"] == pytest.approx(
        (0.1 * math.log(8) + 1) ** 2 / math.sqrt(head_dim))
    assert plugin.checkpoint_meta(run)["rope_scaling"]["method"] == "yarn"


# ---- the model runs the method; the HF export computes the same logits --------------------------------
CFG = get_preset("instella-test", num_layers=2, seq_length=64)
METHODS = [("linear", 4.0), ("ntk", 4.0), ("yarn", 4.0)]


def _megatron_logits(cfg, hf, tokens, methods):
    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.weight_map import load_hf_into_model
    from instella_plugin.rope.apply import apply_rope_method, set_rope_scaling

    out = {}
    for name, factor in methods:
        scaling = RopeScaling(name, factor, cfg.seq_length // int(factor))
        extra = {} if scaling.softmax_scale(cfg.head_dim) is None else {
            "softmax_scale": scaling.softmax_scale(cfg.head_dim)}
        chunks = build_gpt_chunks(cfg, cfg.transformer_config(cpu=True, **extra), init_seed=3)
        set_rope_scaling(chunks, scaling, cfg.rotary_base)
        for c in chunks:
            load_hf_into_model(c, hf.__getitem__, cfg)
            c.eval()
        with torch.no_grad():
            pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
            out[name] = chunks[0](tokens, pos, None)  # [b, s, V]
        # a model built plain, then switched (what loading a checkpoint for generation does)
        plain = build_gpt_chunks(cfg, cfg.transformer_config(cpu=True), init_seed=3)
        apply_rope_method(plain, scaling, cfg.rotary_base)
        for c in plain:
            load_hf_into_model(c, hf.__getitem__, cfg)
            c.eval()
        with torch.no_grad():
            out[name + "-applied"] = plain[0](tokens, pos, None)
    return out


def test_hf_export_logits_match_each_method():
    from transformers.models.olmoe.modeling_olmoe import OlmoeRotaryEmbedding

    hf = random_hf_weights(CFG, seed=5)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_length), generator=torch.Generator().manual_seed(2))
    got = run_distributed(_megatron_logits, 1, CFG, hf, tokens, METHODS)[0]
    for name, factor in METHODS:
        scaling = RopeScaling(name, factor, CFG.seq_length // int(factor))
        ref = build_olmoe(CFG, hf)
        params = scaling.hf_rope_parameters(CFG.rotary_base, CFG.head_dim)
        ref.config.rope_parameters = params
        ref.model.rotary_emb = OlmoeRotaryEmbedding(ref.config)
        with torch.no_grad():
            want = ref(input_ids=tokens).logits
        err = (got[name].float() - want).abs().max().item()
        print(f"rope {name}: max |logit diff| megatron vs HF export = {err:.2e}")
        assert err <= 1e-5, (name, err)
        assert (got[name + "-applied"] - got[name]).abs().max().item() <= 1e-6
        plain = build_olmoe(CFG, hf)
        with torch.no_grad():
            assert (plain(input_ids=tokens).logits - want).abs().max().item() > 1e-3  # the method matters


def test_a_spec_not_known_to_run_the_method_is_refused():
    RopeScaling("yarn", 4.0).check_spec("instella-fused")
    RopeScaling("base-law").check_spec("someone-elses-spec")
    with pytest.raises(RopeScalingError, match="layer spec 'someone-elses-spec'.*instella-fused"):
        RopeScaling("yarn", 4.0).check_spec("someone-elses-spec")


def test_changing_the_method_on_resume_needs_the_override(monkeypatch):
    from instella_plugin.training.arguments import parse_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    base = ["--plugin", "instella", "--model-preset", "instella-test", "--seq-length", "1024",
            "--max-position-embeddings", "1024", "--mock-data", "--train-iters", "1", "--global-batch-size", "1",
            "--micro-batch-size", "1", "--lr", "1e-4", "--rope-original-context", "256"]
    run, plugin = parse_args(base + ["--rope-scaling", "linear"])
    saved = {"rope_theta": 10000.0, "iteration": 5}
    with pytest.raises(SystemExit, match="trained with RoPE base-law but this run asks for linear x4"):
        plugin.check_resume(run, saved)
    plugin.check_resume(run, dict(saved, rope_scaling=run.plugin_values["rope_scaling"].to_meta()))
    run, plugin = parse_args(base + ["--rope-scaling", "linear", "--override-rope-theta"])
    plugin.check_resume(run, saved)
