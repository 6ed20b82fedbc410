"""The run configuration: frozen once built, plugins contribute by return values, every flag is read.

The flag-coverage test reads the source: a flag counts as honoured where code reads it from the run's
settings (``flags.NAME``, or its name as a string where settings are read by name, e.g. a refusal
table). Without ``--plugin`` the stock GPT path must read every flag it parses; with ``--plugin
instella`` the same, with the stock methods the plugin overrides (and does not call) left out.
"""
import ast
import dataclasses
import inspect
import pathlib
import textwrap

import pytest
import torch

from instella_plugin.plugin import InstellaPlugin
from instella_plugin.training import arguments, run_config
from instella_plugin.training.plugins import GPTPlugin

PKG = pathlib.Path(arguments.__file__).resolve().parent.parent
TINY = ["--plugin", "instella", "--model-preset", "instella-test", "--mock-data", "--lr", "1e-3", "--train-iters", "4"]
STOCK = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--vocab-size", "512", "--mock-data", "--lr", "1e-3", "--train-iters", "4"]


@pytest.fixture(autouse=True)
def _world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")


# ---- frozen ----------------------------------------------------------------------------------------
def test_run_config_is_frozen_and_the_parsed_namespace_is_never_written(monkeypatch):
    plugin = InstellaPlugin()
    parser = arguments.build_parser(plugin)
    argv = TINY[:-2] + ["--train-iters", "40", "--tensor-model-parallel-size", "1", "--instella-recipe", "tiny-cpu"]
    namespace = parser.parse_args(argv)
    before = dict(vars(namespace))
    run = run_config.build_run_config(namespace, arguments.explicit_dests(parser, argv), plugin, 1)
    assert vars(namespace) == before  # the recipe, the model and derived values went into the config only
    assert run.flags.num_layers == run.model.num_layers == 4 and run.flags.wd_exempt_1d is False
    assert "--swiglu" not in argv and run.flags.swiglu and run.flags.disable_bias_linear  # the model's switches
    assert run.flags.untie_embeddings_and_output_weights
    assert (run.flags.lr_warmup_iters, run.layout.global_batch_size, run.recipe["name"]) == (20, 4, "tiny-cpu")
    with pytest.raises(AttributeError, match="frozen"):
        run.flags.lr = 1.0
    for obj, field in ((run, "flags"), (run.model, "num_layers"), (run.layout, "tp"), (run.data, "mock")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, None)
    with pytest.raises(TypeError):
        run.plugin_values["rope"] = None
    assert isinstance(run.flags.spec, (tuple, type(None)))  # lists are frozen to tuples too


def test_configuration_hooks_receive_frozen_settings_and_return_values():
    """A plugin cannot write to the settings it is handed; what it returns lands in the config."""
    seen = []

    class Spy(InstellaPlugin):
        def _try_write(self, flags):
            with pytest.raises(AttributeError):
                flags.lr = 0.5
            seen.append(type(flags).__name__)

        def model_config(self, flags, given):
            self._try_write(flags)
            return super().model_config(flags, given)

        def derived_values(self, flags, model, data):
            self._try_write(flags)
            return {**super().derived_values(flags, model, data), "eval_iters": 3}

        def check_config(self, run):
            self._try_write(run.flags)

    plugin = Spy()
    parser = arguments.build_parser(plugin)
    run = run_config.build_run_config(parser.parse_args(TINY), set(), plugin, 1)
    assert seen == ["Settings"] * 3 and run.flags.eval_iters == 3 and run.flags.lr == 1e-3


# ---- flag coverage ---------------------------------------------------------------------------------
def _reads(source: str) -> set:
    """Names read from settings objects (``x.flags.NAME`` / ``flags.NAME``) and string constants."""
    names = set()
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if isinstance(node, ast.Attribute):
            base = node.value
            if (isinstance(base, ast.Name) and base.id == "flags") or \
                    (isinstance(base, ast.Attribute) and base.attr == "flags"):
                names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


def _generic_sources():
    skip = {"arguments.py", "plugins.py"}  # the parser itself; the stock plugin is counted per plugin below
    return [p.read_text() for p in sorted((PKG / "training").glob("*.py")) if p.name not in skip]


def _plugin_sources(plugin_cls):
    """The plugin's own source plus each stock method it inherits or calls through ``super()``."""
    sources = [inspect.getsource(plugin_cls)] if plugin_cls is not GPTPlugin else []
    for name, method in vars(GPTPlugin).items():
        if not callable(method) or name == "add_arguments":
            continue
        own = plugin_cls.__dict__.get(name) if plugin_cls is not GPTPlugin else None
        if own is None or f"super().{name}(" in inspect.getsource(own):
            sources.append(inspect.getsource(method))
    if plugin_cls is not GPTPlugin:
        sources.append(inspect.getsource(inspect.getmodule(plugin_cls)))
    return sources


@pytest.mark.parametrize("plugin_cls", [GPTPlugin, InstellaPlugin], ids=["stock", "instella"])
def test_every_parsed_flag_is_read(plugin_cls):
    parser = arguments.build_parser(plugin_cls())
    # a flag with one allowed value (--ckpt-format torch_dist) is honoured by the parser itself
    dests = {a.dest for a in parser._actions if a.option_strings and a.dest not in ("help", "plugin")
             and len(a.choices or ()) != 1}
    read = set().union(*(_reads(s) for s in _generic_sources() + _plugin_sources(plugin_cls)))
    assert not sorted(dests - read), f"flags parsed but never read (honour or refuse them): {sorted(dests - read)}"


def test_the_coverage_test_sees_an_unread_flag():
    parser = arguments.build_parser(GPTPlugin())
    parser.add_argument("--never-read-anywhere", action="store_true")
    dests = {a.dest for a in parser._actions if a.option_strings}
    read = set().union(*(_reads(s) for s in _generic_sources() + _plugin_sources(GPTPlugin)))
    assert "never_read_anywhere" in dests - read


# ---- the stock baseline honours Megatron-LM's model flags ----------------------------------------
def _stock_tcfg(*extra):
    run, plugin = arguments.parse_args(STOCK + list(extra))
    overrides = plugin.transformer_config_overrides(run)
    return run, run.model.transformer_config(cpu=True, **overrides)


def test_stock_gpt_honours_model_flags():
    run, t = _stock_tcfg()
    assert (t.gated_linear_unit, t.activation_func, t.add_bias_linear, t.normalization) == \
        (False, torch.nn.functional.gelu, True, "RMSNorm")
    assert run.model.ffn_hidden_size == 256 and not run.flags.untie_embeddings_and_output_weights
    run, t = _stock_tcfg("--swiglu", "--disable-bias-linear", "--normalization", "LayerNorm", "--qk-layernorm")
    assert (t.gated_linear_unit, t.activation_func, t.add_bias_linear, t.normalization, t.qk_layernorm) == \
        (True, torch.nn.functional.silu, False, "LayerNorm", True)
    assert run.model.ffn_hidden_size == 128  # Megatron-LM's SwiGLU default: 4h * 2/3 rounded down to 64


@pytest.mark.parametrize("argv, message", [
    (STOCK + ["--spec", "instella"], "--spec names a plugin's layer spec"),
    (STOCK + ["--transformer-impl", "transformer_engine"], "--transformer-impl transformer_engine needs"),
    (STOCK + ["--context-parallel-size", "1", "--cp-comm-type", "p2p"], "--cp-comm-type need a plugin"),
    (STOCK[:-7] + ["--mock-data", "--lr", "1e-3", "--train-iters", "4", "--tokenizer-type", "NullTokenizer"],
     "NullTokenizer needs --vocab-size"),
    (TINY + ["--normalization", "LayerNorm"], "--normalization LayerNorm: Instella uses RMSNorm"),
    (TINY + ["--position-embedding-type", "learned_absolute"], "Instella uses rotary position embeddings"),
])
def test_flags_a_path_cannot_honour_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        arguments.parse_args(argv)


def test_layout_cli_and_the_trainer_share_the_arithmetic(capsys):
    from instella_plugin.training.layout import main

    assert main(["check", "8", "2", "1", "1", "4", "64"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "4 4"
    assert main(["check", "8", "2", "1", "1", "4", "60"]) == 1
    err = capsys.readouterr().err
    with pytest.raises(SystemExit) as trainer_error:
        arguments.parse_args(TINY + ["--micro-batch-size", "4", "--global-batch-size", "62"])
    assert "global batch 62 is not divisible by micro-batch 4 x DP 1 = 4" in str(trainer_error.value)
    assert "global batch 60 is not divisible by micro-batch 4 x DP 4 = 16" in err


def test_an_empty_data_path_pair_is_refused_naming_it(tmp_path):
    from instella_plugin.data.indexed import PartialPairWriter

    for name, docs in (("empty", []), ("full", [[5, 6, 7]])):
        with PartialPairWriter(str(tmp_path / name)) as w:
            for doc in docs:
                w.add_document(doc)
            w.commit()
    base = STOCK[:-5] + ["--lr", "1e-3", "--train-iters", "4"]  # no --mock-data
    arguments.parse_args(base + ["--data-path", str(tmp_path / "full")])
    with pytest.raises(SystemExit, match=f"{tmp_path / 'empty'} holds no tokens but has weight 0.5"):
        arguments.parse_args(base + ["--data-path", "0.5", str(tmp_path / "full"), "0.5", str(tmp_path / "empty")])
