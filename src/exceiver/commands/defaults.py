"""How a command and its options are declared, and the defaults that `--help` shows: the values a
run uses, read where they are decided (the Python function's signature, `TrainingConfig`, the
presets), never a second copy of them.

The functions' modules import torch, so their signatures are read from source (`ast`), and only
when a help text is formatted: parsing a command line and `exceiver --help` read nothing.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
from collections.abc import Callable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]

Shown = Callable[[], str]  # the text after "default: ", computed when help is formatted


class ShownDefaults(argparse.HelpFormatter):
    """Appends "(default: ...)" to the help of the options that carry a `shown_default`."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        shown = getattr(action, "shown_default", None)
        if shown is None:
            return action.help
        return f"{action.help} (default: {shown().replace('%', '%%')})"


def add(parser, *flags: str, shown: Shown | None = None, **kwargs) -> argparse.Action:
    """`parser.add_argument`, with the default the run uses shown in the help (`shown`)."""
    action = parser.add_argument(*flags, **kwargs)
    action.shown_default = shown
    return action


def add_command(commands, name: str, run: Callable, settings: Callable, *, help: str) -> argparse.ArgumentParser:
    """Declare a command: its parser (described by its handler's docstring, showing the defaults its
    options carry), its handler `run(args)` and `settings(args)`, the keyword arguments that `run`
    gives the Python function."""
    description = run.__doc__ and inspect.cleandoc(run.__doc__)  # None under python -OO
    parser = commands.add_parser(name, help=help, description=description, formatter_class=ShownDefaults)
    parser.set_defaults(run=run, settings=settings)
    return parser


def given(args: argparse.Namespace, **options: str) -> dict:
    """Keyword arguments (name -> attribute of `args`) of the options given on the command line:
    the others keep the Python function's defaults."""
    return {name: getattr(args, dest) for name, dest in options.items() if getattr(args, dest) is not None}


def effective(chosen: dict, function: Callable, parameter: str) -> object:
    """The value `function` runs with: the chosen keyword argument, else its default."""
    return chosen[parameter] if parameter in chosen else inspect.signature(function).parameters[parameter].default


def text(value: object) -> str:
    """A default as the command line writes it: 0.002, 65536, X_exceiver."""
    return repr(value) if isinstance(value, float) else str(value)


def of_function(function: str, parameter: str, none: str | None = None) -> Shown:
    """The default of a parameter of `function` ("exceiver.tl.perturbation:perturb"); `none` says
    in words what a default of None does (required where it is None)."""
    def shown() -> str:
        value = signature_default(function, parameter)
        if value is None:
            if none is None:
                raise LookupError(f"{function}: {parameter} defaults to None; say what that does")
            return none
        return text(value)
    return shown


def described(words: str) -> Shown:
    """A default that is a behaviour, not a value (the function's parameter is None)."""
    return lambda: words


def signature_default(function: str, parameter: str) -> object:
    """The default of `parameter` in the definition of `function` ("module:qualified.name"),
    read from its source: a literal, or a constant of its module (followed through imports)."""
    module, _, qualname = function.partition(":")
    node = _definition(_tree(module), qualname, function)
    if isinstance(node, ast.ClassDef):  # a dataclass: its field's default
        for field in node.body:
            if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) \
                    and field.target.id == parameter and field.value is not None:
                return _value(field.value, module)
        raise LookupError(f"{function} has no field {parameter!r} with a default")
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    pairs = [*zip(positional[len(positional) - len(args.defaults):], args.defaults),
             *((arg, default) for arg, default in zip(args.kwonlyargs, args.kw_defaults) if default is not None)]
    for arg, default in pairs:
        if arg.arg == parameter:
            return _value(default, module)
    raise LookupError(f"{function} has no parameter {parameter!r} with a default")


@functools.cache
def _tree(module: str) -> ast.Module:
    relative = module.removeprefix("exceiver").lstrip(".").replace(".", "/")
    path = PACKAGE / f"{relative}.py"
    if not path.is_file():
        path = PACKAGE / relative / "__init__.py"
    if not module.startswith("exceiver") or not path.is_file():
        raise LookupError(f"{module} is not a module of exceiver")
    return ast.parse(path.read_text(), str(path))


def _definition(tree: ast.Module, qualname: str, function: str) -> ast.FunctionDef | ast.ClassDef:
    node, body = None, tree.body
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise LookupError(f"{function} is not defined")
        body = node.body
    return node


def _value(node: ast.expr, module: str) -> object:
    try:
        return ast.literal_eval(node)
    except ValueError:
        if isinstance(node, ast.Name):
            return _constant(node.id, module)
    raise LookupError(f"{module}: the default {ast.unparse(node)} is neither a literal nor a module constant")


def _constant(name: str, module: str) -> object:
    for node in _tree(module).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return _value(node.value, module)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name \
                and node.value is not None:
            return _value(node.value, module)
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _constant(alias.name, node.module)
    raise LookupError(f"{module} defines no constant {name}")
