"""Generate argparse options from dataclasses, so a default is written once: on the field.

Each field becomes `--<prefix><name>` with its type, its `choices` and `help` metadata, and
`argparse.SUPPRESS` as the parser default: only what the user typed reaches `given()`, so presets
can sit between the dataclass defaults and the command line. Fields with `metadata={"cli": False}`
and nested dataclass sections are skipped (sections get their own `add_fields` call).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from .errors import SlimtuneError


def cli_help(text: str, **extra) -> dict:
    """Field metadata the generator reads: help text plus optional choices, const, flag, cli=False."""
    return {"help": text, **extra}


def _unwrap(tp):
    """(base type, optional?) of `int | None` style annotations."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _list_of(item_type, flag):
    def parse(text: str):
        try:
            return [item_type(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of {item_type.__name__}s, e.g. {flag} 0,1,29") from None

    return parse


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def flag_for(f: dataclasses.Field, prefix: str = "") -> str:
    """The option a field becomes: its `flag` metadata, else `--<prefix><name>`."""
    return f.metadata.get("flag") or "--" + prefix + f.name.replace("_", "-")


def add_fields(parser: argparse.ArgumentParser, cls, prefix: str = "", section: str = "", skip: tuple[str, ...] = ()) -> None:
    """Add one option per field of dataclass `cls`; values land in `section.field` dests."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip or f.metadata.get("cli") is False or dataclasses.is_dataclass(hints[f.name]):
            continue
        flag = flag_for(f, prefix)
        dest = f"{section}.{f.name}" if section else f.name
        tp, _ = _unwrap(hints[f.name])
        default = _default(f)
        help_text = f.metadata.get("help", "")
        kwargs = dict(dest=dest, default=argparse.SUPPRESS)
        if tp is not bool:
            kwargs["metavar"] = f.name.upper()
        if tp is bool:
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            if typing.get_origin(tp) is list:
                kwargs["type"] = _list_of(typing.get_args(tp)[0], flag)
            else:
                kwargs["type"] = tp
            if "const" in f.metadata:  # `--ema` alone means the const, `--ema 0.99` a value
                kwargs.update(nargs="?", const=f.metadata["const"])
            if "choices" in f.metadata:
                kwargs["choices"] = choices = f.metadata["choices"]
                if not all(str(c) in help_text for c in choices):  # the metavar hides them otherwise
                    help_text = (help_text + "; " if help_text else "") + "one of " + ", ".join(map(str, choices))
            if default is not None:
                help_text += f" (default: {default})"
        parser.add_argument(flag, help=help_text.replace("%", "%%").replace("%%%%", "%%"), **kwargs)


def given(args: argparse.Namespace) -> dict:
    """Only the options the user typed, as {"field" or "section.field": value}."""
    return dict(vars(args))


def build(cls, values: dict, section: str = ""):
    """Construct dataclass `cls` from {"field" / "section.field": value}; nested sections recurse."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{section}.{f.name}" if section else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values, key)
        elif key in values:
            kwargs[f.name] = values[key]
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a value of the wrong type reached a field: name it
        raise SlimtuneError(f"invalid option for {cls.__name__}: {exc}") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (problem and where to look), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog.split()[0]}: error: {message}; see `{self.prog} --help`\n")
