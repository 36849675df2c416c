"""Command-line flags derived from the config dataclasses, and the parser that reads them.

A config field (:mod:`simclr_kit.config`) is declared once; its flag follows from it: the name
``--field-name`` (or the ``flag`` of its :func:`~simclr_kit.config.setting`), the type from the
annotation (``int``, ``float``, ``str``; ``bool`` as ``--x``, ``--x true|false`` and
``--no-x``; ``tuple[X, ...]`` as a comma list; ``X | None`` as ``X``), and the help from the
field's ``help`` and its default. A flag's value lands at the field's dotted path
(``data.image_size``) in the namespace, None when the flag is not given, so that only the flags
the user gave are laid over a config file (:func:`overrides`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from typing import Any, Callable, NamedTuple, NoReturn, Sequence

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """``true``/``false`` and their synonyms (1/0, yes/no, on/off), any case."""
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def comma_list(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    """A parser of ``a,b,c`` into a tuple of ``kind``; empty items are dropped."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return parse


class Flag(NamedTuple):
    """One flag: its name, the dotted config path its value goes to, the parser of its text
    (:func:`parse_bool` for a true/false option) and its help, default included."""

    flag: str
    dest: str
    kind: Callable[[str], Any]
    help: str


def _kind(hint: Any) -> Callable[[str], Any]:
    """The parser of a flag's text for a field annotated ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [arm for arm in typing.get_args(hint) if arm is not type(None)]
    if typing.get_origin(hint) is tuple:
        return comma_list(_kind(typing.get_args(hint)[0]))
    if hint is bool:  # bool itself would read "false" as True
        return parse_bool
    return hint


def show_default(value: Any) -> str:
    """A default as the help says it: ``0.001``, ``1e-06``, ``linear,knn``, ``none``."""
    if isinstance(value, tuple):
        return ",".join(show_default(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_flags(cls: type, prefix: str = "") -> list[Flag]:
    """The flags of a config dataclass's fields, in declaration order; ``prefix`` is the
    section's path (``"data."``). Fields whose type is a dataclass (sections) and fields
    declared with :func:`~simclr_kit.config.unflagged` have none."""
    hints = typing.get_type_hints(cls)
    flags = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if dataclasses.is_dataclass(hints[f.name]) or meta.get("flag") is False:
            continue
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name} is declared without setting() or "
                            "unflagged(): it has no help text for its flag")
        shown = meta.get("shown")
        if shown is None:
            if f.default is None:
                raise TypeError(f"{cls.__name__}.{f.name}: a None default needs shown=, the "
                                "wording of what None means")
            shown = show_default(f.default)
        text = f"{meta['help']} (default: {shown})" if shown else meta["help"]
        name = meta.get("flag") or "--" + f.name.replace("_", "-")
        flags.append(Flag(name, prefix + f.name, _kind(hints[f.name]), text))
    return flags


def add_bool(group: argparse._ActionsContainer, flag: str, dest: str, text: str,
             default: bool | None = None) -> None:
    """One boolean option, three spellings: ``--flag`` (true), ``--flag true|false`` and
    ``--no-flag`` (false). A bare flag before a positional is kept from taking it as its value
    by :meth:`Parser.parse_known_args`."""
    off = f"--no-{flag[2:]}"
    group.add_argument(flag, dest=dest, type=parse_bool, nargs="?", const=True, default=default,
                       metavar="true|false", help=f"{text}; {off} turns it off")
    group.add_argument(off, dest=dest, action="store_const", const=False, help=argparse.SUPPRESS)


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag], title: str) -> None:
    """``flags`` as an argument group called ``title``; each defaults to None (not given)."""
    group = parser.add_argument_group(title)
    for flag, path, kind, text in flags:
        if kind is parse_bool:
            add_bool(group, flag, path, text)
            continue
        group.add_argument(flag, dest=path, type=kind, default=None, help=text,
                           metavar=flag.lstrip("-").replace("-", "_").upper())


def overrides(args: argparse.Namespace, flags: list[Flag]) -> dict[str, Any]:
    """Nested dict of the flags the user gave (``data.image_size`` -> {"data": {...}})."""
    out: dict[str, Any] = {}
    for _, path, _, _ in flags:
        value = getattr(args, path, None)
        if value is None:
            continue
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


class Parser(argparse.ArgumentParser):
    """Usage mistakes are user errors too: one line on stderr and exit 2, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> Any:
        """A bare boolean flag becomes ``--flag=true`` unless a true/false word follows it, so
        that ``--probe-augment RUN`` does not read RUN as the flag's value."""
        words = list(sys.argv[1:] if args is None else args)
        flags = {s for a in self._actions if a.type is parse_bool and a.nargs == "?"
                 for s in a.option_strings}
        self.after_bare: dict[str, str] = {}  # the word after each bare flag: its value meant?
        for i, word in enumerate(words):
            after = words[i + 1].lower() if i + 1 < len(words) else None
            if word in flags and after not in _TRUE + _FALSE:
                words[i] = f"{word}=true"
                if after is not None:
                    self.after_bare[words[i + 1]] = word
        return super().parse_known_args(words, namespace)

    def unrecognized(self, extra: list[str]) -> NoReturn:
        """Unknown arguments, with the closest flag of this command for each unknown one; a
        word left over after an on/off flag was meant as its value (``--deterministic maybe``)."""
        for word in extra:
            flag = getattr(self, "after_bare", {}).get(word)
            if flag is not None:
                self.error(f"{flag} takes true or false (or nothing, for true), not {word!r}")
        options = {o.lstrip("-").replace("-", ""): o for a in self._actions
                   for o in a.option_strings if o.startswith("--")}
        hints = []
        for word in (w.split("=")[0] for w in extra if w.startswith("--")):
            close = difflib.get_close_matches(word.lstrip("-").replace("-", ""), list(options),
                                              n=1, cutoff=0.75)
            hints += [(word, options[c]) for c in close]
        hint = ""
        if len(hints) == 1:
            hint = f"; did you mean {hints[0][1]}?"
        elif hints:
            hint = f"; did you mean {', '.join(f'{flag} for {word}' for word, flag in hints)}?"
        self.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
