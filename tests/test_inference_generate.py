"""The Megatron generator (megatron-core's inference engine) against transformers, fp32 on the CPU.

One rank builds a tiny Instella model with known random weights (norms 1 + 0.1 N(0,1)), saves it
with the trainer's ``save_checkpoint`` and runs everything that needs megatron at TP=1 in one
launch: greedy generation of 8 prompts of different lengths x 48 new tokens (one ragged batch, and
each prompt alone), the KV-cache logits of every decode step against a full forward of the same
tokens, sampling with seeds, EOS and stop strings, log-likelihood scoring, a checkpoint that records YaRN
(against transformers' YaRN), and a live (DDP-wrapped,
training) model that generates and then takes a training step. The checkpoint is exported with
``megatron_to_hf`` and transformers' ``generate`` on our ``InstellaForCausalLM`` must give the same
tokens, log-probabilities and scores. Loading the same checkpoint at TP=2 and at PP=2 (two gloo ranks
each; TP=2 x PP=2 on four in the slow tier) must give the TP=1 tokens, also at TP=2 for a model set to sequence parallelism (generation
runs without it and hands it back).
"""
import copy

import pytest
import torch

from instella_plugin.model.config import get_preset
from instella_plugin.rope.methods import RopeScaling
from instella_plugin.testing.distributed import run_distributed
from instella_plugin.testing.olmoe_reference import random_hf_weights

CFG = get_preset("instella-test", rotary_base=50000.0, seq_length=96)
LENGTHS = (2, 3, 5, 8, 11, 13, 16, 21)
YARN = RopeScaling("yarn", 2.0, 48)
NEW = 48


def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, CFG.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def pairs():
    g = torch.Generator().manual_seed(9)
    rand = lambda n: torch.randint(2, CFG.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    return [(rand(7), rand(1)), (rand(3), rand(4)), ([], rand(5)), (rand(12), rand(2))]


def _full_forward_logits(model, ids):
    """Last-position-free logits [len(ids), V] of one sequence, no inference context (no KV cache)."""
    tokens = torch.tensor([ids])
    pos = torch.arange(len(ids)).unsqueeze(0)
    with torch.no_grad():
        return model(tokens, pos, None)[0].float()


def _tp1_worker(cfg, hf, save_dir):
    from instella_plugin.data.tokenizer import load_tokenizer
    from instella_plugin.inference.api import SamplingParams
    from instella_plugin.inference.engine import MegatronGenerator
    from instella_plugin.inference.loading import checkpoint_plan, load_generator
    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.packed_attention import InstellaDotProductAttention
    from instella_plugin.model.weight_map import load_hf_into_model
    from instella_plugin.training.checkpointing import save_checkpoint
    from instella_plugin.training.model_setup import wrap_ddp

    chunks = build_gpt_chunks(cfg, cfg.transformer_config(), init_seed=3)
    with torch.no_grad():
        load_hf_into_model(chunks[0], hf.__getitem__, cfg)
    save_checkpoint(save_dir, 5, chunks, cfg, save_rng=False,
                    extra_meta={"spec": "instella", "rotary_base": cfg.rotary_base, "rope_theta": cfg.rotary_base,
                                "seq_length": cfg.seq_length, "tokenizer": "instella"})
    model = wrap_ddp(chunks)  # a live training model: generation wraps it in place
    tok = load_tokenizer()
    gen = MegatronGenerator(model, tok, max_batch_size=8)
    greedy = SamplingParams(max_new_tokens=NEW, stop_at_eos=False)
    out = {"batch": gen.generate(prompts(), greedy)}
    out["alone"] = [gen.generate([p], greedy)[0] for p in prompts()[:4]]
    out["small_batches"] = MegatronGenerator(model, tok, max_batch_size=3).generate(prompts(), greedy)

    # KV cache: the logits of every decode step against one forward pass without a cache
    seen = []
    original = gen.controller.sample_from_logits

    def record(last_token_logits, *args, **kwargs):
        seen.append(last_token_logits.float().clone())
        return original(last_token_logits, *args, **kwargs)

    gen.controller.sample_from_logits = record
    decode_calls = []
    attend_all = InstellaDotProductAttention._attend_all
    InstellaDotProductAttention._attend_all = lambda self, *a: decode_calls.append(1) or attend_all(self, *a)
    p = prompts()[5]
    c = gen.generate([p], SamplingParams(max_new_tokens=12, stop_at_eos=False))[0]
    gen.controller.sample_from_logits = original
    InstellaDotProductAttention._attend_all = attend_all
    out["decode_attention_calls"] = len(decode_calls)  # the Instella attention's cached-decode path ran
    out["hot_path"] = _hot_path(gen, prompts(), 6)
    full = _full_forward_logits(gen.model, p + list(c.tokens))
    out["kv_error"] = max((seen[i][0] - full[len(p) - 1 + i]).abs().max().item() for i in range(12))
    out["kv_steps"] = len(seen)

    sample = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=7, stop_at_eos=False)
    out["sampled"] = [gen.generate(prompts()[:3], sample) for _ in range(2)]
    out["sampled_other_seed"] = gen.generate(prompts()[:3], SamplingParams(**{**sample.__dict__, "seed": 8}))
    out["top_k1"] = gen.generate(prompts()[:3], SamplingParams(max_new_tokens=16, temperature=0.7, top_k=1,
                                                                stop_at_eos=False))
    out["top_p_tiny"] = gen.generate(prompts()[:3], SamplingParams(max_new_tokens=16, temperature=1.3, top_p=1e-6,
                                                                    stop_at_eos=False))

    # EOS: a tokenizer whose EOS is the 5th greedy token of prompt 0 ends there (EOS kept)
    eos_tok = copy.deepcopy(tok)
    eos_id = out["batch"][0].tokens[4]
    eos_tok.eos_token = eos_tok.convert_ids_to_tokens(eos_id)
    out["eos_id"] = eos_id
    out["eos"] = MegatronGenerator(model, eos_tok).generate(prompts()[:1], SamplingParams(max_new_tokens=NEW))[0]
    out["eos_ignored"] = MegatronGenerator(model, eos_tok).generate(
        prompts()[:1], SamplingParams(max_new_tokens=NEW, stop_at_eos=False))[0]

    # stop strings: a piece of the greedy text of prompt 2
    text = out["batch"][2].text
    stop = text[len(text) // 2: len(text) // 2 + 4]
    out["stop"] = (stop, gen.generate([prompts()[2]], SamplingParams(max_new_tokens=NEW, stop=(stop, "\x00never")))[0])

    out["loglikelihood"] = gen.loglikelihood(pairs(), max_batch_tokens=24)

    # a checkpoint trained with YaRN: loading it applies its frequencies and softmax scale
    save_checkpoint(save_dir + "_yarn", 5, chunks, cfg, save_rng=False,
                    extra_meta={"spec": "instella", "rope_theta": cfg.rotary_base, "seq_length": cfg.seq_length,
                                "tokenizer": "instella", "rope_scaling": YARN.to_meta()})
    yarn = load_generator(checkpoint_plan(save_dir + "_yarn"), tokenizer=tok)
    out["yarn"] = [c.tokens for c in yarn.generate(prompts()[:3], SamplingParams(max_new_tokens=16,
                                                                                  stop_at_eos=False))]
    out["yarn_inv_freq"] = yarn.model.rotary_pos_emb.inv_freq.clone()

    # the live model: same parameters (no copy), back in training mode, and a training step works
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in gen.model.named_parameters()}
    out["training_after"] = gen.model.training
    tokens = torch.tensor([prompts()[7][:16]])
    loss = gen.model(tokens, torch.arange(16).unsqueeze(0), None, labels=tokens).float().mean()
    loss.backward()
    out["same_storage"] = all(p.data_ptr() == before[n][0] and torch.equal(p.detach(), before[n][1])
                              for n, p in gen.model.named_parameters())
    out["grad_finite"] = all(torch.isfinite(p.main_grad if hasattr(p, "main_grad") else p.grad).all()
                             for p in gen.model.parameters() if p.requires_grad)
    return out


def _hot_path(gen, batch, new):
    """What one ragged generate does per step: forward steps, the lengths RoPE is applied over (ours and
    megatron's own), and whether the CPU mode's function mode is on inside the model's forward."""
    import megatron.core.transformer.attention as attention
    from megatron.core.tensor_parallel import layers, mappings
    from torch.overrides import _get_current_function_mode_stack

    from instella_plugin import cpu_mode
    from instella_plugin.inference import patches
    from instella_plugin.inference.api import SamplingParams

    steps, rotated, megatron_rope, modes, functions = [], [], [], [], []
    forward_step, rotate, apply_rope = gen.wrapper.run_one_forward_step, patches._rotate, attention.apply_rotary_pos_emb
    tp_functions = (layers.LinearWithGradAccumulationAndAsyncCommunication, mappings._CopyToModelParallelRegion,
                    mappings._ReduceFromModelParallelRegion)
    applies = [f.apply for f in tp_functions]

    def count(f, apply):
        f.apply = staticmethod(lambda *a: functions.append(f.__name__) or apply(*a))

    def restore():
        for f in tp_functions:
            del f.apply  # back to torch.autograd.Function.apply (none of them defines its own)

    for f, apply in zip(tp_functions, applies):
        count(f, apply)
    gen.wrapper.run_one_forward_step = lambda inputs: steps.append(inputs["tokens"].shape[1]) or forward_step(inputs)
    patches._rotate = lambda t, cos, sin: rotated.append(t.shape[0]) or rotate(t, cos, sin)
    attention.apply_rotary_pos_emb = lambda t, *a, **k: megatron_rope.append(t.shape[0]) or apply_rope(t, *a, **k)
    hook = gen.model.register_forward_pre_hook(lambda *_: modes.append(len(_get_current_function_mode_stack())))
    try:
        gen.generate(batch, SamplingParams(max_new_tokens=new, stop_at_eos=False))
    finally:
        hook.remove()
        gen.wrapper.run_one_forward_step, patches._rotate, attention.apply_rotary_pos_emb = forward_step, rotate, apply_rope
        restore()
    in_generate = list(functions)
    tokens = torch.tensor([batch[-1]])
    for f, apply in zip(tp_functions, applies):
        count(f, apply)
    try:
        gen.model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)  # outside inference mode
    finally:
        restore()
    return dict(steps=steps, rotated=sorted(set(rotated)), megatron_rope=megatron_rope, modes_in_forward=set(modes),
                cpu_mode=cpu_mode.is_enabled(), modes_after=len(_get_current_function_mode_stack()),
                tp_functions_in_generate=in_generate, tp_functions_outside=sorted(set(functions[len(in_generate):])))


def _layout_worker(save_dir):
    from instella_plugin.inference.api import SamplingParams
    from instella_plugin.inference.loading import checkpoint_plan, load_generator
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    plan = checkpoint_plan(save_dir, ps.get_tensor_model_parallel_world_size(),
                           ps.get_pipeline_model_parallel_world_size())
    gen = load_generator(plan, max_batch_size=8)
    out = gen.generate(prompts(), SamplingParams(max_new_tokens=NEW, stop_at_eos=False))
    sampled = gen.generate(prompts()[:3], SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9,
                                                         seed=7, stop_at_eos=False))
    result = dict(tokens=[c.tokens for c in out], logprobs=[c.logprobs for c in out],
                  sampled=[c.tokens for c in sampled], loglikelihood=gen.loglikelihood(pairs()))
    if ps.get_tensor_model_parallel_world_size() > 1:  # a model trained with sequence parallelism
        set_model_to_sequence_parallel(gen.model, True)
        sp = gen.generate(prompts()[:2], SamplingParams(max_new_tokens=8, stop_at_eos=False))
        result["sequence_parallel"] = ([c.tokens for c in sp], gen.model.config.sequence_parallel,
                                       gen.model.decoder.layers[0].self_attention.linear_qkv.sequence_parallel)
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from instella_plugin.hf.convert import megatron_to_hf

    root = tmp_path_factory.mktemp("generate")
    hf = random_hf_weights(CFG, seed=2)
    (out,) = run_distributed(_tp1_worker, 1, CFG, hf, str(root / "mg"))
    megatron_to_hf(str(root / "mg"), str(root / "hf"), dtype=torch.float32)
    return dict(root=root, out=out)


@pytest.fixture(scope="module")
def hf_model(run):
    import instella_plugin.hf  # noqa: F401  (registers the instella classes)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(run["root"] / "hf"), attn_implementation="eager",
                                                 dtype=torch.float32).eval()
    assert type(model).__name__ == "InstellaForCausalLM"
    return model


def _hf_greedy(model, prompt, new):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=1, use_cache=True)
    return out[0, len(prompt):].tolist()


def _hf_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def test_greedy_equals_transformers_generate(run, hf_model):
    batch = run["out"]["batch"]
    worst = 0.0
    for p, c in zip(prompts(), batch):
        assert len(c.tokens) == NEW and c.finish_reason == "length" and c.prompt_tokens == tuple(p)
        assert list(c.tokens) == _hf_greedy(hf_model, p, NEW)
        ref = _hf_logprobs(hf_model, p + list(c.tokens))
        want = [ref[len(p) - 1 + i, t].item() for i, t in enumerate(c.tokens)]
        worst = max(worst, max(abs(a - b) for a, b in zip(want, c.logprobs)))
    print(f"greedy: 8 prompts x {NEW} tokens equal; max |logprob - transformers| = {worst:.2e}")
    assert worst < 1e-4


def test_ragged_batch_equals_each_prompt_alone(run):
    out = run["out"]
    for whole, alone in zip(out["batch"], out["alone"]):
        assert whole.tokens == alone.tokens
        assert max(abs(a - b) for a, b in zip(whole.logprobs, alone.logprobs)) < 1e-4
    assert [c.tokens for c in out["small_batches"]] == [c.tokens for c in out["batch"]]


def test_kv_cache_decode_equals_full_forward(run):
    out = run["out"]
    print(f"KV-cache decode vs full forward: max |logit diff| over 12 steps = {out['kv_error']:.2e}")
    assert out["kv_steps"] >= 12 and out["kv_error"] < 1e-4
    assert out["decode_attention_calls"] == 11 * CFG.num_layers  # 11 decode steps after the prefill


def test_ragged_batch_prefills_once_and_rotates_only_new_positions(run):
    """Prompts of 2..21 tokens: one prefill over the longest (left-padded), then one step per new token
    (megatron's loop alone forces the longer prompts one token a step: 19 more steps); RoPE is applied
    to the prefill's 21 positions and then to 1 position a step, never to the cache again; the forward
    runs without the CPU mode's function mode, which is back afterwards, and without megatron's
    tensor-parallel autograd Functions, which a forward outside inference mode still takes."""
    hot = run["out"]["hot_path"]
    assert hot["steps"] == [max(LENGTHS)] + [1] * 5
    assert hot["rotated"] == [1, max(LENGTHS)] and hot["megatron_rope"] == []
    assert hot["cpu_mode"] and hot["modes_in_forward"] == {0} and hot["modes_after"] >= 1
    assert hot["tp_functions_in_generate"] == []
    assert hot["tp_functions_outside"] == ["LinearWithGradAccumulationAndAsyncCommunication",
                                           "_CopyToModelParallelRegion", "_ReduceFromModelParallelRegion"]


def test_sampling_is_seeded_and_filters_behave(run):
    out = run["out"]
    first, again = ([c.tokens for c in s] for s in out["sampled"])
    assert first == again
    assert first != [c.tokens for c in out["sampled_other_seed"]]
    greedy16 = [c.tokens[:16] for c in out["batch"][:3]]
    assert first != greedy16  # temperature 0.9 over 16 tokens x 3 prompts leaves greedy somewhere
    assert [c.tokens for c in out["top_k1"]] == greedy16
    assert [c.tokens for c in out["top_p_tiny"]] == greedy16


def test_eos_ends_generation_and_is_kept(run):
    out = run["out"]
    greedy = out["batch"][0].tokens
    eos = out["eos"]
    first = greedy.index(out["eos_id"])
    assert eos.finish_reason == "eos" and eos.tokens == greedy[:first + 1] and len(eos.logprobs) == first + 1
    assert out["eos_ignored"].tokens == greedy and out["eos_ignored"].finish_reason == "length"


def test_stop_string_truncates(run):
    out = run["out"]
    stop, c = out["stop"]
    full = out["batch"][2]
    assert stop and c.finish_reason == "stop"
    assert c.text.endswith(stop) and c.text.count(stop) == 1 and full.text.startswith(c.text)
    assert c.tokens == full.tokens[:len(c.tokens)] and len(c.tokens) < NEW
    assert stop not in full.text[:len(c.text) - 1]  # the earliest occurrence
    assert len(c.logprobs) == len(c.tokens)
    from instella_plugin.data.tokenizer import load_tokenizer

    shorter = load_tokenizer().decode(list(c.tokens[:-1]), skip_special_tokens=True)
    assert stop not in shorter and len(shorter) < len(c.text)  # the fewest tokens that complete the stop


def test_loglikelihood_equals_transformers(run, hf_model):
    got = run["out"]["loglikelihood"]
    worst = 0.0
    for (ctx, cont), (ll, greedy) in zip(pairs(), got):
        ids = (ctx or [0]) + cont
        ref = _hf_logprobs(hf_model, ids)
        start = len(ids) - len(cont)
        want = sum(ref[start - 1 + i, t].item() for i, t in enumerate(cont))
        want_greedy = all(ref[start - 1 + i].argmax().item() == t for i, t in enumerate(cont))
        worst = max(worst, abs(ll - want))
        assert greedy == want_greedy
    print(f"loglikelihood: max |ours - transformers| = {worst:.2e}")
    assert worst < 1e-4


def test_live_model_is_wrapped_in_place(run):
    out = run["out"]
    assert out["training_after"] and out["same_storage"] and out["grad_finite"]


def test_yarn_checkpoint_equals_transformers_yarn(run):
    """The checkpoint's recorded YaRN (factor 2 over 48 positions) is what generation runs: transformers'
    OLMoE with the same rope_parameters (its own YaRN tables and attention factor) gives the same tokens."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeRotaryEmbedding

    from instella_plugin.testing.olmoe_reference import build_olmoe

    out = run["out"]
    ref = build_olmoe(CFG, random_hf_weights(CFG, seed=2)).eval()
    ref.config.rope_parameters = YARN.hf_rope_parameters(CFG.rotary_base, CFG.head_dim)
    ref.model.rotary_emb = OlmoeRotaryEmbedding(ref.config)
    assert torch.allclose(out["yarn_inv_freq"], YARN.inv_freq(CFG.rotary_base, CFG.head_dim))
    for p, got in zip(prompts()[:3], out["yarn"]):
        assert list(got) == _hf_greedy(ref, p, 16)
    assert out["yarn"] != [c.tokens[:16] for c in out["batch"][:3]]  # and it is not plain RoPE


@pytest.mark.dist
@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2),
                                    pytest.param(dict(tp=2, pp=2), marks=pytest.mark.slow)],
                         ids=["tp2", "pp2", "tp2pp2"])
def test_other_layouts_give_the_same_tokens(run, layout):
    results = run_distributed(_layout_worker, layout.get("tp", 1) * layout.get("pp", 1), str(run["root"] / "mg"),
                              **layout)
    want = [c.tokens for c in run["out"]["batch"]]
    for r in results:  # every rank returns the same completions
        assert r["tokens"] == want
        assert r["sampled"] == [c.tokens for c in run["out"]["sampled"][0]]
        worst = max(abs(a - b) for got, c in zip(r["logprobs"], run["out"]["batch"])
                    for a, b in zip(got, c.logprobs))
        assert worst < 1e-4
        assert max(abs(a[0] - b[0]) for a, b in zip(r["loglikelihood"], run["out"]["loglikelihood"])) < 1e-4
        if "sequence_parallel" in r:  # generation runs without it and gives it back
            tokens, config_sp, module_sp = r["sequence_parallel"]
            assert tokens == [t[:8] for t in want[:2]] and config_sp and module_sp
