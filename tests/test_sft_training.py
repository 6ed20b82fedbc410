"""SFT through the trainer: chats from the data tools' SFT store, one per row, padded with id 1, loss
over assistant tokens only."""
import numpy as np
import pytest

from instella_plugin.testing.trainer import read_log, run_trainer


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from instella_plugin.data.demo_corpus import build_demo_corpus

    return build_demo_corpus(str(tmp_path_factory.mktemp("demo")), num_docs=40, num_chats=32)


def test_sft_samples_pad_with_1_and_mask_only_assistant_tokens(demo_root, monkeypatch):
    from instella_plugin.training.arguments import parse_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    run, plugin = parse_args(["--plugin", "instella", "--model-preset", "instella-tiny", "--dataset-type", "sft",
                               "--data-blend", "tiny-sft", "--data-root", demo_root, "--seq-length", "128",
                               "--lr", "1e-4", "--train-iters", "2", "--micro-batch-size", "2",
                               "--global-batch-size", "2"])
    train, _, _ = plugin.build_datasets(run, [4, 0, 0])
    sample = train[0]
    pad = sample["tokens"] == 1
    assert pad.any() and not sample["loss_mask"][pad].any()  # padded with id 1, never counted
    assert 0 < sample["loss_mask"].sum() < (~pad).sum()  # markers and user text are not counted
    assert np.array_equal(sample["labels"][:-1], sample["tokens"][1:])


@pytest.mark.dist
def test_sft_run_trains(demo_root, tmp_path):
    run_trainer(1, ["--plugin", "instella", "--model-preset", "instella-tiny", "--dataset-type", "sft",
                    "--data-blend", "tiny-sft", "--data-root", demo_root, "--seq-length", 128, "--lr", "1e-3",
                    "--lr-warmup-iters", 1, "--train-iters", 6, "--micro-batch-size", 2, "--global-batch-size", 4,
                    "--log-interval", 1, "--no-plot", "--device", "cpu", "--save", tmp_path / "sft"])
    train, _ = read_log(tmp_path / "sft")
    assert sorted(train) == list(range(1, 7))
    assert train[6] < train[1]
