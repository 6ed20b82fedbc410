"""Applying a RoPE theta to a built megatron model, and resuming mid-ramp, on one gloo rank.

One launch: (1) after ``set_rotary_base`` on the DDP-wrapped model, the cos/sin tables layer 0
actually receives equal an fp64 reference computed here from the closed form; a naive change of
``inv_freq`` alone is shown to leave the stale cached table in use (what the test guards against);
(2) a run with a geometric theta ramp, stopped mid-ramp and resumed into a freshly built model
(different init, build-time theta) from a state-dict checkpoint, continues with losses identical
to the uninterrupted run, while a resume that forgets to re-apply theta does not. The same launch
runs test_packed_attention's one-rank model check (launches cost seconds of imports per rank).
"""
import copy
import functools

import pytest
import torch

from instella_plugin.model.config import get_preset
from instella_plugin.rope.schedule import RopeSchedule

CFG = get_preset("instella-test")
SEQ = 64
NEW_THETA = 514640.0
RAMP = "geometric:10000:514640:2:6"
STEPS, STOP_AT = 8, 4


def _layer0_tables(model, tokens):
    seen = []
    layer0 = model.decoder.layers[0].self_attention
    handle = layer0.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["rotary_pos_emb"].detach().clone()), with_kwargs=True)
    with torch.no_grad():
        model(tokens, torch.arange(tokens.shape[1])[None], None)
    handle.remove()
    emb = seen[0].reshape(tokens.shape[1], -1).double()
    return torch.cos(emb), torch.sin(emb)


def _batch(it):
    g = torch.Generator().manual_seed(100 + it)
    seq = torch.randint(0, CFG.vocab_size, (2, 17), generator=g)
    return seq[:, :-1], seq[:, 1:]


def _train(model, opt, schedule, start, stop, apply_theta=True):
    from instella_plugin.rope.apply import set_rotary_base

    losses, theta = [], None
    for it in range(start, stop):
        want = schedule.theta_at(it)
        if apply_theta and want != theta:
            set_rotary_base(model, want)
            theta = want
        tokens, labels = _batch(it)
        loss = model(tokens, torch.arange(16)[None], None, labels=labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, schedule.theta_at(stop - 1)


def _one_rank_worker(cfg):
    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.rope.apply import current_rotary_base, rope_meta, set_rotary_base, theta_on_resume
    from instella_plugin.rope.schedule import RopeSchedule
    from instella_plugin.training.model_setup import unwrap, wrap_ddp

    out = {}
    tokens = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    # (1) tables after a theta change, through the DDP wrapper
    tcfg = cfg.transformer_config()
    wrapped = wrap_ddp(build_gpt_chunks(cfg, tcfg, init_seed=7))
    model = unwrap(wrapped[0])
    out["before"] = _layer0_tables(model, tokens)
    out["changed"] = set_rotary_base(wrapped, NEW_THETA)
    out["current"] = current_rotary_base(wrapped)
    out["after"] = _layer0_tables(model, tokens)
    naive = build_gpt_chunks(cfg, cfg.transformer_config(), init_seed=7)[0]
    _layer0_tables(naive, tokens)  # fills megatron's lru_cache at theta 10,000
    naive.rotary_pos_emb.inv_freq = 1.0 / (NEW_THETA ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    out["naive"] = _layer0_tables(naive, tokens)

    # (2) resume mid-ramp
    schedule = RopeSchedule.parse(RAMP)

    def fresh(seed):
        m = build_gpt_chunks(cfg, cfg.transformer_config(), init_seed=seed)[0]
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)

    m, opt = fresh(7)
    out["full"], _ = _train(m, opt, schedule, 0, STEPS)
    m, opt = fresh(7)
    first, theta = _train(m, opt, schedule, 0, STOP_AT)
    ckpt = {"model": copy.deepcopy(m.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "iteration": STOP_AT, "meta": rope_meta(theta, STOP_AT - 1, schedule.describe())}
    out["ckpt_has_inv_freq"] = any("inv_freq" in k for k in ckpt["model"])
    for apply_theta in (True, False):
        m, opt = fresh(11)  # other weights, build-time theta 10,000
        m.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        if apply_theta:
            out["resume_theta"] = theta_on_resume(ckpt["meta"], schedule, STOP_AT)
        rest, _ = _train(m, opt, schedule, STOP_AT, STEPS, apply_theta=apply_theta)
        out["resumed" if apply_theta else "stale"] = first + rest
    return out


def _combined_worker(cfg, packed_args):
    from test_packed_attention import _packed_worker

    return {"rope": _one_rank_worker(cfg), "packed": _packed_worker(cfg, *packed_args)}


@functools.lru_cache(maxsize=1)
def one_rank_launch():
    """One 1-rank launch for this file and test_packed_attention's packed-document check."""
    from instella_plugin.testing.distributed import run_distributed
    from test_packed_attention import packed_inputs

    return run_distributed(_combined_worker, 1, CFG, packed_inputs())[0]


@pytest.fixture(scope="module")
def one_rank():
    return one_rank_launch()["rope"]


def _fp64_tables(theta, seq, dim):
    inv = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
    emb = torch.cat([angles, angles], dim=-1)  # rotate-half layout, full rotary dim
    return torch.cos(emb), torch.sin(emb)


@pytest.mark.dist
def test_layer0_tables_after_theta_change_equal_fp64_reference(one_rank):
    assert one_rank["changed"] == 1 and one_rank["current"] == NEW_THETA
    for got, want in zip(one_rank["before"], _fp64_tables(CFG.rotary_base, SEQ, CFG.head_dim)):
        assert (got - want).abs().max().item() <= 1e-5
    for got, want in zip(one_rank["after"], _fp64_tables(NEW_THETA, SEQ, CFG.head_dim)):
        assert (got - want).abs().max().item() <= 1e-5
    # the hazard: changing inv_freq alone keeps serving the cached theta-10,000 table
    stale_cos = one_rank["naive"][0]
    assert (stale_cos - one_rank["before"][0]).abs().max().item() == 0.0
    assert (stale_cos - _fp64_tables(NEW_THETA, SEQ, CFG.head_dim)[0]).abs().max().item() > 0.1


@pytest.mark.dist
def test_resume_mid_ramp_continues_with_identical_losses(one_rank):
    full, resumed, stale = one_rank["full"], one_rank["resumed"], one_rank["stale"]
    assert len(full) == STEPS and resumed == full  # bit-identical
    assert stale[:STOP_AT] == full[:STOP_AT]
    assert max(abs(a - b) for a, b in zip(stale[STOP_AT:], full[STOP_AT:])) > 1e-6
    assert one_rank["resume_theta"] == RopeSchedule.parse(RAMP).theta_at(STOP_AT)
    assert not one_rank["ckpt_has_inv_freq"]  # megatron keeps inv_freq out of the state dict
