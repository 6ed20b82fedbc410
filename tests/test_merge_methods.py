"""Merge methods against closed forms written here and against mergekit 0.1.5's merge-method functions.

Closed forms: hand-computed TIES (trim, elect, disjoint mean) on a 4-element example, SLERP of
orthogonal and colinear vectors, the weighted mean, DARE's mask statistics and ``1/density`` rescale,
a layer-wise schedule. mergekit: its ``linear``, ``slerp``, ``ties``, ``dare_linear`` and ``dare_ties``
kernels on random tensors and on every tensor of three small HF checkpoints merged by ``instella
merge``; merged tensors within 1e-6. Where the definitions differ (DARE's rescale: the paper's
``1/density`` here by default, an L1-norm match in mergekit, so parity runs with ``rescale: l1``;
normalisation defaults; a tie at TIES' k-th magnitude keeps every tied element here) the test passes
the same setting to both sides.
"""
import math

import pytest
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorBatch, TensorGroup
from mergekit.merge_methods.slerp import slerp as mk_slerp

from instella_plugin.hf.merge_config import MergeConfigError, build_spec, load_spec, parse_schedule
from instella_plugin.hf.merge_methods import TensorPlan, merge_tensor, slerp, tensor_seed
from test_hf_model import CFG, write_model

TOL = 1e-6


def reader(tensors):
    return lambda i: tensors[i].clone()


def ours(method, tensors, base=None, name="w", **kw):
    plan = TensorPlan(method=method, **kw)
    return merge_tensor(plan, name, reader(tensors), (lambda: base.clone()) if base is not None else None)


# ---- mergekit's kernels, called directly ------------------------------------------------------------
def mk_linear(tensors, weights):
    batch = TensorBatch([t.unsqueeze(0) for t in tensors])
    return registry.get("linear").merge_batch(batch, weight=torch.tensor([weights]), normalize=True)[0]


def mk_task(method, base, tensors, weights, density, normalize, rescale=False, lam=1.0):
    group = TensorGroup.from_tensors([base, *tensors], base_index=0)
    ids = range(1, len(tensors) + 1)
    return registry.get(method).merge_group(group, weight=dict(zip(ids, weights)), density=dict(zip(ids, density)),
                                            normalize=normalize, rescale=rescale, int8_mask=False, **{"lambda": lam})


def mk_slerp1(t, a, b):
    return mk_slerp(torch.tensor([t]), a.unsqueeze(0), b.unsqueeze(0))[0]


# ---- closed forms -----------------------------------------------------------------------------------
def test_ties_hand_example():
    base = torch.tensor([0.5, 0.5, 0.5, 0.5])
    d1, d2 = torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([-2.0, -2.5, 1.0, 0.1])
    # trim to 2 of 4: d1 -> [3, 0, 0, 2], d2 -> [-2, -2.5, 0, 0]; weights (2, 1): sum [4, -2.5, 0, 4]
    # elected signs [+, -, + (zero counts as +), +]; agreeing: d1 at 0 and 3, d2 at 1; divisors [2, 1, 0->1, 2]
    got = ours("ties", [base + d1, base + d2], base, weights=[2.0, 1.0], density=[0.5, 0.5], lam=0.5)
    want = base + 0.5 * torch.tensor([6.0 / 2, -2.5 / 1, 0.0, 4.0 / 2])
    assert torch.equal(got, want), got
    # without normalisation: the weighted sum of the agreeing entries
    got = ours("ties", [base + d1, base + d2], base, weights=[2.0, 1.0], density=[0.5, 0.5], normalize=False)
    assert torch.equal(got, base + torch.tensor([6.0, -2.5, 0.0, 4.0]))
    assert torch.allclose(got, mk_task("ties", base, [base + d1, base + d2], [2.0, 1.0], [0.5, 0.5], False), atol=0)


def test_slerp_closed_forms():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for t in (0.0, 0.25, 0.5, 1.0):  # orthogonal unit vectors: the point at angle t * 90 degrees
        want = torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)])
        assert torch.allclose(slerp(t, a, b), want, atol=1e-7), t
    a, b = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([2.0, 4.0, -2.0])  # colinear: the linear fallback
    assert torch.allclose(slerp(0.3, a, b), 0.7 * a + 0.3 * b, atol=1e-7)
    near = a + 1e-4 * torch.tensor([1.0, -1.0, 0.5])  # |cos| > 0.9995: linear as well
    assert torch.allclose(slerp(0.6, a, near), 0.4 * a + 0.6 * near, atol=1e-7)
    g = torch.Generator().manual_seed(0)  # equal norms stay equal along the arc (linear would shrink them)
    x, y = torch.randn(64, generator=g), torch.randn(64, generator=g)
    y = y * x.norm() / y.norm()
    assert abs(slerp(0.5, x, y).norm() - x.norm()) < 1e-5 and (0.5 * (x + y)).norm() < 0.9 * x.norm()


def test_linear_and_layerwise_closed_forms():
    xs = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -2.0]]), torch.tensor([[0.0, 8.0]])]
    assert torch.equal(ours("linear", xs, weights=[1.0, 1.0, 2.0]), torch.tensor([[1.0, 4.0]]))
    spec = build_spec("layerwise", ["a", "b"], weights=[parse_schedule("1,0"), parse_schedule("0,1")])
    L = 5
    for i in range(L):
        assert spec.plan(f"decoder.layers.{i}.mlp.linear_fc1.weight", L).weights == [1 - i / 4, i / 4]
        assert spec.plan(f"model.layers.{i}.mlp.up_proj.weight", L).weights == [1 - i / 4, i / 4]
    assert spec.plan("embedding.word_embeddings.weight", L).weights == [1.0, 0.0]
    assert spec.plan("output_layer.weight", L).weights == [0.0, 1.0]
    spec = build_spec("slerp", ["a", "b"], t=[0.0, 0.5, 0.2])  # a 3-point schedule over 5 layers
    assert [round(spec.plan(f"model.layers.{i}.x", L).t, 9) for i in range(L)] == [0.0, 0.25, 0.5, 0.35, 0.2]


def test_dare_mask_rescale_and_determinism():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(200, 300, generator=g)
    x = base + torch.randn(200, 300, generator=g)
    kw = dict(weights=[1.0], density=[0.3], rescale="inverse", seed=7)
    got = ours("dare", [x], base, name="layer.w", **kw)
    delta, kept = x - base, (got - base) != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose((got - base)[kept], delta[kept] / 0.3, atol=1e-5)  # survivors scaled by 1/density
    mask = torch.bernoulli(torch.full(delta.shape, 0.3),  # the documented mask: seeded by (seed, name)
                           generator=torch.Generator().manual_seed(tensor_seed(7, "layer.w")))
    assert torch.allclose(got, base + delta * mask / 0.3, atol=1e-6)
    assert torch.equal(ours("dare", [x], base, name="layer.w", **kw), got)
    assert not torch.equal(ours("dare", [x], base, name="layer.w", **{**kw, "seed": 8}), got)
    assert not torch.equal(ours("dare", [x], base, name="layer.v", **kw), got)
    # density 1 drops nothing: task arithmetic, base + mean of the task vectors
    y = base + torch.randn(200, 300, generator=g)
    full = ours("dare", [x, y], base, weights=[1.0, 1.0], density=[1.0, 1.0], seed=0)
    assert torch.allclose(full, (x + y) / 2, atol=1e-6)


# ---- mergekit on random tensors ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7,), (33, 17), (4, 5, 6)])
def test_parity_with_mergekit_on_random_tensors(shape):
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g)
    xs = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]
    w, dens = [0.5, 1.0, 2.0], [0.3, 0.6, 0.9]
    errors = {}
    errors["linear"] = (ours("linear", xs, weights=w) - mk_linear(xs, w)).abs().max()
    for t in (0.0, 0.3, 0.7, 1.0):
        errors[f"slerp {t}"] = (ours("slerp", xs[:2], t=t) - mk_slerp1(t, xs[0], xs[1])).abs().max()
    for normalize in (True, False):
        errors[f"ties {normalize}"] = (ours("ties", xs, base, weights=w, density=dens, normalize=normalize)
                                       - mk_task("ties", base, xs, w, dens, normalize)).abs().max()
        for combine, mk in (("linear", "dare_linear"), ("ties", "dare_ties")):
            got = ours("dare", xs, base, name="blk.w", weights=w, density=dens, normalize=normalize, combine=combine,
                       rescale="l1", seed=3)
            torch.manual_seed(tensor_seed(3, "blk.w"))  # mergekit draws its masks from the global generator
            want = mk_task(mk, base, xs, w, dens, normalize, rescale=True)
            errors[f"{mk} {normalize}"] = (got - want).abs().max()
    print(shape, {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(v <= TOL for v in errors.values()), errors


@pytest.mark.parametrize("n", [9, 17])
def test_consensus_over_many_inputs_and_chunks_equals_mergekit(monkeypatch, n):
    """TIES' consensus with more than 7 inputs (its agreement bits span two and three bytes per element)
    on a tensor of many element-wise steps (the last one partial), against mergekit."""
    from instella_plugin.hf import merge_methods

    monkeypatch.setattr(merge_methods, "CHUNK", 100)  # 1,073 elements: 11 steps
    g = torch.Generator().manual_seed(n)
    base = torch.randn(37, 29, generator=g)
    xs = [base + 0.1 * torch.randn(base.shape, generator=g) for _ in range(n)]
    w, dens = [0.2 + 0.1 * i for i in range(n)], [0.3 + 0.6 * i / n for i in range(n)]
    errors = {}
    for normalize in (True, False):
        got = ours("ties", xs, base, weights=w, density=dens, normalize=normalize, lam=0.8)
        errors[f"ties {normalize}"] = (got - mk_task("ties", base, xs, w, dens, normalize, lam=0.8)).abs().max()
        got = ours("dare", xs, base, name="blk.w", weights=w, density=dens, normalize=normalize, combine="ties",
                   rescale="l1", seed=5)
        torch.manual_seed(tensor_seed(5, "blk.w"))
        want = mk_task("dare_ties", base, xs, w, dens, normalize, rescale=True)
        errors[f"dare_ties {normalize}"] = (got - want).abs().max()
    assert all(v <= TOL for v in errors.values()), errors


def test_half_width_base_and_inputs_equal_their_fp32_copies():
    """A bf16 base stays bf16 (subtracted and added back block by block): bitwise the merge of fp32 copies."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 48, generator=g).bfloat16()
    xs = [(base.float() + 0.1 * torch.randn(64, 48, generator=g)).bfloat16() for _ in range(3)]
    up = [x.float() for x in xs]
    for method, kw in (("ties", dict(density=[0.4, 0.6, 0.8])), ("dare", dict(density=[0.5] * 3, seed=1)),
                       ("dare", dict(density=[0.5] * 3, seed=1, combine="ties"))):
        got = ours(method, xs, base, weights=[1.0, 2.0, 0.5], lam=0.9, **kw)
        want = ours(method, up, base.float(), weights=[1.0, 2.0, 0.5], lam=0.9, **kw)
        assert got.dtype == torch.float32 and torch.equal(got, want), (method, kw)


# ---- mergekit on small HF checkpoints ---------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    base = write_model(root / "base", "instella", seed=40)
    seeds = []
    for i in range(3):
        w = write_model(root / f"s{i}", "instella", seed=41 + i)
        seeds.append({k: base[k] + 0.2 * (w[k] - base[k]) for k in w})  # seeds near the base, as after stage 2
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in seeds[-1].items()}, str(root / f"s{i}" / "model.safetensors"),
                  metadata={"format": "pt"})
    return root, base, seeds


def test_hf_checkpoint_merges_equal_mergekit(checkpoints, tmp_path):
    from instella_plugin.hf.formats import HFCheckpoint
    from instella_plugin.hf.merge import merge

    root, base, seeds = checkpoints
    paths = [str(root / f"s{i}") for i in range(3)]
    L = CFG.num_layers
    cases = {
        "weighted": (build_spec("weighted", paths, weights=[1.0, 2.0, 3.0]),
                     lambda n, xs: mk_linear(xs, [1.0, 2.0, 3.0])),
        "layerwise": (build_spec("layerwise", paths, weights=[[1.0, 0.0], [0.0, 1.0], 1.0]),
                      lambda n, xs: mk_linear(xs, _layer_weights(n, L))),
        "slerp": (build_spec("slerp", paths[:2], t=0.4), lambda n, xs: mk_slerp1(0.4, xs[0], xs[1])),
        "ties": (build_spec("ties", paths, base=str(root / "base"), weights=[1.0, 1.0, 1.0], density=[0.4]),
                 lambda n, xs: mk_task("ties", base[n], xs, [1.0] * 3, [0.4] * 3, True)),
        "dare_ties": (build_spec("dare_ties", paths, base=str(root / "base"), density=[0.5], rescale="l1", seed=11,
                                 normalize=True), None),
    }
    worst = {}
    for method, (spec, mk) in cases.items():
        out = tmp_path / method
        merge(spec.inputs, str(out), spec=spec)
        merged = HFCheckpoint(str(out))
        err = 0.0
        for name in seeds[0]:
            xs = [s[name] for s in seeds][:spec.n]
            if mk is None:
                torch.manual_seed(tensor_seed(11, name))
                want = mk_task("dare_ties", base[name], xs, [1.0] * 3, [0.5] * 3, True, rescale=True)
            else:
                want = mk(name, xs)
            err = max(err, (merged.get(name) - want).abs().max().item())
        worst[method] = err
    print("max |ours - mergekit| per method:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert all(v <= TOL for v in worst.values()), worst


def _layer_weights(name, L):
    """The layer-wise case's weights by hand: anchors (1, 0) and (0, 1) at i / (L - 1); the third input 1."""
    if ".layers." in name:
        pos = int(name.split(".")[2]) / (L - 1)
    else:
        pos = 0.0 if "embed" in name else 1.0
    return [1 - pos, pos, 1.0]


# ---- refusals, before any tensor is read ------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(method="ties", inputs=["a", "b"], density=[0.5]), "give --base"),
    (dict(method="dare", inputs=["a", "b"], base="s", density=[0.0]), r"density 0.0 is out of range.*\(0, 1\]"),
    (dict(method="ties", inputs=["a", "b"], base="s", density=[1.5]), "density 1.5 is out of range"),
    (dict(method="ties", inputs=["a", "b"], base="s"), "needs one --density per input"),
    (dict(method="weighted", inputs=["a", "b"], weights=[0.0, 0.0]), "sum to zero"),
    (dict(method="weighted", inputs=["a", "b"], weights=[1.0, -1.0]), "non-negative"),
    (dict(method="weighted", inputs=["a", "b"], weights=[1.0]), "1 weights for 2 checkpoints"),
    (dict(method="layerwise", inputs=["a", "b"], weights=[[1.0, 0.0], [0.0, 0.0]]), "sum to zero at layer position 1"),
    (dict(method="layerwise", inputs=["a", "b"], weights=[1.0, 2.0]), "per-layer weight list"),
    (dict(method="slerp", inputs=["a", "b", "c"]), "exactly two"),
    (dict(method="slerp", inputs=["a", "b"], t=1.2), r"t = 1.2 must lie in \[0, 1\]"),
    (dict(method="slerp", inputs=["a", "b"], base="s"), "does not use base"),
    (dict(method="uniform", inputs=["a", "b"], weights=[1.0, 2.0]), "use --method weighted"),
    (dict(method="uniform", inputs=["a", "b"], density=[0.5]), "does not use density"),
    (dict(method="dare", inputs=["a", "b"], base="s", density=[0.5], rescale="l2"), "choose inverse, l1 or none"),
    (dict(method="median", inputs=["a", "b"]), "unknown merge method 'median'"),
    (dict(method="uniform", inputs=["a"]), "at least two"),
])
def test_bad_parameters_are_refused(kwargs, message):
    method, inputs = kwargs.pop("method"), kwargs.pop("inputs")
    with pytest.raises(MergeConfigError, match=message):
        build_spec(method, inputs, **kwargs)


def test_yaml_config_like_mergekit(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("merge_method: dare_ties\nbase_model: s1\nmodels:\n"
                    "  - model: a\n    parameters: {weight: 2.0, density: 0.3}\n"
                    "  - model: b\nparameters: {density: 0.6, lambda: 0.8, seed: 5}\ndtype: bfloat16\n")
    spec = load_spec(str(path))
    assert (spec.method, spec.combine, spec.base, spec.dtype) == ("dare", "ties", "s1", "bfloat16")
    assert spec.resolved_weights() == [2.0, 1.0] and spec.density == [0.3, 0.6] and spec.lam == 0.8 and spec.seed == 5
    path.write_text("merge_method: ties\nmodels:\n  - model: a\n  - model: b\nparameters: {density: 0.5}\n")
    with pytest.raises(MergeConfigError, match="give --base"):
        load_spec(str(path))
    path.write_text("merge_method: ties\nmodels:\n  - model: a\n    parameters: {wieght: 1}\n  - model: b\n")
    with pytest.raises(MergeConfigError, match=r"not \['wieght'\]"):
        load_spec(str(path))


def test_mixed_layouts_are_refused_before_reading(checkpoints, tmp_path):
    from instella_plugin.hf.merge import merge

    root, _, _ = checkpoints
    write_model(tmp_path / "olmoe", "olmoe", seed=5)  # the same model in the OLMoE file layout
    with pytest.raises(ValueError, match=r"mix Hugging Face formats \['instella', 'olmoe'\]; convert them"):
        merge([str(root / "s0"), str(tmp_path / "olmoe")], str(tmp_path / "out"))
    spec = build_spec("ties", [str(root / "s0"), str(root / "s1")], base=str(tmp_path / "olmoe"), density=[0.5])
    with pytest.raises(ValueError, match="mix Hugging Face formats"):
        merge(spec.inputs, str(tmp_path / "out"), spec=spec)
    assert not (tmp_path / "out").exists()


def test_cli_config_file_equals_flags(checkpoints, tmp_path, capsys):
    from instella_plugin.hf.formats import HFCheckpoint
    from instella_plugin.hf.merge_cli import main

    root, _, _ = checkpoints
    a, b, base = str(root / "s0"), str(root / "s1"), str(root / "base")
    config = tmp_path / "ties.yaml"
    config.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                      f"    parameters: {{weight: 2.0}}\n  - model: {b}\nparameters: {{density: 0.3, lambda: 0.7}}\n")
    assert main(["--config", str(config), "--output", str(tmp_path / "c")]) == 0
    assert main(["--method", "ties", "--inputs", a, b, "--base", base, "--weights", "2", "1", "--density", "0.3",
                 "--lambda", "0.7", "--output", str(tmp_path / "f")]) == 0
    c, f = HFCheckpoint(str(tmp_path / "c")), HFCheckpoint(str(tmp_path / "f"))
    assert all(torch.equal(c.get(n), f.get(n)) for n in c.files.names())
    assert main(["--config", str(config), "--density", "0.5", "--output", str(tmp_path / "x")]) == 2
    assert "--density and --config" in capsys.readouterr().err and not (tmp_path / "x").exists()
