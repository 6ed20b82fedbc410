"""``instella convert`` on bad input: clear errors before any output exists, inputs left untouched.

Covered: a truncated safetensors shard, a config.json that does not describe the weights, a
Megatron checkpoint converted with a configuration that does not match it (``--config``), a
checkpoint without its stored configuration, an output directory that already holds a model
(refused unless ``--overwrite``), and non-Instella model types.
"""
import json
import os

import pytest
import torch

from test_hf_model import CFG, write_model
from test_merge import digest


def run_cli(*argv):
    from instella_plugin.hf.convert_cli import main

    return main([str(a) for a in argv])


@pytest.fixture()
def hf_dir(tmp_path):
    write_model(tmp_path / "hf", "instella", seed=4)
    return tmp_path / "hf"


def test_truncated_safetensors(hf_dir, tmp_path, capsys):
    f = hf_dir / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 1000)
    before = digest(hf_dir)
    assert run_cli("--input", hf_dir, "--output", tmp_path / "mg") == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "truncated or corrupt" in err and "holds only" in err
    assert not (tmp_path / "mg").exists() and digest(hf_dir) == before
    with open(f, "r+b") as fh:
        fh.truncate(5)
    assert run_cli("--input", hf_dir, "--output", tmp_path / "mg") == 2
    assert "too short for a safetensors header" in capsys.readouterr().err


def test_config_that_does_not_match_the_weights(hf_dir, tmp_path, capsys):
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 256
    (hf_dir / "config.json").write_text(json.dumps(config))
    before = digest(hf_dir)
    assert run_cli("--input", hf_dir, "--output", tmp_path / "mg") == 2
    err = capsys.readouterr().err
    assert "first mismatching tensor: model.layers.0.mlp.gate_proj.weight has shape (200, 160)" in err
    assert "needs (256, 160)" in err and "fix config.json" in err
    assert not (tmp_path / "mg").exists() and digest(hf_dir) == before


def test_megatron_with_wrong_or_missing_config(hf_dir, tmp_path, capsys):
    assert run_cli("--input", hf_dir, "--output", tmp_path / "mg") == 0
    before = digest(tmp_path / "mg")
    assert run_cli("--input", tmp_path / "mg", "--output", tmp_path / "out", "--config", "instella-test") == 2
    err = capsys.readouterr().err
    assert "first mismatching tensor: embedding.word_embeddings.weight has shape (256, 160)" in err
    assert "needs (512, 320)" in err and "--config" in err
    it_dir = tmp_path / "mg" / "iter_0000000"
    (it_dir / "instella_meta.json").rename(tmp_path / "meta.json")
    assert run_cli("--input", it_dir, "--output", tmp_path / "out") == 2
    assert "pass --config PRESET_OR_JSON" in capsys.readouterr().err
    (tmp_path / "meta.json").rename(it_dir / "instella_meta.json")
    assert not (tmp_path / "out").exists() and digest(tmp_path / "mg") == before
    # with the right configuration given explicitly (a JSON file) it converts
    (tmp_path / "cfg.json").write_text(json.dumps(CFG.to_dict()))
    assert run_cli("--input", it_dir, "--output", tmp_path / "out", "--config", tmp_path / "cfg.json",
                   "--format", "olmoe", "--dtype", "bfloat16") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "olmoe"


def test_output_holding_a_model_needs_overwrite(hf_dir, tmp_path, capsys):
    assert run_cli("--input", hf_dir, "--output", tmp_path / "mg") == 0
    target = tmp_path / "mg"
    before = digest(target)
    assert run_cli("--input", hf_dir, "--output", target) == 2
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err
    assert digest(target) == before
    assert run_cli("--input", target, "--output", hf_dir, "--to", "hf") == 2
    assert run_cli("--input", hf_dir, "--output", target, "--overwrite", "--dtype", "bfloat16") == 0
    meta = json.loads((target / "iter_0000000" / "instella_meta.json").read_text())
    assert meta["converted_from"]["dtype"] == "torch.bfloat16"
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or ".old-" in f]


def test_non_instella_models_are_refused(hf_dir, tmp_path, capsys):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert run_cli("--input", hf_dir, "--output", tmp_path / "o") == 2
    assert "neither 'instella' nor 'olmoe'" in capsys.readouterr().err
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "olmoe", "num_experts": 64,
                                                    "num_experts_per_tok": 8}))
    assert run_cli("--input", hf_dir, "--output", tmp_path / "o") == 2
    assert "64 experts" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
