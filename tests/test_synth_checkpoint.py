"""``instella data synth gsm8k --load CKPT``: the pipeline end to end with a tiny Megatron checkpoint as
the generator (megatron-core's inference engine, CPU, one gloo rank). Random weights write no program,
so every seed is counted under "no program in the response" and the run says nothing was kept; a
prompt that does not fit the model's context is refused before the model is built."""
import json

import pytest

from instella_plugin.model.config import get_preset
from instella_plugin.testing.distributed import run_distributed

SEEDS = [{"question": "Tom has 3 apples and buys 5 more. How many apples does he have now?", "answer": "3 + 5 = 8\n#### 8"},
         {"question": "A box holds 12 pens. How many pens are in 4 boxes?", "answer": "12 * 4 = 48\n#### 48"},
         {"question": "Sam walks 2 km every day for 6 days. How many km does he walk in all?", "answer": "#### 12"}]


def _worker(root):
    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.synth.cli import main
    from instella_plugin.training.checkpointing import save_checkpoint

    cfg = get_preset("instella-test", seq_length=1024, vocab_size=50280, padded_vocab_size=50304)
    chunks = build_gpt_chunks(cfg, cfg.transformer_config(), init_seed=3)
    save_checkpoint(f"{root}/ckpt", 1, chunks, cfg, save_rng=False,
                    extra_meta={"spec": "instella", "rotary_base": cfg.rotary_base, "seq_length": cfg.seq_length,
                                "tokenizer": "instella"})
    common = ["gsm8k", "--load", f"{root}/ckpt", "--seeds", f"{root}/train.jsonl", "--test-set", f"{root}/test.jsonl",
              "--solution-tokens", "16", "--batch-size", "2", "--no-progress"]
    too_long = main(common + ["--output", f"{root}/long.jsonl", "--program-tokens", "1000"])
    rc = main(common + ["--output", f"{root}/out.jsonl", "--program-tokens", "24"])
    with open(f"{root}/out.jsonl.summary.json") as f:
        return dict(too_long=too_long, rc=rc, summary=json.load(f))


@pytest.mark.slow
def test_pipeline_on_a_tiny_checkpoint(tmp_path, capfd):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "Q?", "answer": "#### 1"}) + "\n")
    (res,) = run_distributed(_worker, 1, str(tmp_path))
    assert res["too_long"] == 2
    assert "> the model's context of 1024 tokens" in capfd.readouterr().err
    assert res["rc"] == 1
    s = res["summary"]
    assert (s["seeds"], s["abstracted"], s["kept"]) == (3, 0, 0)
    assert s["rejected"] == {"no program in the response": 3}
    assert (tmp_path / "out.jsonl").read_text() == ""
