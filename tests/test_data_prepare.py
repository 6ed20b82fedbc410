"""`instella data prepare` / `index`: round trips against the tokenizer itself, determinism across
worker counts, crash safety, input formats, sentence splitting and bad input."""
import json
import os
import signal

import numpy as np
import pytest

from instella_plugin.data.indexed import IndexedDataError, check_pair, read_documents
from instella_plugin.data.prepare import prepare
from instella_plugin.data.tokenizer import EOS_ID, load_tokenizer
from instella_plugin.testing.killed_prepare import kill_prepare_mid_write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "river", "Mr.", "Smith", "café", "naïve", "2+2=4", "\n\n", "  ", "def f(x):", "—", "日本", "🙂"]
    return [" ".join(rng.choice(words, size=rng.integers(1, 40))) + f" doc {i}." for i in range(n)]


def _jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    return str(path)


def test_round_trip_and_worker_count_invariance(tmp_path, tok, capsys):
    docs = _docs(1500)
    src = _jsonl(tmp_path / "in.jsonl", docs)
    one = prepare(src, str(tmp_path / "w1"), tok, workers=1, chunk_documents=100, progress=True)
    four = prepare(src, str(tmp_path / "w4"), tok, workers=4, chunk_documents=100, progress=False)
    assert "tok/s" in capsys.readouterr().err  # the progress bar reports throughput
    assert one.documents == four.documents == len(docs)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w4{ext}").read_bytes()
    got = list(read_documents(str(tmp_path / "w1")))  # megatron-core IndexedDataset
    assert len(got) == len(docs)
    for ids, text in zip(got, docs):
        assert ids.dtype == np.uint16
        assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"] + [EOS_ID]
    assert check_pair(str(tmp_path / "w1")).tokens == one.tokens


def test_parquet_arrow_and_hf_cache_inputs_match_jsonl(tmp_path, tok, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(50, seed=1)
    prepare(_jsonl(tmp_path / "a.jsonl", docs), str(tmp_path / "ref"), tok)
    table = pa.table({"text": docs})
    pq.write_table(table, tmp_path / "a.parquet")
    with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)  # the stream format `datasets.save_to_disk` writes
    snap = tmp_path / "hub" / "datasets--acme--tiny" / "snapshots" / "0123abc"
    (snap / "data").mkdir(parents=True)
    pq.write_table(table, snap / "data" / "train.parquet")
    (tmp_path / "hub" / "datasets--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--acme--tiny" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for name, src in [("pq", "a.parquet"), ("arrow", "a.arrow"), ("hub", "acme/tiny")]:
        prepare(str(tmp_path / src) if "." in src else src, str(tmp_path / name), tok)
        assert (tmp_path / f"{name}.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes(), name
        assert (tmp_path / f"{name}.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes(), name
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        prepare("acme/absent", str(tmp_path / "x"), tok)


def test_kill_mid_run_leaves_no_idx_and_rerun_completes(tmp_path, tok):
    """The input is a FIFO the test holds open, so the kill surely lands while prepare is writing."""
    docs = _docs(3000, seed=2)
    prefix = str(tmp_path / "out")
    assert kill_prepare_mid_write(docs[:2000], prefix, str(tmp_path / "stream.jsonl")) == -signal.SIGKILL
    assert os.path.getsize(prefix + ".bin.partial") > 0
    assert not os.path.exists(prefix + ".idx") and not os.path.exists(prefix + ".bin")
    src = _jsonl(tmp_path / "all.jsonl", docs)
    stats = prepare(src, prefix, tok, workers=2)
    assert check_pair(prefix).documents == stats.documents == 3000
    assert not os.path.exists(prefix + ".bin.partial")


def test_malformed_jsonl_names_file_and_line_or_is_skipped(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n{"txt": "no key"}\n\n{"text": "also fine"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        prepare(str(path), str(tmp_path / "out"), tok)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())  # nothing partial left
    stats = prepare(str(path), str(tmp_path / "out"), tok, skip_bad_records=True)
    assert (stats.documents, stats.bad_records) == (2, 2)
    assert [t.tolist() for t in read_documents(str(tmp_path / "out"))] == [
        tok.encode("fine") + [0], tok.encode("also fine") + [0]]


def test_uint16_refused_for_large_vocab_before_any_output(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70000)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]")
    src = _jsonl(tmp_path / "in.jsonl", ["w5 w69999 w3", "w65600"])
    with pytest.raises(ValueError, match="uint16 cannot hold a vocabulary of 70002"):
        prepare(src, str(tmp_path / "o16"), big, dtype="uint16")
    assert not any(p.name.startswith("o16") for p in tmp_path.iterdir())
    prepare(src, str(tmp_path / "auto"), big)  # auto picks int32
    assert check_pair(str(tmp_path / "auto")).dtype == np.int32
    assert [d.tolist() for d in read_documents(str(tmp_path / "auto"))] == [[7, 70001, 5, 0], [65602, 0]]


def test_punkt_splits_abbreviations_offline(tmp_path, tok, monkeypatch):
    from instella_plugin.data.sentences import split_sentences

    import socket

    def no_network(*a, **k):
        raise AssertionError("sentence splitting tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    text = ("Mr. Smith met Dr. Jones at 5 p.m. on Jan. 3 in Washington. They discussed the U.S. economy. "
            "Prof. Lee arrived with Mrs. Brown of Acme Corp. and Gen. Ward. The meeting ended.")
    assert [s.strip() for s in split_sentences(text)] == [
        "Mr. Smith met Dr. Jones at 5 p.m. on Jan. 3 in Washington.",
        "They discussed the U.S. economy.",
        "Prof. Lee arrived with Mrs. Brown of Acme Corp. and Gen. Ward.",
        "The meeting ended.",
    ]
    assert "".join(split_sentences(text)) == text
    prepare(_jsonl(tmp_path / "s.jsonl", [text]), str(tmp_path / "s"), tok, split_sentences=True)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "s"))
    assert len(ds) == 4 and ds.document_indices.tolist() == [0, 4]
    assert [tok.decode(ds[i]) for i in range(4)] == split_sentences(text)[:3] + [split_sentences(text)[3] + "<|endoftext|>"]


@pytest.mark.parametrize("eod", [0, 50279])
def test_index_raw_token_stream_matches_prepare(tmp_path, tok, eod):
    from instella_plugin.data.index_tokens import index_token_files

    docs = _docs(200, seed=3)
    prepare(_jsonl(tmp_path / "d.jsonl", docs), str(tmp_path / "prepared"), tok)
    stream = np.concatenate([np.array(tok.encode(d) + [eod], dtype=np.uint16) for d in docs])
    stream.tofile(tmp_path / "part-0-00000.npy")  # OLMo/Dolma: raw uint16, no header
    (r,) = index_token_files([str(tmp_path / "part-0-00000.npy")], str(tmp_path / "idx"), eod_id=eod)
    assert (r["documents"], r["tokens"]) == (200, stream.size)
    want = [d[:-1].tolist() for d in read_documents(str(tmp_path / "prepared"))]
    got = list(read_documents(str(tmp_path / "idx" / "part-0-00000")))
    assert [g[:-1].tolist() for g in got] == want and all(g[-1] == eod for g in got)
    if eod == 0:  # byte-identical to prepare's own pair, and a real .npy (with header) works too
        assert (tmp_path / "idx" / "part-0-00000.idx").read_bytes() == (tmp_path / "prepared.idx").read_bytes()
        np.save(tmp_path / "with_header.npy", stream)
        index_token_files([str(tmp_path / "with_header.npy")], str(tmp_path / "idx"), bin_mode="copy")
        assert (tmp_path / "idx" / "with_header.bin").read_bytes() == (tmp_path / "prepared.bin").read_bytes()
    else:
        with pytest.raises(ValueError, match="no token equals --eod-id 0"):
            index_token_files([str(tmp_path / "part-0-00000.npy")], str(tmp_path / "idx0"), eod_id=0)


def test_truncated_or_mismatched_pairs_are_refused(tmp_path, tok):
    src = _jsonl(tmp_path / "d.jsonl", _docs(30, seed=4))
    prepare(src, str(tmp_path / "a"), tok)
    prepare(_jsonl(tmp_path / "e.jsonl", _docs(31, seed=5)), str(tmp_path / "b"), tok)
    idx = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "a.idx").write_bytes(idx[:-8])
    with pytest.raises(IndexedDataError, match="truncated or corrupt"):
        check_pair(str(tmp_path / "a"))
    (tmp_path / "a.idx").write_bytes(idx)
    (tmp_path / "a.bin").write_bytes((tmp_path / "b.bin").read_bytes())
    with pytest.raises(IndexedDataError, match="does not match"):
        check_pair(str(tmp_path / "a"))
