"""``instella merge``: the mean against an independent element-wise computation, records, refusals.

Three random checkpoints (HF in fp32 and bf16, and Megatron made from them by the converter) are
merged; every merged tensor must equal ``((a.float() + b.float()) + c.float()) / 3`` cast once to the
storage dtype, bitwise. Weighted merges match ``sum w_i x_i / sum w`` within fp32 rounding. Bad
inputs (different architectures, missing/extra tensors, a changed shape, an existing output) are
refused with every problem named and the inputs left byte-for-byte unchanged.
"""
import hashlib
import json
import os

import pytest
import torch

from test_hf_model import CFG, write_model


def digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    out = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        out[tag] = [(str(root / f"{tag}_{i}"), write_model(root / f"{tag}_{i}", "instella", seed=10 + i, dtype=dtype))
                    for i in range(3)]
    return root, out


def reference_mean(tensors, dtype):
    a, b, c = (t.float() for t in tensors)
    return (((a + b) + c) / 3).to(dtype)


@pytest.mark.parametrize("tag,dtype", [("f32", torch.float32), ("bf16", torch.bfloat16)])
def test_hf_merge_is_the_elementwise_mean(inputs, tmp_path, tag, dtype):
    from instella_plugin.hf.formats import HFCheckpoint
    from instella_plugin.hf.merge_cli import main

    _, sets = inputs
    paths = [p for p, _ in sets[tag]]
    assert main(["--inputs", *paths, "--output", str(tmp_path / "m")]) == 0
    merged = HFCheckpoint(str(tmp_path / "m"))
    for name in sets[tag][0][1]:
        got = merged.get(name)
        assert got.dtype == dtype and torch.equal(got, reference_mean([w[name] for _, w in sets[tag]], dtype)), name
    record = json.loads((tmp_path / "m" / "instella_merge.json").read_text())
    assert record["inputs"] == [os.path.abspath(p) for p in paths] and record["weights"] == [1.0, 1.0, 1.0]
    assert record["accumulation"] == "float32"
    assert json.loads((tmp_path / "m" / "config.json").read_text())["hidden_size"] == CFG.hidden_size


def test_weighted_merge(inputs, tmp_path):
    from instella_plugin.hf.formats import HFCheckpoint
    from instella_plugin.hf.merge import merge

    _, sets = inputs
    weights = [2.0, 1.0, 1.0]
    merge([p for p, _ in sets["f32"]], str(tmp_path / "w"), weights)
    merged = HFCheckpoint(str(tmp_path / "w"))
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_norm.weight"):
        want = sum(w * t[name] for w, (_, t) in zip(weights, sets["f32"])) / 4
        assert torch.allclose(merged.get(name), want, rtol=0, atol=1e-6), name
    assert json.loads((tmp_path / "w" / "instella_merge.json").read_text())["normalised_weights"] == [0.5, .25, .25]


def test_megatron_merge_is_weights_only_mean(inputs, tmp_path):
    from instella_plugin.hf.convert import hf_to_megatron
    from instella_plugin.hf.megatron_io import MegatronCheckpoint, param_names
    from instella_plugin.hf.merge import merge
    from instella_plugin.model.weight_map import megatron_param_from_hf
    from instella_plugin.training.checkpointing import read_meta, resolve_checkpoint_dir

    _, sets = inputs
    mg = []
    for i, (path, _) in enumerate(sets["bf16"]):
        hf_to_megatron(path, str(tmp_path / f"mg{i}"))
        mg.append(str(tmp_path / f"mg{i}"))
    before = [digest(p) for p in mg]
    merge(mg, str(tmp_path / "merged"))
    assert [digest(p) for p in mg] == before
    meta = read_meta(str(tmp_path / "merged"))
    assert meta["contents"] == ["model"] and meta["merge"]["inputs"] == [os.path.abspath(p) for p in mg]
    ck = MegatronCheckpoint(resolve_checkpoint_dir(str(tmp_path / "merged")), CFG.num_layers)
    assert not [k for k in ck.reader.read_metadata().state_dict_metadata if k.startswith(("optimizer", "rng"))]
    for name in param_names(CFG.num_layers):
        layer = int(name.split(".")[2]) + 1 if name.startswith("decoder.layers.") else 0
        parts = [megatron_param_from_hf(name, layer, w.__getitem__, CFG, 0, 1) for _, w in sets["bf16"]]
        got = ck.read_param(name)
        assert got.dtype == torch.bfloat16 and torch.equal(got, reference_mean(parts, torch.bfloat16)), name


def test_merge_refuses_different_architectures(inputs, tmp_path):
    from instella_plugin.hf.merge_cli import main

    root, sets = inputs
    other = tmp_path / "other"
    write_model(other, "instella", seed=1)
    config = json.loads((other / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = config["rope_theta"] = 99.0
    (other / "config.json").write_text(json.dumps(config))
    paths = [sets["f32"][0][0], str(other)]
    before = [digest(p) for p in paths]
    with pytest.raises(ValueError, match="rotary_base = 99.0 vs 12345.0"):
        from instella_plugin.hf.merge import merge
        merge(paths, str(tmp_path / "out"))
    assert main(["--inputs", *paths, "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() and [digest(p) for p in paths] == before


def test_merge_lists_every_missing_and_extra_tensor(inputs, tmp_path):
    from safetensors.torch import load_file, save_file

    from instella_plugin.hf.merge import merge

    _, sets = inputs
    bad = tmp_path / "bad"
    write_model(bad, "instella", seed=2)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.weight"], tensors["model.layers.2.self_attn.k_norm.weight"]
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        merge([sets["f32"][0][0], str(bad)], str(tmp_path / "out"))
    msg = str(e.value)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.2.self_attn.k_norm.weight",
                 "model.layers.0.extra.weight"):
        assert name in msg
    # a shape change is named as the first mismatching tensor (the config check comes first)
    tensors = load_file(str(sets["f32"][1][0] + "/model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(CFG.hidden_size, 8)
    odd = tmp_path / "odd"
    write_model(odd, "instella", seed=3)
    save_file(tensors, str(odd / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"first mismatching tensor: model.layers.1.mlp.down_proj.weight has shape"):
        merge([sets["f32"][0][0], str(odd)], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_merge_refuses_existing_output_unless_overwrite(inputs, tmp_path):
    from instella_plugin.hf.merge import merge

    _, sets = inputs
    paths = [p for p, _ in sets["f32"]]
    target = sets["bf16"][0][0]  # an existing model directory
    before = digest(target)
    with pytest.raises(FileExistsError, match="already holds a model; pass --overwrite"):
        merge(paths, target)
    assert digest(target) == before
    with pytest.raises(ValueError, match="mix Hugging Face and Megatron"):
        from instella_plugin.hf.convert import hf_to_megatron
        hf_to_megatron(paths[0], str(tmp_path / "mg"))
        merge([paths[0], str(tmp_path / "mg")], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="2 weights for 3 checkpoints"):
        merge(paths, str(tmp_path / "o"), [1.0, 2.0])
    out = tmp_path / "again"
    merge(paths[:2], str(out))
    merge(paths, str(out), overwrite=True)
    assert len(json.loads((out / "instella_merge.json").read_text())["inputs"]) == 3
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or ".old-" in f]


def test_megatron_merge_keeps_one_rope_method_and_refuses_two(inputs, tmp_path):
    from instella_plugin.hf.convert import hf_to_megatron
    from instella_plugin.hf.merge import merge
    from instella_plugin.rope.methods import RopeScaling
    from instella_plugin.training.checkpointing import read_meta

    _, sets = inputs
    mg = []
    for i, (path, _) in enumerate(sets["bf16"][:2]):
        hf_to_megatron(path, str(tmp_path / f"mg{i}"))
        mg.append(str(tmp_path / f"mg{i}"))
    yarn = RopeScaling(method="yarn", factor=2.0, original_context=CFG.seq_length // 2).to_meta()

    def record(path, scaling):
        for folder, _, files in os.walk(path):
            if "instella_meta.json" in files:
                meta_path = os.path.join(folder, "instella_meta.json")
                meta = json.load(open(meta_path))
                meta["rope_scaling"] = scaling
                json.dump(meta, open(meta_path, "w"))

    record(mg[0], yarn)
    with pytest.raises(Exception, match="RoPE scaling.*only checkpoints of one RoPE method"):
        merge(mg, str(tmp_path / "mixed"))
    assert not (tmp_path / "mixed").exists()
    record(mg[1], yarn)
    merge(mg, str(tmp_path / "merged"))
    assert read_meta(str(tmp_path / "merged"))["rope_scaling"] == yarn
