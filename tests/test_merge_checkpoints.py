"""Merge methods on real Megatron checkpoints, held-out loss, greedy soup, the report, refusals.

Three "seeds" and a base with known weights (seeds = base + a small random task vector): the base and
two seeds are saved by megatron-core at TP=2 through the trainer's ``save_checkpoint`` (2 gloo ranks),
the third seed is written by ``instella convert`` (the single-process layout), so every merge reads
mixed layouts. Merged tensors must equal mergekit's kernels applied to the known weights (1e-6);
the held-out loss of a Megatron checkpoint must equal the loss transformers' own model computes on
the converted HF checkpoint; greedy soup must keep and drop ingredients as its scores say; the report
must hold the numbers its files claim. Bad inputs are refused before anything is written.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorBatch, TensorGroup
from mergekit.merge_methods.slerp import slerp as mk_slerp

from instella_plugin.model.config import get_preset
from instella_plugin.testing.distributed import run_distributed
from instella_plugin.testing.olmoe_reference import random_hf_weights

CFG = get_preset("instella-test")
SEEDS = ("seed_a", "seed_b", "seed_c")


def _save_worker(cfg, weights, root):
    from megatron.core import parallel_state as ps

    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.weight_map import load_hf_into_model
    from instella_plugin.training.checkpointing import save_checkpoint

    tcfg = cfg.transformer_config(tensor_parallel=ps.get_tensor_model_parallel_world_size())
    chunks = build_gpt_chunks(cfg, tcfg, init_seed=3)
    for name, hf in weights.items():
        for c in chunks:
            load_hf_into_model(c, hf.__getitem__, cfg)
        save_checkpoint(os.path.join(root, name), 5, chunks, cfg, save_rng=False,
                        extra_meta={"spec": "instella", "rotary_base": cfg.rotary_base, "seq_length": cfg.seq_length,
                                    "tokenizer": "instella"})


def _write_tokens(prefix, vocab, n_docs=24, seed=0):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        doc = rng.integers(2, vocab, size=int(rng.integers(20, 60)))
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from safetensors.torch import save_file

    from instella_plugin.hf import formats
    from instella_plugin.hf.convert import hf_to_megatron
    from instella_plugin.hf.outputs import write_json

    root = tmp_path_factory.mktemp("mgmerge")
    base = random_hf_weights(CFG, seed=1)
    hf = {"base": base}
    for i, name in enumerate(SEEDS):
        noise = random_hf_weights(CFG, seed=10 + i)
        hf[name] = {k: base[k] + 0.15 * (noise[k] - (1.0 if k.endswith("norm.weight") else 0.0)) for k in base}
    run_distributed(_save_worker, 2, CFG, {k: hf[k] for k in ("base", "seed_a", "seed_b")}, str(root), tp=2)
    (root / "hf_c").mkdir()
    save_file({k: v.contiguous() for k, v in hf["seed_c"].items()}, str(root / "hf_c" / "model.safetensors"),
              metadata={"format": "pt"})
    write_json(str(root / "hf_c" / "config.json"), formats.config_json(
        CFG, "instella", rope_theta=CFG.rotary_base, max_positions=CFG.seq_length, dtype=torch.float32))
    hf_to_megatron(str(root / "hf_c"), str(root / "seed_c"))
    _write_tokens(str(root / "heldout"), CFG.vocab_size)
    return root, hf


def megatron_weights(hf):
    """Megatron parameter name -> tensor for known HF weights (the converter's mapping)."""
    from instella_plugin.hf.megatron_io import param_names
    from instella_plugin.model.weight_map import megatron_param_from_hf

    out = {}
    for name in param_names(CFG.num_layers):
        layer = int(name.split(".")[2]) + 1 if name.startswith("decoder.layers.") else 0
        out[name] = megatron_param_from_hf(name, layer, hf.__getitem__, CFG, 0, 1)
    return out


def read_all(path):
    from instella_plugin.hf.megatron_io import MegatronCheckpoint, param_names
    from instella_plugin.training.checkpointing import resolve_checkpoint_dir

    ck = MegatronCheckpoint(resolve_checkpoint_dir(path), CFG.num_layers)
    return {n: ck.read_param(n) for n in param_names(CFG.num_layers)}


def test_megatron_merges_equal_mergekit(ckpts, tmp_path):
    from instella_plugin.hf.merge import merge
    from instella_plugin.hf.merge_config import build_spec
    from instella_plugin.training.checkpointing import read_meta

    root, hf = ckpts
    inputs = [str(root / s) for s in SEEDS]
    mg = {k: megatron_weights(v) for k, v in hf.items()}
    L = CFG.num_layers

    def mk_ties(n, xs, base):
        group = TensorGroup.from_tensors([base, *xs], base_index=0)
        return registry.get("ties").merge_group(group, weight={1: 1.0, 2: 2.0, 3: 1.0}, density={1: .4, 2: .4, 3: .4},
                                                normalize=True, rescale=False, int8_mask=False, **{"lambda": 0.9})

    def mk_layerwise(n, xs, base):
        pos = int(n.split(".")[2]) / (L - 1) if n.startswith("decoder.layers.") else (0.0 if "embed" in n else 1.0)
        batch = TensorBatch([x.unsqueeze(0) for x in xs])
        return registry.get("linear").merge_batch(batch, weight=torch.tensor([[1 - pos, pos, 0.5]]), normalize=True)[0]

    cases = {
        "ties": (build_spec("ties", inputs, base=str(root / "base"), weights=[1.0, 2.0, 1.0], density=[0.4], lam=0.9),
                 mk_ties),
        "slerp": (build_spec("slerp", [inputs[0], inputs[2]], t=0.35),
                  lambda n, xs, base: mk_slerp(torch.tensor([0.35]), xs[0][None], xs[2][None])[0]),
        "layerwise": (build_spec("layerwise", inputs, weights=[[1.0, 0.0], [0.0, 1.0], 0.5]), mk_layerwise),
    }
    worst = {}
    for label, (spec, reference) in cases.items():
        out = tmp_path / label
        merge(spec.inputs, str(out), spec=spec)
        got = read_all(str(out))
        xs = [mg[s] for s in SEEDS]
        worst[label] = max((got[n] - reference(n, [x[n] for x in xs], mg["base"][n])).abs().max().item() for n in got)
        meta = read_meta(str(out))
        assert meta["contents"] == ["model"] and meta["merge"]["method"] == spec.method
    print("Megatron merges, max |ours - mergekit|:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert all(v <= 1e-6 for v in worst.values()), worst
    record = json.loads((tmp_path / "ties" / "instella_merge.json").read_text())
    assert record["base"] == str(root / "base") and record["density"] == [0.4] * 3 and record["lambda"] == 0.9


def test_heldout_loss_equals_transformers_on_the_converted_checkpoint(ckpts, tmp_path):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from instella_plugin.hf.convert import megatron_to_hf
    from instella_plugin.hf.merge_eval import HeldOutLoss

    root, _ = ckpts
    ev = HeldOutLoss([str(root / "heldout")], seq_length=16, num_samples=12, batch_size=5)
    loss = ev(str(root / "seed_a"))
    megatron_to_hf(str(root / "seed_a"), str(tmp_path / "hf"), dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    w = ev.windows()
    assert w.shape == (12, 17)
    with torch.no_grad():
        logits = model(input_ids=w[:, :-1]).logits
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)).item()
    print(f"held-out loss {loss:.6f} vs transformers {want:.6f}")
    assert abs(loss - want) < 1e-5 and math.log(CFG.vocab_size) - 1 < loss < math.log(CFG.vocab_size) + 2


class RecordScore:
    """A scorer that reads which inputs a candidate holds (its merge record) and looks up a table."""
    name, higher_is_better = "table loss", False

    def __init__(self, table, inputs):
        self.table, self.inputs, self.calls = table, inputs, []

    def __call__(self, path):
        self.calls.append(path)
        if path in self.inputs:
            return self.table[(os.path.basename(path),)]
        rec = json.loads(open(os.path.join(path, "instella_merge.json")).read())
        held = tuple(sorted(os.path.basename(p) for p, w in zip(rec["inputs"], rec["weights"]) if w > 0))
        return self.table[held]


def test_greedy_soup_keeps_what_does_not_hurt(ckpts, tmp_path):
    from instella_plugin.hf.merge_soup import greedy_soup

    root, _ = ckpts
    inputs = [str(root / s) for s in SEEDS]
    # ranking c < a < b; c+a improves (kept), c+a+b is worse (dropped)
    table = {("seed_a",): 2.0, ("seed_b",): 3.0, ("seed_c",): 1.5, ("seed_a", "seed_c"): 1.4,
             ("seed_a", "seed_b", "seed_c"): 1.45}
    ev = RecordScore(table, inputs)
    soup = greedy_soup(inputs, str(tmp_path / "soup"), ev, log=lambda s: None)
    assert [os.path.basename(p) for p in soup["order"]] == ["seed_c", "seed_a", "seed_b"]
    assert [s["kept"] for s in soup["steps"]] == [True, True, False] and soup["score"] == 1.4
    assert sorted(os.path.basename(p) for p in soup["ingredients"]) == ["seed_a", "seed_c"]
    got, a, c = read_all(str(tmp_path / "soup")), read_all(inputs[0]), read_all(inputs[2])
    for n in got:  # the soup is the uniform mean of its ingredients
        assert torch.equal(got[n], ((a[n].float() + c[n].float()) / 2).to(got[n].dtype)), n
    assert not [f for f in os.listdir(tmp_path) if f != "soup"]  # candidates removed


def test_report_numbers_and_files(ckpts, tmp_path):
    from instella_plugin.hf.merge import merge
    from instella_plugin.hf.merge_eval import HeldOutLoss
    from instella_plugin.hf.merge_report import barrier_height, load_methods, seed_soup_report

    root, _ = ckpts
    inputs = [str(root / s) for s in SEEDS]
    ev = HeldOutLoss([str(root / "heldout")], seq_length=16, num_samples=8)
    inputs = inputs[:2]
    methods = load_methods(select=["uniform", "ties"])
    rep = seed_soup_report(inputs, str(tmp_path / "rep"), ev, base=str(root / "base"), methods=methods, points=3,
                           log=lambda s: None)
    files = sorted(os.listdir(tmp_path / "rep"))
    assert files == ["barrier.png", "methods.png", "report.json", "report.md"], files
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["methods"]["ties"]["score"] == \
        rep["methods"]["ties"]["score"]
    merge(inputs, str(tmp_path / "u"))  # the uniform row is the loss of the uniform merge
    assert abs(rep["methods"]["uniform"]["score"] - ev(str(tmp_path / "u"))) < 1e-9
    assert len(rep["barriers"]) == 1
    for b in rep["barriers"]:
        assert b["scores"][0] == rep["inputs"][b["a"]] and b["scores"][-1] == rep["inputs"][b["b"]]
        mid = b["scores"][1] - (b["scores"][0] + b["scores"][2]) / 2
        assert b["barrier"] == pytest.approx(mid) == pytest.approx(barrier_height(b["t"], b["scores"]))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| ties" in md and "Interpolation barrier" in md and f"{rep['methods']['ties']['score']:.4f}" in md
    assert not [f for f in os.listdir(tmp_path) if ".work-" in f or ".tmp-" in f]


def test_bad_inputs_are_refused_before_reading(ckpts, tmp_path, capsys):
    from instella_plugin.hf.convert import hf_to_megatron
    from instella_plugin.hf.merge import merge
    from instella_plugin.hf.merge_cli import main
    from instella_plugin.hf.merge_config import build_spec
    from instella_plugin.model.config import InstellaConfig

    root, _ = ckpts
    inputs = [str(root / s) for s in SEEDS]
    # a base of another vocabulary (a model converted with a larger padded vocab)
    other = InstellaConfig(**{**CFG.to_dict(), "padded_vocab_size": 640})
    (tmp_path / "hf_other").mkdir()
    from safetensors.torch import save_file

    from instella_plugin.hf import formats
    from instella_plugin.hf.outputs import write_json

    save_file({k: v.contiguous() for k, v in random_hf_weights(other).items()},
              str(tmp_path / "hf_other" / "model.safetensors"), metadata={"format": "pt"})
    write_json(str(tmp_path / "hf_other" / "config.json"), formats.config_json(
        other, "instella", rope_theta=other.rotary_base, max_positions=other.seq_length, dtype=torch.float32))
    hf_to_megatron(str(tmp_path / "hf_other"), str(tmp_path / "other"))
    spec = build_spec("ties", inputs, base=str(tmp_path / "other"), density=[0.5])
    with pytest.raises(ValueError, match=r"base .*other has a different architecture .*padded_vocab_size = 640 vs 512"):
        merge(inputs, str(tmp_path / "out"), spec=spec)
    with pytest.raises(ValueError, match="mix Hugging Face and Megatron"):
        merge(inputs, str(tmp_path / "out"), spec=build_spec("ties", inputs, base=str(tmp_path / "hf_other"),
                                                             density=[0.5]))
    with pytest.raises(ValueError, match="is also an input"):
        merge(inputs, str(tmp_path / "out"), spec=build_spec("ties", inputs, base=inputs[0], density=[0.5]))
    cases = [
        (["--method", "ties", "--density", "0.5"], "give --base"),
        (["--method", "dare", "--base", str(root / "base"), "--density", "1.2"], "density 1.2 is out of range"),
        (["--weights", "1", "-1", "0"], "non-negative"),
        (["--weights", "0", "0", "0"], "sum to zero"),
        (["--method", "greedy-soup", "--heldout", str(tmp_path / "nothing")], "nothing"),
        (["--method", "slerp"], "exactly two"),
    ]
    for extra, message in cases:
        assert main(["--inputs", *inputs, "--output", str(tmp_path / "out"), *extra]) == 2, extra
        assert message in capsys.readouterr().err, (extra, message)
    report = ["report", "--inputs", *inputs, "--output", str(tmp_path / "rep"), "--heldout", str(root / "heldout")]
    assert main(report) == 2 and "holds 7 windows of 129 tokens, fewer than the 32" in capsys.readouterr().err
    report += ["--eval-samples", "4", "--eval-seq-length", "16"]
    assert main([*report, "--methods", "median"]) == 2 and "not in" in capsys.readouterr().err
    assert main([*report, "--points", "1"]) == 2 and "at least the two end points" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "rep").exists()
