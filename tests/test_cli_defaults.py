"""Every default that `exceiver COMMAND --help` shows is the value the run uses: the keyword
arguments a command passes (its `settings`) are completed with the Python function's own
signature defaults, TrainingConfig's, or the preset's, and compared with the help text."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import typing

import pytest
import torch

from exceiver.cli import build_parser
from exceiver.commands.defaults import signature_default
from exceiver.devices import inference_device
from exceiver.inference import default_batch_size
from exceiver.nn.config import PRESETS
from exceiver.train.checkpoints import Checkpointing
from exceiver.train.config import TrainingConfig

# Each command: the Python function it calls, and the fewest arguments it parses with.
COMMANDS = {
    "pretrain": ("exceiver.pretrain:pretrain", ["d.h5ad", "--out", "m"]),
    "finetune": ("exceiver.finetune:finetune", ["m", "d.h5ad", "--label-key", "c", "--out", "f"]),
    "build-corpus": ("exceiver.data.corpus:build_corpus", ["d.h5ad", "--out", "c"]),
    "embed": ("exceiver.model:Exceiver.embed_file", ["m", "d.h5ad", "--out", "o.h5ad"]),
    "predict": ("exceiver.model:Exceiver.predict", ["m", "d.h5ad", "--out", "o.h5ad"]),
    "annotate": ("exceiver.tl.annotation:annotate", ["m", "r.h5ad", "q.h5ad", "--label-key", "c", "--out", "o.h5ad"]),
    "impute": ("exceiver.tl.imputation:impute", ["m", "d.h5ad", "--out", "o.h5ad"]),
    "perturb": ("exceiver.tl.perturbation:perturb", ["m", "d.h5ad", "--gene", "G", "--out", "e.csv"]),
    "evaluate": ("exceiver.evaluate.report:evaluate", ["m", "d.h5ad", "--out", "r"]),
    "demo": ("exceiver.demo:run_demo", []),
    "import-original": ("exceiver.model:import_original", ["c.ckpt", "--out", "m"]),
}
# Options whose keyword argument is not named as the option (the others: --min-shift -> min_shift).
PARAMETERS = {"--key": "key_added", "--query-gene": "query_genes", "--source": "sources", "--gene": "genes",
              "--class-weight": "class_loss_weight", "--expression-weight": "expression_loss_weight",
              "--label-key": "label_keys"}
TRAINING = {f.name: f.default for f in dataclasses.fields(TrainingConfig)}
TRAINED = ("pretrain", "finetune")  # commands whose **training are TrainingConfig fields
DEFAULT = re.compile(r"\(default: (.*)\)$", re.DOTALL)


def _function(path: str):
    module, _, qualname = path.partition(":")
    function = importlib.import_module(module)
    for part in qualname.split("."):
        function = getattr(function, part)
    return function


def _keywords(function) -> set[str]:
    """The keyword arguments a function takes through `**options: Unpack[SomeTypedDict]`."""
    hints = typing.get_type_hints(function, include_extras=True)
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and typing.get_origin(hints.get(parameter.name)):
            return set(typing.get_type_hints(typing.get_args(hints[parameter.name])[0]))
    return set()


# What a run does with the keyword arguments of **options that a command leaves out.
UNPACKED = {"resume": False, "checkpoint_minutes": Checkpointing().every_minutes, "keep_checkpoints": False}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def _parameter(command: str, action: argparse.Action) -> str:
    flag = max(action.option_strings, key=len)
    return PARAMETERS.get(flag, flag.removeprefix("--").replace("-", "_"))


def _shown(parser: argparse.ArgumentParser, action: argparse.Action) -> str | None:
    """The default in the help text, as `--help` prints it (unwrapped)."""
    if not action.help:
        return None
    match = DEFAULT.search(parser.formatter_class(parser.prog)._expand_help(action))
    return match and match.group(1)


def _used(command: str, parameter: str, chosen: dict) -> object:
    """The value the run uses: the keyword argument passed, else the function's (or, for the
    training settings, TrainingConfig's and the preset's, as pretrain and finetune complete them)."""
    if parameter in chosen:
        return chosen[parameter]
    function = _function(COMMANDS[command][0])
    preset = chosen.get("preset", inspect.signature(function).parameters["preset"].default) \
        if command == "pretrain" else None
    if command in TRAINED and parameter in TRAINING:
        return {**TRAINING, **(PRESETS[preset].training if preset else {})}[parameter]
    if command == "pretrain" and parameter == "n_top_genes":  # None: the preset's
        return PRESETS[preset].n_top_genes
    if parameter not in inspect.signature(function).parameters and parameter in _keywords(function):
        return UNPACKED.get(parameter)  # a reading option left out: the model's contract decides (None)
    return inspect.signature(function).parameters[parameter].default


def _agrees(shown: str, used: object) -> bool:
    if used is None:  # a behaviour, said in words (never a number that is not used)
        return bool(shown) and not re.fullmatch(r"-?[\d.e+-]+", shown)
    if isinstance(used, str):
        return shown == used
    try:
        return float(shown) == used
    except ValueError:
        return False


def _preset_values(shown: str) -> dict[str, str] | None:
    if not shown.startswith("the preset's: "):
        return None
    return {name: value for value, name in
            (part.rsplit(" for ", 1) for part in shown.removeprefix("the preset's: ").split(", "))}


def _shown_options(command: str):
    parser = _subparsers()[command]
    return parser, [(action, _shown(parser, action)) for action in parser._actions if _shown(parser, action)]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_shown_default_is_the_value_the_run_uses(command):
    parser, options = _shown_options(command)
    assert options, f"{command} shows no defaults"
    presets = sorted(PRESETS) if command == "pretrain" else [None]
    for preset in presets:
        argv = COMMANDS[command][1] + ([] if preset is None else ["--preset", preset])
        args = parser.parse_args(argv)
        chosen = args.settings(args)
        for action, shown in options:
            parameter = _parameter(command, action)
            if parameter == "preset":
                continue  # given here; its own default is checked below
            per_preset = _preset_values(shown)
            expected = per_preset[preset] if per_preset else shown
            used = _used(command, parameter, chosen)
            assert _agrees(expected, used), f"{command} {action.option_strings}: shows {shown!r}, uses {used!r}"
    if command == "pretrain":
        args = parser.parse_args(COMMANDS[command][1])
        assert _shown(parser, parser._option_string_actions["--preset"]) == _used(command, "preset",
                                                                                   args.settings(args))


@pytest.mark.parametrize("command", COMMANDS)
def test_no_default_is_written_into_a_help_text_by_hand(command):
    """Defaults come only through the checked route above (not typed into a help string)."""
    for action in _subparsers()[command]._actions:
        assert "default:" not in (action.help or "") and "(default" not in (action.help or ""), action.option_strings


@pytest.mark.parametrize("command", COMMANDS)
def test_each_shown_option_reaches_its_keyword_argument(command):
    """A value given for each option with a shown default arrives as the keyword argument the
    comparison above assumes, and every keyword argument is one the function takes."""
    parser, options = _shown_options(command)
    parameters = inspect.signature(_function(COMMANDS[command][0])).parameters
    for action, _ in options:
        value = next(c for c in action.choices if c != _shown(parser, action)) if action.choices else "7"
        args = parser.parse_args(COMMANDS[command][1] + [action.option_strings[-1], value])
        chosen = args.settings(args)
        parsed = action.type(value) if action.type else value
        assert chosen[_parameter(command, action)] == ([parsed] if isinstance(action, argparse._AppendAction)
                                                        else parsed)
        allowed = set(parameters) | _keywords(_function(COMMANDS[command][0])) | (
            set(TRAINING) if command in TRAINED else set())
        assert set(chosen) <= allowed, f"{command}: {sorted(set(chosen) - allowed)}"


def test_every_training_setting_is_an_option_of_pretrain_and_finetune():
    for command in TRAINED:
        options = {a.dest for a in _subparsers()[command]._actions}
        assert set(TRAINING) <= options, sorted(set(TRAINING) - options)


def test_pretrain_shows_the_presets_learning_rate():
    """The mismatch this file guards against: the default preset trains at its own rate."""
    parser = _subparsers()["pretrain"]
    shown = _preset_values(_shown(parser, parser._option_string_actions["--learning-rate"]))
    assert {name: float(value) for name, value in shown.items()} == {
        name: preset.training.get("learning_rate", TRAINING["learning_rate"]) for name, preset in PRESETS.items()}
    assert float(shown["default"]) == 2e-3 != TRAINING["learning_rate"]
    finetune = _subparsers()["finetune"]
    assert float(_shown(finetune, finetune._option_string_actions["--learning-rate"])) == TRAINING["learning_rate"]


def test_described_defaults_say_what_the_run_does(monkeypatch):
    """Defaults of None are said in words; where numbers are in the words, they are the run's."""
    parser = _subparsers()["embed"]
    batch = _shown(parser, parser._option_string_actions["--batch-size"])
    assert batch == (f"{default_batch_size(torch.device('cpu'))} on the CPU, "
                     f"{default_batch_size(torch.device('cuda'))} on a GPU")
    device = _shown(parser, parser._option_string_actions["--device"])
    assert device.startswith("auto: a CUDA GPU, else an Apple GPU (mps), else the CPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert inference_device(None) == inference_device("auto") == torch.device("cpu")


def test_signature_defaults_are_read_from_source_as_python_reads_them():
    """Literals, module constants (PRETRAINED_LR_MULT) and constants imported from elsewhere."""
    from exceiver.commands.defaults import of_function

    for path, name in [("exceiver.finetune:finetune", "pretrained_lr_mult"),
                       ("exceiver.data.corpus:build_corpus", "shard_cells"),
                       ("exceiver.model:Exceiver.embed_file", "key_added"),
                       ("exceiver.tl.annotation:annotate", "method")]:
        assert signature_default(path, name) == inspect.signature(_function(path)).parameters[name].default
    with pytest.raises(LookupError, match="no parameter 'no_such'"):
        signature_default("exceiver.tl.perturbation:perturb", "no_such")
    with pytest.raises(LookupError, match="defaults to None; say what that does"):
        of_function("exceiver.tl.perturbation:perturb", "groupby")()
