"""Bad input to `instella eval` is refused with the problem and the fix named, before any model work."""
import json

import pytest

from instella_plugin.evaluation import cli
from instella_plugin.evaluation.examples import build_examples
from instella_plugin.evaluation.hf_backend import HFBackend
# megatron-core's inference package calls faulthandler.enable() on import, which fails under capsys:
# import it here, as the CLI does lazily.
from instella_plugin.evaluation import megatron_backend  # noqa: F401
from instella_plugin.evaluation.runner import ContextTooLong, build_requests
from instella_plugin.evaluation.task_config import TaskDefinitionError, load_task, resolve_tasks, task_from_dict
from instella_plugin.evaluation.task_data import TaskDataError

from test_eval_parity import write_task_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data"), n=6)


def test_unknown_task_and_suite():
    with pytest.raises(TaskDefinitionError, match=r"unknown task 'arc_chalenge'; available: .*arc_challenge"):
        resolve_tasks("arc_chalenge", None)
    with pytest.raises(TaskDefinitionError, match=r"unknown suite 'instella'; available: instella-base"):
        resolve_tasks(None, "instella")
    with pytest.raises(TaskDefinitionError, match="exactly one of --tasks"):
        resolve_tasks("boolq", "instella-base")
    with pytest.raises(TaskDefinitionError, match=r"\['boolq'\] given more than once"):
        resolve_tasks("boolq,piqa,boolq", None)


def test_malformed_task_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noutput: [multiple_choice\n")
    with pytest.raises(TaskDefinitionError, match=r"bad.yaml: malformed YAML"):
        load_task(str(bad))
    base = dict(name="x", output="multiple_choice", dataset={"path": "p"}, test_split="test",
                doc_to_text="{{q}}", doc_to_choice="choices", doc_to_target="label", metrics=["acc"])
    cases = [({"doc_to_txt": "a"}, r"unknown key\(s\) \['doc_to_txt'\]"),
             ({"metrics": ["accuracy"]}, r"metric 'accuracy' is not one of"),
             ({"doc_to_text": "{{ q "}, r"does not parse"),
             ({"output": "rank"}, r"output must be one of"),
             ({"num_fewshot": 2}, r"neither fewshot_split nor fewshot_file"),
             ({"checker": "fuzzy"}, r"checker 'fuzzy' is not one of \['exact_match', 'math'\]"),
             ({"dataset": "p"}, r"dataset must be a mapping"),
             ({"primary_metric": "acc_norm"}, r"primary_metric 'acc_norm' is not among")]
    for change, pattern in cases:
        with pytest.raises(TaskDefinitionError, match=pattern):
            task_from_dict({**base, **change}, "t.yaml")
    missing = dict(base)
    del missing["test_split"]
    with pytest.raises(TaskDefinitionError, match=r"t.yaml: missing required key\(s\) \['test_split'\]"):
        task_from_dict(missing, "t.yaml")
    gen = dict(base, output="generate", metrics=["pass@4"], generation={"n": 2})
    gen.pop("doc_to_choice")
    with pytest.raises(TaskDefinitionError, match=r"pass@4 needs generation.n >= 4"):
        task_from_dict(gen, "t.yaml")


def test_missing_data_file_names_file_and_fetch(tmp_path):
    with pytest.raises(TaskDataError) as e:
        build_examples(load_task("arc_easy"), str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "allenai/ai2_arc/ARC-Easy/test.jsonl") in msg and "instella eval fetch" in msg
    assert "load_dataset('allenai/ai2_arc', 'ARC-Easy', split='test')" in msg


def test_missing_field_is_named(tmp_path):
    f = tmp_path / "allenai/ai2_arc/ARC-Easy/test.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}) + "\n")
    with pytest.raises(ValueError, match=r"choices.label.index\(answerKey\).*fields \['choices', 'question'\].*"
                                         r"'answerKey' is undefined"):
        build_examples(load_task("arc_easy"), str(tmp_path))
    f.write_text("{not json\n")
    with pytest.raises(TaskDataError, match=r"cannot read .*test.jsonl as jsonl"):
        build_examples(load_task("arc_easy"), str(tmp_path))


def test_more_shots_than_the_split_holds(tmp_path, data):
    dev = data / "cais/mmlu/all/dev.jsonl"
    rows = [json.loads(line) for line in dev.read_text().splitlines()]
    short = tmp_path / "cais/mmlu/all"
    short.mkdir(parents=True)
    (short / "test.jsonl").write_text((data / "cais/mmlu/all/test.jsonl").read_text())
    (short / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    with pytest.raises(TaskDataError, match=r"num_fewshot 5 but the few-shot split 'dev' holds 3 example\(s\) "
                                            r"with subject = 'college_physics'"):
        build_examples(load_task("mmlu"), str(tmp_path))


def test_prompt_longer_than_the_context(data):
    from instella_plugin.data.tokenizer import load_tokenizer

    cfg = load_task("gsm8k")
    examples = build_examples(cfg, str(data), limit=2)
    with pytest.raises(ContextTooLong, match=r"task gsm8k example 0: prompt of \d+ tokens \+ max_new_tokens 256 "
                                             r"exceeds the model's context of 300"):
        build_requests(cfg, examples, load_tokenizer(), 300)
    mc = load_task("boolq")
    with pytest.raises(ContextTooLong, match=r"task boolq example 0: context of \d+ tokens"):
        build_requests(mc, build_examples(mc, str(data), limit=1), load_tokenizer(), 8)


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
    from test_eval_parity import write_tiny_model

    model = write_tiny_model(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 50000
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the tokenizer has 50280 ids but the model only 50000 embedding rows"):
        HFBackend(str(model))


def test_cli_checks_data_before_loading_a_model(tmp_path, capsys):
    # the model directory does not exist either: the data error must come first
    with pytest.raises(TaskDataError, match="Rowan/hellaswag"):
        cli.main(["--hf", str(tmp_path / "no-model"), "--tasks", "hellaswag", "--data-dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no config.json there"):
        cli.main(["--hf", str(tmp_path / "no-model"), "--tasks", "hellaswag", "--data-dir",
                  str(write_task_data(tmp_path / "d", n=2))])
    with pytest.raises(FileNotFoundError, match="--load .*no-ckpt: no such checkpoint directory"):
        cli.main(["--load", str(tmp_path / "no-ckpt"), "--tasks", "boolq", "--data-dir", str(tmp_path / "d")])
    with pytest.raises(SystemExit):
        cli.main(["--hf", "x", "--data-dir", "d"])  # neither --tasks nor --suite
    assert "one of the arguments --tasks --suite is required" in capsys.readouterr().err


def test_eval_tasks_flags_are_checked_before_training(monkeypatch, tmp_path):
    from instella_plugin.training import arguments

    monkeypatch.setenv("WORLD_SIZE", "1")
    base = ["--plugin", "instella", "--model-preset", "instella-tiny", "--mock-data", "--lr", "1e-3", "--train-iters", "4"]
    with pytest.raises(SystemExit, match="--eval-tasks: unknown task 'nope'"):
        arguments.parse_args(base + ["--eval-tasks", "nope", "--eval-tasks-data", str(tmp_path)])
    with pytest.raises(SystemExit, match="--eval-tasks needs --eval-tasks-data DIR"):
        arguments.parse_args(base + ["--eval-tasks", "boolq"])
    with pytest.raises(SystemExit, match=r"aps/super_glue/boolq/validation.jsonl"):
        arguments.parse_args(base + ["--eval-tasks", "boolq", "--eval-tasks-data", str(tmp_path)])
    small = ["instella-test" if x == "instella-tiny" else x for x in base]
    with pytest.raises(SystemExit, match="the tokenizer has 50280 ids but the model only 512 embedding rows"):
        arguments.parse_args(small + ["--eval-tasks", "boolq", "--eval-tasks-data", str(tmp_path)])
