"""The ``instella`` transformers classes against transformers' own ``OlmoeForCausalLM``, and the exported files.

Random weights (norms 1 + 0.1 N(0,1)) are written in both formats by the converter's HF writer; the
instella model must give the OLMoE logits (fp32, 1e-5), the same greedy tokens with the KV cache,
and the same result for a left-padded batch as for each prompt alone. Registration: an official-
style config.json (top-level ``rope_theta``, ``auto_map`` to remote code that is not there) loads
through the Auto classes without remote code. The tokenizer files give ``apply_chat_template`` ids
equal to the data package's ``ChatFormatter``.
"""
import json
import math
import subprocess
import sys

import pytest
import torch

from instella_plugin.model.config import InstellaConfig
from instella_plugin.model.weight_map import hf_shapes

CFG = InstellaConfig(num_layers=3, hidden_size=160, num_attention_heads=2, num_query_groups=2,
                     ffn_hidden_size=200, vocab_size=250, padded_vocab_size=256, seq_length=64,
                     rotary_base=12345.0, preset="hf-test")


def write_model(path, fmt, seed=0, dtype=torch.float32):
    from instella_plugin.hf import formats
    from instella_plugin.hf.outputs import write_json
    from instella_plugin.hf.safetensors_io import ShardedWriter

    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in hf_shapes(CFG).items():
        t = 1 + 0.1 * torch.randn(shape, generator=g) if name.endswith("norm.weight") else \
            torch.randn(shape, generator=g) * (0.8 / math.sqrt(shape[-1]))
        weights[name] = t.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(str(path), formats.export_plan(CFG, fmt, dtype))
    for name, _, _ in formats.export_plan(CFG, fmt, dtype):
        inst = next((n for n in weights if formats.file_name(n, fmt) == name), None)
        writer.write(name, weights[inst] if inst else torch.zeros(1, CFG.hidden_size, dtype=dtype))
    writer.finish()
    write_json(str(path / "config.json"), formats.config_json(CFG, fmt, rope_theta=CFG.rotary_base,
                                                              max_positions=CFG.seq_length, dtype=dtype))
    return weights


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import instella_plugin.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hfmodel")
    write_model(root / "instella", "instella")
    write_model(root / "olmoe", "olmoe")
    load = dict(attn_implementation="eager", dtype=torch.float32)
    inst = AutoModelForCausalLM.from_pretrained(str(root / "instella"), **load).eval()
    olmoe = AutoModelForCausalLM.from_pretrained(str(root / "olmoe"), **load).eval()
    return root, inst, olmoe


def test_logits_and_greedy_generation_match_olmoe(models):
    _, inst, olmoe = models
    assert type(inst).__name__ == "InstellaForCausalLM" and type(olmoe).__name__ == "OlmoeForCausalLM"
    assert inst.config.rope_parameters["rope_theta"] == olmoe.config.rope_parameters["rope_theta"] == 12345.0
    ids = torch.randint(2, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = inst(input_ids=ids).logits, olmoe(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=1, eos_token_id=None)
    out_i, out_o = inst.generate(ids[:, :8], **gen), olmoe.generate(ids[:, :8], **gen)
    assert out_i.shape == (2, 20) and torch.equal(out_i, out_o)
    # the cached generation equals re-running the full sequence without a cache
    with torch.no_grad():
        full = inst(input_ids=out_i[:, :-1], use_cache=False).logits
    assert torch.equal(full[:, 7:].argmax(-1), out_i[:, 8:])


def test_left_padded_batch_equals_single_prompts(models):
    _, inst, _ = models
    g = torch.Generator().manual_seed(5)
    short, long = torch.randint(2, CFG.vocab_size, (1, 5), generator=g), torch.randint(2, CFG.vocab_size, (1, 9), generator=g)
    batch = torch.cat([torch.cat([torch.ones(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=1, eos_token_id=None)
    together = inst.generate(batch, attention_mask=mask, **gen)
    assert torch.equal(together[0, 9:], inst.generate(short, **gen)[0, 5:])
    assert torch.equal(together[1, 9:], inst.generate(long, **gen)[0, 9:])


def test_official_style_config_loads_without_remote_code(tmp_path):
    import instella_plugin.hf  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    write_model(tmp_path, "instella", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=777.0, transformers_version="4.47.1", auto_map={
        "AutoConfig": "configuration_instella.InstellaConfig",
        "AutoModelForCausalLM": "modeling_instella.InstellaForCausalLM"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = AutoConfig.from_pretrained(str(tmp_path))
    assert type(cfg).__name__ == "InstellaConfig" and cfg.rope_parameters["rope_theta"] == 777.0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(model).__name__ == "InstellaForCausalLM" and model.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq[1].item() == pytest.approx(777.0 ** (-2 / 80), rel=1e-6)


def test_package_import_is_light():
    code = ("import sys, instella_plugin.hf as h; from transformers import AutoConfig; "
            "assert 'instella' in __import__('transformers').models.auto.configuration_auto.CONFIG_MAPPING; "
            "print(sorted(m for m in sys.modules if m.startswith(('megatron', 'instella_plugin.hf.modeling', "
            "'transformers.modeling_utils'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tokenizer_files_chat_template_matches_formatter(tmp_path):
    from transformers import AutoTokenizer

    from instella_plugin.data.sft import ChatFormatter
    from instella_plugin.hf.tokenizer_files import write_tokenizer_files

    write_tokenizer_files(str(tmp_path), None, max_length=4096)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, 1)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (0, 0, 1)
    fmt = ChatFormatter(tok)
    chats = [
        [{"role": "user", "content": "What is 12 * 7?"}, {"role": "assistant", "content": "12 * 7 = 84."}],
        [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "Name a prime."},
         {"role": "assistant", "content": "Seven"}, {"role": "user", "content": "Another, with code: `x = 2`"},
         {"role": "assistant", "content": "def f():\n    return 11\n"}],
    ]
    for chat in chats:
        ids, _ = fmt(chat)
        got = tok.apply_chat_template(chat, tokenize=True, return_dict=False)
        assert list(got) == ids.tolist()
    prompt = tok.apply_chat_template(chats[0][:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|endoftext|><|user|>\nWhat is 12 * 7?\n<|assistant|>\n"
