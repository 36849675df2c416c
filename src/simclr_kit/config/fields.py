"""How a config field is declared, and how configs are read from plain dicts and written back.

Nothing here knows which configs exist (they are in :mod:`simclr_kit.config`): a field is
declared with :func:`setting` (its default, its meaning with units, and what its command-line
flag needs: :mod:`simclr_kit.cli.flags`) or :func:`unflagged`; :func:`from_dict` builds any config
dataclass, sections included, from a dict (a YAML file, a built-in recipe, the flags given),
with one-line errors that name the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field, fields
from pathlib import Path
from typing import Any, Sequence, TypeVar

from simclr_kit.errors import UserError


class ConfigError(UserError):
    """A configuration value outside its allowed range."""


def setting(default: Any, help: str, *, flag: str | None = None, shown: str | None = None,
            resumable: bool = False, pinned_by_recipe: bool = True) -> Any:
    """A config field with its documentation: ``help`` says what the value means, with its
    units, and is also its flag's ``--help`` text, which ends in "(default: VALUE)".

    ``flag``: the command-line flag where it is not ``--field-name`` (``--logger`` for
    ``loggers``). ``shown``: the wording of the default where the value alone does not say it:
    what a ``None`` means ("0.5 at <= 64 px, 1.0 above"), or the value with a note ("0, off");
    "" for a flag whose default depends on the command and is said by its group.
    ``resumable``: a resumed run may change it (how long the run trains, where and how it
    reports); every other field is the run's own. ``pinned_by_recipe``: False for a field whose
    value in a recipe says how long or on what a run trains rather than how (the dataset, the
    epochs, the batch), so that setting it does not count as choosing against the recipe.
    :func:`marked` lists the fields of each kind.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "shown": shown,
                                            "resumable": resumable,
                                            "pinned_by_recipe": pinned_by_recipe})


def marked(cls: type, fact: str, value: bool = True) -> tuple[str, ...]:
    """The fields of the config dataclass ``cls`` whose :func:`setting` (or :func:`unflagged`)
    says ``fact=value`` (``marked(PretrainConfig, "resumable")``), as dotted paths: its own
    fields in declaration order, then those of its sections (``data.decode_workers``)."""
    own = [f.name for f in fields(cls)  # type: ignore[arg-type]
           if f.name not in sections(cls) and f.metadata.get(fact, not value) is value]
    inner = [f"{name}.{sub}" for name, section in sections(cls).items()
             for sub in marked(section, fact, value)]
    return tuple(own + inner)


def flag_name(cls: type, name: str) -> str:
    """The command-line flag of the field ``name`` of the config dataclass ``cls`` ("" for a
    field declared :func:`unflagged`)."""
    meta = next(f.metadata for f in fields(cls) if f.name == name)  # type: ignore[arg-type]
    if meta.get("flag") is False:
        return ""
    return meta.get("flag") or "--" + name.replace("_", "-")


def closest(value: Any, choices: Sequence[Any]) -> Any | None:
    """The choice nearest to ``value`` in spelling, None when none is near."""
    by_text = {str(c): c for c in choices}
    near = difflib.get_close_matches(str(value), list(by_text), n=1, cutoff=0.6)
    return by_text[near[0]] if near else None


def unknown_choice(what: str, value: Any, choices: Sequence[Any], flag: str) -> ConfigError:
    """The one error of every choice-valued setting: "unknown optimizer 'adamx' (--optimizer):
    choose from 'lars', 'sgd', 'adam'", with the closest choice when one is near."""
    near = closest(value, choices)
    hint = f"; did you mean {near!r}?" if near is not None else ""
    return ConfigError(f"unknown {what} {value!r} ({flag}): choose from "
                       f"{', '.join(map(repr, choices))}{hint}")


def unflagged(default: Any, help: str, *, resumable: bool = False) -> Any:
    """A config field that has no command-line flag (config files and the API set it); ``help``
    says what it means and why it is not a flag; ``resumable`` as for :func:`setting`."""
    return field(default=default, metadata={"help": help, "flag": False,
                                            "resumable": resumable})


C = TypeVar("C")


def _typed(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether ``value`` fits the annotation ``hint``, the value converted to it)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, converted = (value is None, None) if arm is type(None) else _typed(value, arm)
            if ok:
                return True, converted
        return False, value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        checked = [_typed(v, typing.get_args(hint)[0]) for v in value]
        return all(ok for ok, _ in checked), tuple(v for _, v in checked)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads 3e-4 (no dot) as text, not as a number
            return True, float(value)
        except ValueError:
            return False, value
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number, float(value) if number else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint in (bool, str):
        return isinstance(value, hint), value
    return True, value


def _field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]  # type: ignore[arg-type]


def sections(cls: type) -> dict[str, type]:
    """The fields of a config dataclass that are config dataclasses themselves, by name
    (a pretraining config's ``data`` and ``augment``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)  # type: ignore[arg-type]
            if dataclasses.is_dataclass(hints[f.name])}


def normalize_keys(cls: type, values: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """``values`` with the keys spelled as the dataclass fields, for files written like flags.

    A key may use the flag's dashes (``batch-size``). The fields of a section (a field that is
    a config dataclass itself: a pretraining config's ``data`` and ``augment``) may also stand
    at the top level, as their flags do (``image_size: 32``, ``flip_p: 0``), and a section
    given as a value sets its field of the same name (``data: NAME`` means
    ``data: {data: NAME}``). A field given twice
    (``batch-size`` and ``batch_size``, or ``image_size`` and ``data.image_size``) is an error
    rather than a guess. Unknown keys are left for :func:`from_dict` to name.
    """
    if not isinstance(values, dict):
        return values
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in values.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name in out:
            raise ConfigError(f"{where}: {name!r} is given twice ({spelled[name]!r} and {key!r})")
        out[name], spelled[name] = value, key
    nested = sections(cls)
    for section, inner in nested.items():
        if isinstance(out.get(section), str) and section in _field_names(inner):
            out[section] = {section: out[section]}  # data: NAME
        if isinstance(out.get(section), dict):
            out[section] = normalize_keys(inner, out[section], f"{where}.{section}")
    top = set(_field_names(cls))
    for name in [k for k in out if k not in top]:
        owners = [s for s, inner in nested.items() if name in _field_names(inner)]
        if len(owners) != 1 or not isinstance(out.get(owners[0], {}), dict):
            continue  # unknown, or a section of the wrong type: from_dict names the problem
        section = out.setdefault(owners[0], {})
        if name in section:
            raise ConfigError(f"{where}: {name!r} is given twice (as {owners[0]}.{name} too)")
        section[name] = out.pop(name)
    return out


def _unknown_keys(where: str, unknown: list[str], known: list[str]) -> ConfigError:
    hints = [f"{u!r} -> {m[0]!r}" for u in unknown
             if (m := difflib.get_close_matches(u.replace("-", "_"), known, n=1, cutoff=0.75))]
    hint = (f" (did you mean {', '.join(hints)}?)" if hints else
            "; the keys are the flags' names without the leading -- (see --help)")
    return ConfigError(f"{where}: unknown key(s) {unknown}{hint}")


def from_dict(cls: type[C], values: dict[str, Any], where: str = "config") -> C:
    """Build a (nested) config dataclass from a plain dict; unknown keys and values of the wrong
    type are one-line errors naming the field. Keys may be spelled as :func:`normalize_keys`
    accepts."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of field names to values")
    values = normalize_keys(cls, values, where)
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise _unknown_keys(where, unknown, list(known))
    hints, nested = typing.get_type_hints(cls), sections(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name in nested:
            value = from_dict(nested[name], value, f"{where}.{name}")
        else:
            ok, value = _typed(value, hints[name])
            if not ok:
                label = name if where == "config" else f"{where}.{name}"
                hint = hints[name]
                expected = hint.__name__ if isinstance(hint, type) else \
                    str(hint).replace("typing.", "").replace("NoneType", "None")
                raise ConfigError(f"{label} = {value!r} has the wrong type: expected {expected}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a config, nested dataclasses included."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    """The config as the YAML that ``config.yaml`` holds and ``--config`` reads, fields in
    declaration order."""
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"data": "digits"}}`` -> ``{"data.data": "digits"}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _recipe_folder() -> Any:
    from importlib import resources

    return resources.files("simclr_kit").joinpath("recipes")


def recipe_names() -> list[str]:
    """The built-in recipes: ``recipes/NAME.yaml`` in the package."""
    return sorted(f.name.removesuffix(".yaml") for f in _recipe_folder().iterdir()
                  if f.name.endswith(".yaml"))


def recipe(name: str) -> dict[str, Any]:
    """A built-in recipe (``recipes/NAME.yaml`` in the package) as a dict of config fields."""
    import yaml

    folder = _recipe_folder()
    known = recipe_names()
    if name not in known:
        raise unknown_choice("recipe", name, known, "--config")
    return yaml.safe_load(folder.joinpath(f"{name}.yaml").read_text()) or {}


def config_source(name: str, cls: type) -> dict[str, Any]:
    """What ``--config NAME`` names: a YAML file, else a built-in recipe of that name; neither
    is one line naming the recipes (and the closest one)."""
    if Path(name).exists() or name not in recipe_names():
        if not Path(name).exists() and Path(name).suffix not in (".yaml", ".yml"):
            known = recipe_names()
            near = closest(name, known)
            raise ConfigError(f"--config {name}: no such file, and not a built-in recipe "
                              f"(built-in: {', '.join(known)})"
                              + (f"; did you mean {near}?" if near else ""))
        return load_yaml(name, cls)
    return recipe(name)


def load_yaml(path: str | Path, cls: type | None = None) -> dict[str, Any]:
    """Read a YAML config file into a dict (validated when turned into a dataclass); with
    ``cls``, its keys spelled as that dataclass's fields (:func:`normalize_keys`), so that flags
    merged on top of it meet the same keys."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    import yaml  # lazily: the training step and the benchmarks need no YAML

    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {p} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {p} must hold a mapping of field names to values")
    return normalize_keys(cls, values) if cls is not None else values


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively overlay ``overrides`` (None values ignored) on ``base``."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def ensure(ok: bool, name: str, allowed: str, value: Any) -> None:
    """A field's range check: unless ``ok``, one line naming the field, its value and the range."""
    if not ok:
        raise ConfigError(f"{name} = {value!r} is out of range: must be {allowed}")


def one_of(config: Any, name: str, choices: tuple[str, ...], what: str) -> None:
    """A choice-valued field (each item of a tuple field): an unknown value names the flag, the
    choices and the closest one."""
    value = getattr(config, name)
    for item in value if isinstance(value, tuple) else (value,):
        if item not in choices:
            raise unknown_choice(what, item, choices, flag_name(type(config), name))


def probability(name: str, value: float | None) -> None:
    if value is not None:
        ensure(0.0 <= value <= 1.0, name, "a probability in [0, 1]", value)
