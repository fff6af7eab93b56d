"""typer options generated from the schema, so a flag's default and help are written once, in the config
dataclasses. typer builds a command from `inspect.signature(callback)`; `schema_command` hands it a
signature that holds the command's own parameters plus one `typer.Option` per setting."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import typer

from ember.config.schema import ConfigError, Leaf
from ember.config.spec import DeploymentSpec, spec_settings

_PANELS = {"cache": "Cache", "scheduler": "Scheduler", "lora": "LoRA", "speculative": "Speculative decoding"}


def _cli_type(leaf: Leaf) -> Any:
    """What the flag reads: the field's type without None; a size (int | str) as text; a mapping as the
    repeated NAME=VALUE strings its `parse` turns into one."""
    if typing.get_origin(leaf.type) is dict:
        return list[str]
    args = [a for a in typing.get_args(leaf.type) if a is not type(None)]
    if typing.get_origin(leaf.type) in (typing.Union, types.UnionType):
        return args[0] if len(args) == 1 else str
    return leaf.type


def _option(leaf: Leaf, panel: str, multiple: bool) -> inspect.Parameter:
    s = leaf.setting
    tp, default = _cli_type(leaf), leaf.default
    decls = [leaf.flag]
    if tp is bool:
        decls = [f"{leaf.flag}/--no-{leaf.flag.removeprefix('--')}"]
    # click reads a declaration that starts with '/' as a Windows-style flag; ' /--x' is an off switch.
    decls += [f" {a}" if a.startswith("/") else a for a in s.aliases]
    if isinstance(default, dict):
        default = []
    if multiple:
        tp, default = list[tp], [default]
    metavar = s.metavar
    if metavar is None and s.choices is not None and tp is not bool:
        metavar = "[" + "|".join("none" if c is None else str(c) for c in s.choices) + "]"
    option = typer.Option(default, *decls, help=s.help, metavar=metavar, rich_help_panel=panel)
    return inspect.Parameter(leaf.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=tp)


def schema_command(*roots: str, multiple: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Give a typer command a flag for every setting under `roots` ('engine', 'server'). The command
    takes `settings`: the flat settings given explicitly on the command line, parsed (NAME=PATH pairs ->
    a dict), so that a spec file's values hold wherever a flag was not given. Names in `multiple` become
    repeatable flags and arrive as lists (one run each)."""
    chosen = {
        name: (path, leaf)
        for name, (path, leaf) in spec_settings().items()
        if path[0] in roots or path == ("model",)
    }

    def decorate(func: Callable) -> Callable:
        hints = typing.get_type_hints(func)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(func).parameters.values()
            if p.name != "settings"
        ]
        clash = {p.name for p in own} & set(chosen)
        if clash:  # a command option shadowing a setting would make one of them unreachable
            raise AssertionError(f"{func.__name__}: options {sorted(clash)} are also settings")
        generated = [_option(leaf, _panel(path), name in multiple) for name, (path, leaf) in chosen.items()]
        ctx_param = inspect.Parameter(
            "_ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
        )

        def command(_ctx: typer.Context, **kwargs: Any) -> Any:
            given: dict[str, Any] = {}
            for name, (_, leaf) in chosen.items():
                value = kwargs.pop(name)
                if _ctx.get_parameter_source(name).name != "COMMANDLINE":
                    continue
                if leaf.setting.parse is not None:
                    try:
                        value = leaf.setting.parse(list(value))
                    except ValueError as exc:
                        raise typer.BadParameter(str(exc), param_hint=leaf.flag) from None
                given[name] = value
            return func(settings=given, **kwargs)

        command.__signature__ = inspect.Signature([ctx_param, *own, *generated])  # type: ignore[attr-defined]
        command.__name__, command.__doc__, command.__module__ = func.__name__, func.__doc__, func.__module__
        return command

    return decorate


def _panel(path: tuple[str, ...]) -> str:
    """The --help group of a setting, by where it lives in the spec."""
    if path[0] == "server":
        return "Server"
    return _PANELS[path[1]] if len(path) == 3 else "Engine"


def build_spec(settings: dict[str, Any], config: str | None = None) -> DeploymentSpec:
    """The spec a command runs: the file's (or the schema's defaults), with the flags given on top.
    A refusal ends the command with exit code 2 and a message naming the setting and its flag."""
    try:
        spec = DeploymentSpec.load(config) if config else DeploymentSpec()
        return spec.with_settings(settings)
    except ConfigError as exc:
        flags = {".".join(path): leaf.flag for path, leaf in spec_settings().values()}
        where = f"{exc.field} ({flags[exc.field]})" if exc.field in flags else exc.field
        origin = f"{config}: " if config else ""
        typer.secho(f"error: {origin}{where}: {exc.message}", fg="red", err=True)
        raise typer.Exit(2) from exc
    except (OSError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
