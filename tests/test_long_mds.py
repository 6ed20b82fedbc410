"""MDS input: shards written by mosaicml-streaming's own MDSWriter come back as packed long-SFT samples.

The round trip: ProLong-layout samples (``input_ids``, ``indices``, ``mask``, ``length``, ``domain``)
-> ``instella data prepare --input-format mds`` -> SFT store -> ``SFTDataset(pack=True)``: each window
holds exactly one sample's tokens, its segment ids change exactly at the sample's document spans,
and its loss mask is the sample's mask shifted to the labels.
"""
import numpy as np
import pytest

from instella_plugin.cli import main as instella_main
from instella_plugin.data import mds  # registers the streaming package by path
from instella_plugin.data.mds import MDSWriter  # streaming's own writer (the package registered by path)
from instella_plugin.data.sft import SFTDataset

SEQ = 64
COLUMNS = {"input_ids": "ndarray:uint32", "length": "uint64", "domain": "str", "indices": "ndarray:uint32",
           "mask": "ndarray:uint8"}


def make_samples(n, seed=0, with_mask=True):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(2, 50000, SEQ).astype(np.uint32)
        cuts = np.sort(rng.choice(np.arange(3, SEQ - 2), size=rng.integers(1, 4), replace=False))
        edges = [0, *cuts.tolist(), SEQ]
        spans = np.array(list(zip(edges, edges[1:])), dtype=np.uint32)
        mask = (rng.random(SEQ) < 0.6).astype(np.uint8)
        sample = {"input_ids": ids, "length": SEQ, "domain": "books", "indices": spans}
        if with_mask:
            sample["mask"] = mask
        out.append(sample)
    return out


def write_shards(path, samples, columns=COLUMNS, compression=None):
    with MDSWriter(out=str(path), columns=columns, compression=compression, size_limit=4096) as w:
        for s in samples:
            w.write(s)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_round_trip_through_the_cli(tmp_path, compression, capsys):
    samples = make_samples(12, seed=1)
    write_shards(tmp_path / "shards", samples, compression=compression)
    prefix = str(tmp_path / "out" / "books")
    assert instella_main(["data", "prepare", str(tmp_path / "shards"), "--input-format", "mds",
                          "--output-prefix", prefix]) == 0
    docs = sum(len(s["indices"]) for s in samples)
    assert f"12 MDS samples, {docs} documents, {12 * SEQ} tokens" in capsys.readouterr().out
    ds = SFTDataset(prefix, SEQ, pad_id=1, pack=True)
    assert len(ds) == len(samples)
    for s, item in zip(samples, (ds[i] for i in range(len(ds)))):
        assert np.array_equal(item["tokens"], s["input_ids"].astype(np.int64))
        seg = item["segment_ids"]
        starts = [0] + [i for i in range(1, SEQ) if seg[i] != seg[i - 1]]
        assert starts == [int(a) for a, _ in s["indices"]]
        assert np.array_equal(item["loss_mask"][:-1], s["mask"][1:].astype(np.float32))
        assert item["loss_mask"][-1] == 0  # the label after the last token is padding


def test_without_indices_or_mask_a_sample_is_one_document_with_full_loss(tmp_path):
    samples = [{"input_ids": s["input_ids"]} for s in make_samples(3, seed=2)]
    write_shards(tmp_path / "s", samples, columns={"input_ids": "ndarray:uint32"})
    stats = mds.prepare_mds([str(tmp_path / "s")], str(tmp_path / "o"))
    assert stats == {"samples": 3, "documents": 3, "tokens": 3 * SEQ, "loss_tokens": 3 * SEQ}


def test_uncovered_tokens_become_their_own_documents():
    ids = np.arange(10, 30, dtype=np.uint32)
    docs = mds.sample_documents({"input_ids": ids, "indices": np.array([[2, 5], [8, 20]], np.uint32)},
                                mds.MDSColumns())
    assert [(d[0].tolist()[0], len(d[0])) for d in docs] == [(10, 2), (12, 3), (15, 3), (18, 12)]


def test_shards_without_the_token_column_are_refused_before_writing(tmp_path):
    write_shards(tmp_path / "s", [{"text": "hello"}], columns={"text": "str"})
    with pytest.raises(ValueError, match=r"columns \['text'\], no token column 'input_ids'.*--mds-tokens-column"):
        mds.prepare_mds([str(tmp_path / "s")], str(tmp_path / "o"))
    assert not (tmp_path / "o_tokens.bin").exists()
    assert instella_main(["data", "prepare", str(tmp_path / "s"), "--input-format", "mds",
                          "--output-prefix", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("spans,match", [([[0, 30], [20, 64]], "overlap"), ([[0, 70]], "outside"),
                                         ([[5, 5]], "outside")])
def test_bad_document_spans(tmp_path, spans, match):
    sample = make_samples(1)[0]
    sample["indices"] = np.array(spans, dtype=np.uint32)
    write_shards(tmp_path / "s", [sample])
    with pytest.raises(ValueError, match=match):
        mds.prepare_mds([str(tmp_path / "s")], str(tmp_path / "o"))
    assert not (tmp_path / "o_tokens.bin").exists() and not (tmp_path / "o_tokens.bin.partial").exists()


def test_not_mds(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MDS index.json"):
        mds.prepare_mds([str(tmp_path)], str(tmp_path / "o"))
