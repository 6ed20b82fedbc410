"""Blends: the built-in YAMLs carry INSTELLA.md's numbers, the resolver turns stage-2 fractions into
Megatron weights that sample the asked-for tokens, and megatron-core's BlendedMegatronDatasetBuilder
built from them draws samples in those proportions (measured from the samples' own tokens)."""
import json
import os


import numpy as np
import pytest
import yaml

from instella_plugin.data.blends import BLEND_DIR, BlendError, known_blends, load_blend, resolve_blend
from instella_plugin.data.indexed import IndexedDataError, PartialPairWriter
from instella_plugin.data.tokenizer import DatasetTokenizerInfo

SEQ = 32


def _write_source(prefix, tokens, source_id, rng, doc_len=(20, 200)):
    """A pair of exactly `tokens` tokens; every id is 1000 * (source_id + 1) + something < 1000."""
    with PartialPairWriter(prefix) as w:
        left = tokens
        while left:
            n = min(left, int(rng.integers(*doc_len)))
            ids = 1000 * (source_id + 1) + rng.integers(2, 999, size=n)
            ids[-1] = 0  # EOS
            w.add_document(ids)
            left -= n
        w.commit()


def _stage2_fixture(root):
    """Fixture sources for every stage-2 entry with known token counts (dclm split over 3 shards)."""
    rng = np.random.default_rng(0)
    blend = load_blend("stage2")
    counts = {}
    for i, src in enumerate(blend["train"]):
        tokens = {"dclm": 120_000, "flan": 8_000, "pes2o": 60_000, "python-edu": 9_000}.get(src["name"], 1_000 + 137 * i)
        base = os.path.join(root, src["prefix"].split("*")[0].rstrip("/"))
        shards = [tokens // 3, tokens // 3, tokens - 2 * (tokens // 3)] if src["name"] == "dclm" else [tokens]
        for k, n in enumerate(shards):
            _write_source(os.path.join(base, f"part-{k:02d}"), n, i, rng)
        counts[src["name"]] = (tokens, src["fraction"], i)
    return counts


def test_builtin_blends_match_instella_numbers():
    assert set(known_blends()) >= {"stage1", "stage2", "long-phase1", "long-phase2", "sft", "tiny"}
    for name in known_blends():
        load_blend(name)
    s2 = {s["name"]: s["fraction"] for s in load_blend("stage2")["train"]}
    assert (s2["dclm"], s2["flan"], s2["pes2o"], s2["python-edu"]) == (0.0323, 0.5, 0.053, 0.5)
    assert sum(1 for f in s2.values() if f == 1.0) == len(s2) - 4
    assert load_blend("stage2")["total_tokens"] == 13_727 * 4_194_304
    assert all(s["fraction"] == 1.0 for s in load_blend("stage1")["train"]) and len(load_blend("stage1")["train"]) == 7
    p1 = {s["name"]: s["weight"] for s in load_blend("long-phase1")["train"]}
    assert p1 == {"code": .30, "books": .30, "textbooks": .03, "fineweb-edu": .10, "fineweb": .10,
                  "wikipedia": .05, "openwebmath": .05, "stackexchange": .04, "arxiv": .03}
    p2 = {s["name"]: s["weight"] for s in load_blend("long-phase2")["train"]}
    assert p2 == {"code-256k": .20, "code-64k": .10, "books-256k": .15, "books-64k": .15, "textbooks": .02,
                  "fineweb-edu": .10, "fineweb": .10, "wikipedia": .05, "openwebmath": .05,
                  "stackexchange": .04, "arxiv": .04}
    assert {s["name"]: s["fraction"] for s in load_blend("sft")["train"]}["o1-journey"] == 10.0
    with pytest.raises(BlendError, match="built-in blends are .*stage1.*stage2.*tiny"):
        load_blend("stage3")


def test_stage2_fractions_and_measured_megatron_proportions(tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    counts = _stage2_fixture(str(tmp_path))
    resolved = resolve_blend("stage2", str(tmp_path))
    rows = {r.name: r for r in resolved.rows}
    epoch = sum(t * f for t, f, _ in counts.values())
    for name, (tokens, fraction, _) in counts.items():
        assert rows[name].tokens == tokens
        assert rows[name].epoch_tokens == pytest.approx(fraction * tokens)
        assert rows[name].weight * epoch == pytest.approx(fraction * tokens)  # sampled tokens per epoch
    assert len(rows["dclm"].prefixes) == 3
    # what --per-split-data-args-path gets, parsed the way Megatron parses it
    path = resolved.write_per_split_json(str(tmp_path / "split.json"))
    prefixes, weights = get_blend_from_list(json.load(open(path))["train"])
    assert (prefixes, weights) == tuple(map(list, resolved.blend))
    assert "valid" not in json.load(open(path))

    n_samples = 4000
    config = GPTDatasetConfig(
        random_seed=5796, sequence_length=SEQ, blend_per_split=resolved.blend_per_split,
        tokenizer=DatasetTokenizerInfo(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, mid_level_dataset_surplus=0.005)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n_samples, None, None], lambda: True, config).build()
    assert abs(len(train) - n_samples) <= 0.005 * n_samples
    drawn = np.zeros(len(counts))
    for k in range(len(train)):
        ids = train[k]["tokens"].numpy()
        ids = ids[ids >= 1000]
        drawn[np.bincount(ids // 1000 - 1).argmax()] += 1  # which source wrote this sample's tokens
    share = {name: drawn[i] / len(train) for name, (_, _, i) in counts.items()}
    for name, (tokens, fraction, _) in counts.items():
        assert share[name] == pytest.approx(fraction * tokens / epoch, abs=3 / n_samples), name


def test_missing_sources_are_all_listed(tmp_path):
    rng = np.random.default_rng(1)
    _write_source(str(tmp_path / "long" / "code-64k" / "part-0"), 500, 0, rng)
    with pytest.raises(BlendError) as err:
        resolve_blend("long-phase1", str(tmp_path))
    msg = str(err.value)
    assert "8 source(s) have no data" in msg
    for name in ("books", "textbooks", "fineweb-edu", "fineweb", "wikipedia", "openwebmath", "stackexchange", "arxiv"):
        assert f"train/{name}:" in msg
    assert "train/code:" not in msg


def test_user_blend_weights_and_bad_pair(tmp_path):
    rng = np.random.default_rng(2)
    _write_source(str(tmp_path / "a"), 3000, 0, rng)
    _write_source(str(tmp_path / "b"), 1000, 1, rng)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"mode": "weight", "train": [{"prefix": "a", "weight": 1}, {"prefix": "b", "weight": 3}],
                                    "valid": [{"prefix": "b"}]}))
    r = resolve_blend(str(path), str(tmp_path))
    assert r.per_split() == {"train": [0.25, str(tmp_path / "a"), 0.75, str(tmp_path / "b")],
                             "valid": [1.0, str(tmp_path / "b")]}
    assert [row.epoch_tokens for row in r.split_rows("train")] == [pytest.approx(1000 / 3), 1000]  # b runs out first
    assert r.blend_per_split[2] is None
    (tmp_path / "b.idx").write_bytes((tmp_path / "b.idx").read_bytes()[:-4])
    with pytest.raises(IndexedDataError, match="b.idx.*truncated"):
        resolve_blend(str(path), str(tmp_path))
    path.write_text(yaml.safe_dump({"mode": "weight", "train": [{"prefix": "a", "fraction": 0.5}]}))
    with pytest.raises(BlendError, match="'fraction' given in a weight-mode blend"):
        load_blend(str(path))


def test_blend_cli_writes_per_split_json(tmp_path, capsys):
    from instella_plugin.data.cli import main

    rng = np.random.default_rng(3)
    for i, name in enumerate(["english_text_document", "arithmetic_text_document",
                              "english_valid_text_document", "arithmetic_valid_text_document"]):
        _write_source(str(tmp_path / "tiny" / name), 400 + 100 * i, i, rng)
    assert main(["blend", "tiny", "--data-root", str(tmp_path), "--output", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "tiny-english" in out and "tokens/epoch" in out
    data = json.load(open(tmp_path / "s.json"))
    assert data["train"] == [0.7, str(tmp_path / "tiny" / "english_text_document"),
                             0.3, str(tmp_path / "tiny" / "arithmetic_text_document")]
    assert set(data) == {"train", "valid", "test"}
    assert main(["blend", "stage1", "--data-root", str(tmp_path)]) == 2
    assert "7 source(s) have no data" in capsys.readouterr().err
