"""The Megatron-LM integration (patches/): apply.sh, the run-time patch registry, and upstream parity.

Without a checkout (CI): the series is applied by ``patches/apply.sh`` to a fake Megatron-LM git
repository tagged ``core_v0.16.1`` whose ``pretrain_gpt.py`` is made of the patches' own context
lines (no Megatron-LM code is kept here): the first run changes the file, the second changes nothing
and says so; another tag, a locally modified file and a copy without ``.git`` at another version
fail naming the expected tag and leave the tree as it was. The registry's idempotence, anchor
checks and conditions are tested on a throwaway module, and the README against the code.

With ``MEGATRON_LM_DIR`` (a Megatron-LM checkout at the tag; slow tier): the checkout is copied, the
series applied, and upstream ``pretrain_gpt.py --plugin instella --transformer-impl local`` trains
5 iterations of the tiny recipe on CPU from the same ``--load`` checkpoint, data and seed as our own
trainer, with a RoPE theta schedule; the per-iteration losses must agree within 1e-6 relative (and
the LR, grad norm and theta of every iteration with ours), and the checkpoint upstream writes must
carry ``instella_meta.json`` and our weights. The same at PP=2 x VPP=2, and at CP=2 with packed
documents (the plugin's batch hook in upstream's forward step). Dropping the weight-decay run-time patch
moves the losses by 4e-6 at iteration 2 and 1e-4 at iteration 5; a RoPE hook that never fires, by
3e-5 at iteration 3.
"""
import os
import re
import shutil
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = os.path.join(ROOT, "patches")
APPLY = os.path.join(PATCHES, "apply.sh")
TAG = "core_v0.16.1"
GIT_ENV = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost")


def _series():
    return sorted(f for f in os.listdir(PATCHES) if re.match(r"\d{4}-.*\.patch$", f))


def _preimages():
    """{file: [hunk pre-image lines, ...]} over the whole series, in file order."""
    out = {}
    for name in _series():
        text = open(os.path.join(PATCHES, name), encoding="utf-8").read()
        for block in text.split("\ndiff --git ")[1:]:
            path = re.search(r"^\+\+\+ b/(\S+)", block, re.M).group(1)
            for hunk in re.split(r"^@@ [^\n]*\n", block, flags=re.M)[1:]:
                lines = [ln[1:] for ln in hunk.split("\n") if ln[:1] in (" ", "-")]
                out.setdefault(path, []).append(lines)
    return out


def _fake_checkout(root, version=(0, 16, 1)):
    """A tree with the files the series patches (their pre-image lines between filler) + package_info."""
    for path, hunks in _preimages().items():
        body = []
        for k, lines in enumerate(hunks):
            body += [f"# upstream line {k}.{j}" for j in range(4)] + lines
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full) or root, exist_ok=True)
        with open(full, "w", encoding="utf-8") as f:
            f.write("\n".join(body + ["# end"]) + "\n")
    os.makedirs(os.path.join(root, "megatron", "core"), exist_ok=True)
    with open(os.path.join(root, "megatron", "core", "package_info.py"), "w", encoding="utf-8") as f:
        f.write("MAJOR = {}\nMINOR = {}\nPATCH = {}\n".format(*version))


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, env=dict(os.environ, **GIT_ENV))


def _git_checkout(root, tag):
    _fake_checkout(root)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "upstream")
    _git(root, "tag", tag)


def _apply(root):
    return subprocess.run(["bash", APPLY, str(root)], capture_output=True, text=True, timeout=60)


def _snapshot(root):
    return {p: open(os.path.join(root, p), "rb").read() for p in _preimages()}


def test_apply_twice_changes_nothing_the_second_time(tmp_path):
    repo = tmp_path / "megatron-lm"
    _git_checkout(repo, TAG)
    before = _snapshot(repo)
    first = _apply(repo)
    assert first.returncode == 0, first.stderr
    after = _snapshot(repo)
    assert after != before
    text = after["pretrain_gpt.py"].decode()
    assert "PluginHost(sys.argv[1:])" in text and "hooks = _plugin_host.hooks(**hooks)" in text
    for name in _series():
        line = rf"^applied {re.escape(name)}: pretrain_gpt.py \(\+\d+ -\d+\)$"
        assert re.search(line, first.stdout, re.M), first.stdout
    assert f"at tag {TAG}" in first.stdout

    second = _apply(repo)
    assert second.returncode == 0, second.stderr
    assert _snapshot(repo) == after
    assert "nothing changed" in second.stdout and "applied 0" not in second.stdout
    assert second.stdout.count("already applied:") == len(_series())


def test_apply_to_another_tag_fails_naming_the_expected_tag(tmp_path):
    repo = tmp_path / "megatron-lm"
    _git_checkout(repo, "core_v0.16.0")
    before = _snapshot(repo)
    proc = _apply(repo)
    assert proc.returncode == 1
    assert f"not at tag {TAG}" in proc.stderr or f"has no tag {TAG}" in proc.stderr, proc.stderr
    assert f"checkout {TAG}" in proc.stderr
    assert _snapshot(repo) == before

    _git(repo, "tag", TAG)  # the tag exists, but HEAD has moved past it
    with open(repo / "README.md", "w") as f:
        f.write("later\n")
    _git(repo, "add", "README.md")
    _git(repo, "commit", "-q", "-m", "later")
    proc = _apply(repo)
    assert proc.returncode == 1 and f"not at tag {TAG}" in proc.stderr, proc.stderr
    assert _snapshot(repo) == before


def test_partial_and_conflicting_trees(tmp_path):
    repo = tmp_path / "megatron-lm"
    _git_checkout(repo, TAG)
    first = os.path.join(PATCHES, _series()[0])
    _git(repo, "apply", first)  # half the series already in place
    proc = _apply(repo)
    assert proc.returncode == 0, proc.stderr
    assert f"already applied: {_series()[0]}" in proc.stdout and f"applied {_series()[1]}:" in proc.stdout

    _git(repo, "checkout", "--", ".")
    path = repo / "pretrain_gpt.py"  # a local edit inside the second patch's context only
    text = path.read_text().replace("        store=store,\n", "        store=None,\n")
    path.write_text(text)
    proc = _apply(repo)
    assert proc.returncode == 1 and _series()[1] in proc.stderr and "pretrain_gpt.py" in proc.stderr, proc.stderr
    assert path.read_text() == text  # the first patch, which would apply, was not applied either


def test_copy_without_git_is_judged_by_its_core_version(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    _fake_checkout(good)
    _fake_checkout(bad, version=(0, 15, 2))
    proc = _apply(good)
    assert proc.returncode == 0 and "(no .git) has megatron-core 0.16.1" in proc.stdout, proc.stderr
    proc = _apply(bad)
    assert proc.returncode == 1 and "megatron-core 0.15.2, not tag core_v0.16.1" in proc.stderr, proc.stderr
    proc = _apply(tmp_path / "missing")
    assert proc.returncode == 1 and "is not a directory" in proc.stderr


# ---- run-time patches -----------------------------------------------------------------------------
@pytest.fixture
def fake_upstream(monkeypatch):
    mod = types.ModuleType("fake_megatron_training")
    mod.validate = lambda x: x + 1
    mod.report = lambda x: f"report {x}"
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod


def test_registry_is_idempotent_anchored_and_conditional(fake_upstream):
    from instella_plugin.upstream.registry import PatchRegistry, UpstreamDriftError

    reg = PatchRegistry()
    calls = []

    @reg.register("double", fake_upstream.__name__, "validate", reason="test")
    def _double(original):
        def validate(x):
            calls.append(x)
            return 2 * original(x)
        return validate

    @reg.register("off", fake_upstream.__name__, "report", reason="test", condition=lambda: False)
    def _off(original):
        return lambda x: "patched"

    original = fake_upstream.validate
    assert reg.apply() == ["double"]
    wrapped = fake_upstream.validate
    assert wrapped(3) == 8 and calls == [3] and wrapped.__wrapped__ is original
    assert fake_upstream.report(1) == "report 1"  # condition false: untouched
    assert reg.apply() == [] and fake_upstream.validate is wrapped  # twice changes nothing
    again = PatchRegistry()  # another registry instance sees the mark and does not wrap twice
    again.register("double", fake_upstream.__name__, "validate", reason="test")(_double)
    assert again.apply() == [] and fake_upstream.validate is wrapped and again.applied() == ["double"]

    drift = PatchRegistry()
    drift.register("ok", fake_upstream.__name__, "report", reason="test")(lambda o: (lambda x: "new"))
    drift.register("gone", fake_upstream.__name__, "renamed_upstream", reason="test")(lambda o: o)
    with pytest.raises(UpstreamDriftError, match=rf"'gone'.*renamed_upstream.*{TAG}"):
        drift.apply()
    assert fake_upstream.report(1) == "report 1"  # nothing replaced when one anchor is missing
    with pytest.raises(ValueError, match="unknown run-time patches"):
        drift.apply(["nope"])


def test_readme_lists_every_change():
    from instella_plugin.upstream import cpu, registry, runtime  # noqa: F401  (registering)

    readme = open(os.path.join(PATCHES, "README.md"), encoding="utf-8").read()
    for patch in registry.registered():
        assert f"`{patch.name}`" in readme and f"`{patch.target}`" in readme, patch.name
    for name in _series():
        assert f"`{name}`" in readme, name
    assert {p.phase for p in registry.registered()} == {"startup", "cpu"}
    assert f"EXPECTED_TAG={registry.EXPECTED_TAG}" in open(APPLY, encoding="utf-8").read()
    assert registry.applied() == []  # importing patches nothing


def test_host_arguments_join_megatron_parser_without_clashes():
    """The plugin's flags join a Megatron-LM-style parser; a flag it already has keeps its definition."""
    import argparse

    from instella_plugin.training.plugins import load_plugin
    from instella_plugin.upstream.host import PluginHost, wants_plugin

    host = PluginHost.__new__(PluginHost)  # no __init__: it would switch this process to the CPU mode
    host.plugin, host.parser = load_plugin("instella"), None
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--data-blend", type=int, default=7)  # stands for a flag both define
    parser = host.extra_args_provider(lambda p: p)(parser)
    args = parser.parse_args(["--plugin", "instella", "--instella-recipe", "tiny-cpu", "--device", "cpu"])
    assert (args.plugin, args.instella_recipe, args.device, args.data_blend) == ("instella", "tiny-cpu", "cpu", 7)
    assert host.parser is parser and args.decay_all_params is False
    assert wants_plugin(["--plugin=instella"]) and not wants_plugin(["--plugins", "x"])


def test_host_sends_packed_documents_and_cp_through_the_batch_hook_and_refuses_packed_pp():
    from types import SimpleNamespace

    from instella_plugin.upstream.host import _check_batch_hook_layout, _uses_batch_hook

    def args(packed, cp, pp):
        return SimpleNamespace(packed_documents=packed, context_parallel_size=cp, pipeline_model_parallel_size=pp)
    assert not _uses_batch_hook(args(False, 1, 2))
    assert _uses_batch_hook(args(True, 1, 1)) and _uses_batch_hook(args(False, 2, 2))
    _check_batch_hook_layout(args(True, 2, 1))
    _check_batch_hook_layout(args(False, 2, 2))  # CP with PP: later stages need no tokens
    with pytest.raises(SystemExit, match="--packed-documents with --pipeline-model-parallel-size > 1.*PP=1"):
        _check_batch_hook_layout(args(True, 1, 2))


def test_cpu_stand_in_for_batch_invariant_kernels():
    code = ("import importlib, sys\n"
            "from instella_plugin.upstream import cpu\n"
            "if importlib.util.find_spec('triton'): print('triton'); sys.exit()\n"
            "assert cpu.before_import() and not cpu.before_import()\n"
            "m = importlib.import_module('megatron.core.transformer.custom_layers.batch_invariant_kernels')\n"
            "assert not m.is_batch_invariant_mode_enabled()\n"
            "try:\n    m.enable_batch_invariant_mode()\nexcept RuntimeError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.strip() == "triton":
        pytest.skip("triton is installed: megatron's own batch-invariant kernels import, no stand-in needed")
    assert "--batch-invariant-mode needs triton" in proc.stdout


# ---- upstream parity (needs a Megatron-LM checkout) -------------------------------------------------
RECIPE = ["--plugin", "instella", "--instella-recipe", "tiny-cpu", "--device", "cpu", "--log-interval", "1"]


def _copy_checkout(src: str, dst: str) -> None:
    """The checkout's HEAD commit (a local clone shares its objects), or a plain copy without ``.git``."""
    if os.path.isdir(os.path.join(src, ".git")):
        subprocess.run(["git", "clone", "-q", "--shared", src, dst], check=True, capture_output=True)
    else:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.so", "__pycache__"))


def _run_upstream(mlm: str, args, timeout=1500, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "pretrain_gpt.py",
           *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run(cmd, cwd=mlm, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0 or not check, \
        f"upstream pretrain_gpt.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


NEEDS_CHECKOUT = pytest.mark.skipif(
    not os.environ.get("MEGATRON_LM_DIR"),
    reason="MEGATRON_LM_DIR is not set: point it at a Megatron-LM checkout at tag core_v0.16.1 to run upstream "
           "pretrain_gpt.py --plugin instella against our trainer (CI has none)")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """(patched copy of MEGATRON_LM_DIR, its commit, common flags, the shared --load checkpoint, work dir)."""
    from instella_plugin.data.demo_corpus import build_demo_corpus
    from instella_plugin.testing.trainer import run_trainer

    work = tmp_path_factory.mktemp("upstream")
    src = os.environ["MEGATRON_LM_DIR"]
    assert os.path.isfile(os.path.join(src, "pretrain_gpt.py")), f"MEGATRON_LM_DIR={src} is not a Megatron-LM checkout"
    mlm = str(work / "megatron-lm")
    _copy_checkout(src, mlm)
    proc = _apply(mlm)
    assert proc.returncode == 0, proc.stderr
    commit = subprocess.run(["git", "-C", mlm, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    data = str(work / "data")
    build_demo_corpus(data, num_docs=400, num_chats=16)
    common = [*RECIPE, "--data-blend", "tiny", "--data-root", data]
    start = str(work / "start")  # the shared --load checkpoint: one iteration of our trainer (TP=2)
    run_trainer(2, [*common, "--no-plot", "--train-iters", "1", "--lr-warmup-iters", "0", "--save", start])
    return mlm, commit, common, start, work


def _both_hosts(upstream, name, extra):
    """Train 5 iterations from the shared checkpoint on both hosts; return (ours dir, upstream dir, records)."""
    import json

    from instella_plugin.testing.trainer import read_log, run_trainer

    mlm, commit, common, start, work = upstream
    run = ["--train-iters", "5", "--lr-warmup-iters", "2", "--load", start, "--finetune", *extra]
    ours, theirs = str(work / f"ours_{name}"), str(work / f"theirs_{name}")
    run_trainer(2, [*common, *run, "--no-plot", "--save", ours])
    up = _run_upstream(mlm, [*common, *run, "--transformer-impl", "local", "--num-workers", "0", "--save", theirs])
    assert "successfully loaded checkpoint from" in up.stdout, up.stdout[-3000:]

    want, _ = read_log(ours)
    got, _ = read_log(theirs)
    records = [json.loads(line) for line in open(os.path.join(theirs, "train_log.jsonl"), encoding="utf-8")]
    assert {r["host"] for r in records} == {"megatron-lm"}
    print(f"\nMegatron-LM {commit} ({TAG}), {name}: loss per iteration, ours vs upstream pretrain_gpt.py --plugin")
    for it in sorted(want):
        other = got.get(it, float("nan"))
        print(f"  {it}: {want[it]:.9f} {other:.9f}  rel {abs(other - want[it]) / want[it]:.2e}")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    for it in want:
        assert abs(got[it] - want[it]) <= 1e-6 * abs(want[it]), (it, want[it], got[it])
    mine = {r["iteration"]: r for r in map(json.loads, open(os.path.join(ours, "train_log.jsonl"))) if "loss" in r}
    for r in records:  # the LR schedule, gradient clipping and RoPE hook saw the same numbers
        assert r["lr"] == pytest.approx(mine[r["iteration"]]["lr"], rel=1e-12)
        assert r["grad_norm"] == pytest.approx(mine[r["iteration"]]["grad_norm"], rel=1e-5)
        assert r["rope_theta"] == mine[r["iteration"]]["rope_theta"]
    return ours, theirs, records


@pytest.mark.slow
@NEEDS_CHECKOUT
def test_upstream_pretrain_gpt_matches_our_trainer(upstream):
    """The tiny recipe as it is (TP=2), with a RoPE schedule; then the checkpoint upstream wrote."""
    # theta moves 10000 -> 40000 over iterations 1..4, so the RoPE hook shows in the losses (3e-5 at iteration 3)
    ours, theirs, records = _both_hosts(upstream, "tp2", ["--rope-schedule", "geometric:10000:40000:1:4"])
    assert [r["rope_theta"] for r in records] == pytest.approx([1e4, 1e4, 1e4 * 4 ** (1 / 3), 1e4 * 4 ** (2 / 3), 4e4])

    # The checkpoint upstream wrote carries instella_meta.json, and its weights are ours (to float rounding).
    from instella_plugin.hf.megatron_io import MegatronCheckpoint, param_names
    from instella_plugin.training.checkpointing import read_meta, resolve_checkpoint_dir

    meta, own = read_meta(theirs), read_meta(ours)
    assert meta["host"] == "megatron-lm" and meta["iteration"] == 5 and meta["contents"] == ["model"]
    assert meta["model"] == own["model"] and meta["rope_theta"] == own["rope_theta"] == 40000.0
    a = MegatronCheckpoint(resolve_checkpoint_dir(ours), 4)
    b = MegatronCheckpoint(resolve_checkpoint_dir(theirs), 4)
    worst = max((a.read_param(n).double() - b.read_param(n).double()).abs().max().item() for n in param_names(4))
    print(f"  weights after 5 iterations: max |ours - upstream| = {worst:.2e}")
    assert worst <= 1e-6

    # Resuming that checkpoint (theta 40000) with the recipe's constant theta is refused, as ours does.
    mlm, _, common, _, _ = upstream
    bad = _run_upstream(mlm, [*common, "--train-iters", "6", "--load", theirs, "--save", theirs,
                              "--transformer-impl", "local", "--num-workers", "0"], check=False)
    assert bad.returncode != 0 and "--override-rope-theta" in bad.stdout + bad.stderr, bad.stderr[-3000:]


@pytest.mark.slow
@NEEDS_CHECKOUT
def test_upstream_pipeline_with_virtual_stages_matches_our_trainer(upstream):
    """PP=2 x VPP=2 (TP=1): the builder's chunks per virtual stage, loading a TP=2 checkpoint into them."""
    _both_hosts(upstream, "pp2vpp2", ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
                                      "--num-layers-per-virtual-pipeline-stage", "1"])


@pytest.mark.slow
@NEEDS_CHECKOUT
def test_upstream_context_parallel_with_packed_documents_matches_our_trainer(upstream):
    """CP=2 (TP=1) with packed documents: upstream's forward step runs the plugin's batch hook (document
    boundaries from the whole sequence, then this CP rank's share) instead of its own CP slicing."""
    _both_hosts(upstream, "cp2packed", ["--tensor-model-parallel-size", "1", "--context-parallel-size", "2",
                                        "--packed-documents"])
