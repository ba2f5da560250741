"""Registries of pluggable parts, the way torch-fidelity registers its feature extractors.

Every kind of part madloop plugs together (model families, estimators, data sources, loop modes, mitigations,
image metrics, scorers, paper studies) has a :class:`Registry`. An entry is registered under the name users write
in params.yaml and declares its **settings**: the params sections it reads, each a strict pydantic
:class:`Settings` class placed at a dotted params path (``{"model.vae": VAESettings}``, ``{"train": ...}``). That
declaration is the one home of the entry's defaults; ``tasks.params`` composes the params schema from every
entry's declarations, and a lineage's resume hash is exactly the settings its parts declare.

Parts are found the same way whether madloop ships them or a user does:

- a registry with a ``package`` imports every module of that package the first time it is asked for an entry,
  so a new built-in part is one new file;
- the ``madloop.plugins`` entry-point group names modules to import (madloop declares its own packages there, in
  pyproject.toml; another installed package can add its own);
- ``plugins: [my_module]`` in params.yaml imports a user's module before params are validated;
- or simply importing a module that calls ``REGISTRY.register`` (a test, a notebook).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, ClassVar, Generic, Iterator, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")
PLUGIN_GROUP = "madloop.plugins"


class Settings(BaseModel):
    """A strict params section: unknown keys are errors, assignments are validated. ``not_hashed`` names the
    fields that change no output (``data.download``), so no resume hash holds them. ``study_wide`` names the fields
    that decide what every lineage of a study shares (the data split, the scorer's classes), so a lineage's ``set:``
    may not change them.

    Every part's settings inherit the value rules: numbers are finite (``.inf`` and ``.nan`` are refused, as no
    knob means anything at infinity and NaN would travel into weights and manifests), and types are strict (``true``
    is not the integer 1, ``2.5`` is not an integer, ``"3"`` is not a number), so a typo in params.yaml is an error
    rather than a silent conversion."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)
    not_hashed: ClassVar[frozenset[str]] = frozenset()
    study_wide: ClassVar[frozenset[str]] = frozenset()


def settings_of(cls: type[Settings], section: BaseModel) -> Settings:
    """An instance of ``cls`` holding its fields' values from ``section`` (a composed section may hold more)."""
    return cls.model_construct(**{name: getattr(section, name) for name in cls.model_fields})


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered part: the object, the settings it reads (dotted params path -> class), and values it forces
    on them (``fixed``: the lambda = 0 control forces ``ple.lam`` to 0, whatever params say)."""

    name: str
    obj: T
    settings: Mapping[str, type[Settings]] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def doc(self) -> str:
        return (getattr(self.obj, "__doc__", None) or "").strip().split("\n")[0]


class Registry(Generic[T]):
    """name -> :class:`Entry`. Lookups import the registry's package (and the plug-ins) once, on first use."""

    all: list["Registry"] = []  # every registry created, for the params schema
    version = 0  # bumped on every registration, so a composed schema knows when to rebuild

    def __init__(self, kind: str, package: str | None = None, in_params: bool = True):
        self.kind = kind
        self.package = package
        # False: its parts' settings are not the loop's (the paper studies': checked by their own schema, so that
        # validating a loop study's params never imports them)
        self.in_params = in_params
        self._entries: dict[str, Entry[T]] = {}
        self._discovered = package is None
        self.hook_base: type | None = None  # set by only_hooks_of
        Registry.all.append(self)

    def only_hooks_of(self, base: type) -> None:
        """Refuse, from now on, any class whose public methods are not all hooks of ``base`` (its public methods):
        for parts that are called only through their base class's hooks (loop modes, mitigations), any other public
        name is a misspelled hook that would never be called. A helper's name starts with ``_``."""
        self.hook_base = base

    def register(self, name: str, *, settings: Mapping[str, type[Settings]] | None = None,
                 fixed: Mapping[str, Any] | None = None) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if self.hook_base is not None:
                problem = unknown_hooks(obj, self.hook_base)
                if problem:
                    raise ValueError(f"{self.kind} {name!r}: {problem}")
            misspelled = misspelled_hooks(obj)
            if misspelled:
                raise ValueError(f"{self.kind} {name!r}: " + "; ".join(
                    f"{found!r} is not a hook of {base} (did you mean {meant!r}? as written it is never called)"
                    for found, meant, base in misspelled))
            old = self._entries.get(name)
            if old is not None and getattr(old.obj, "__qualname__", None) != getattr(obj, "__qualname__", object()):
                raise ValueError(f"{self.kind} {name!r} is already registered (by {old.obj!r})")
            self._entries[name] = Entry(name, obj, dict(settings or {}), dict(fixed or {}))
            Registry.version += 1
            return obj

        return add

    def remove(self, name: str) -> None:
        """Forget an entry (tests that register parts of their own clean up with it)."""
        if self._entries.pop(name, None) is not None:
            Registry.version += 1

    def discover(self) -> None:
        """Import every module of the registry's package and every plug-in module (once)."""
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")
        load_entry_point_plugins()

    def entry(self, name: str) -> Entry[T]:
        self.discover()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entries(self) -> list[Entry[T]]:
        self.discover()
        return [self._entries[name] for name in sorted(self._entries)]

    def names(self) -> list[str]:
        return [entry.name for entry in self.entries()]

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def misspelled_hooks(obj: Any) -> list[tuple[str, str, str]]:
    """(name, the hook it resembles, the base class) for each public method a part's class defines that its base
    classes do not, but that is one typo away from a hook they do define: a misspelled hook would otherwise be
    silently never called, the do-nothing default running instead. Helpers with names of their own pass."""
    if not isinstance(obj, type):
        return []
    bases = [cls for cls in obj.__mro__[1:] if cls is not object]
    hooks = {name: cls.__name__ for cls in reversed(bases) for name, value in vars(cls).items()
             if not name.startswith("_") and callable(getattr(obj, name, None))}
    out = []
    for name, value in vars(obj).items():
        if name.startswith("_") or name in hooks or not callable(getattr(obj, name, None)):
            continue
        close = difflib.get_close_matches(name, list(hooks), n=1, cutoff=0.85)
        if close:
            out.append((name, close[0], hooks[close[0]]))
    return out


def unknown_hooks(cls: Any, base: type) -> str | None:
    """Why ``cls`` may not be registered where only the hooks of ``base`` are called: each public method it has
    that ``base`` does not, with the hook it most resembles. None when it has no such method."""
    hooks = sorted(name for name in dir(base) if not name.startswith("_") and callable(getattr(base, name)))
    unknown = [name for name in dir(cls) if not name.startswith("_") and name not in hooks
               and callable(getattr(cls, name, None))]
    if not unknown:
        return None
    named = "; ".join(f"{name!r} (the closest hook: {closest!r})" for name in unknown
                      for closest in difflib.get_close_matches(name, hooks, n=1, cutoff=0) or ["none"])
    return (f"{getattr(cls, '__name__', cls)} defines {named}, which is not a hook of {base.__name__}: the loop "
            f"calls only its hooks ({', '.join(hooks)}), so a misspelled one would never run; name a helper with a "
            "leading '_'")


_loaded_entry_points = False


def load_entry_point_plugins() -> None:
    """Import the modules of the ``madloop.plugins`` entry-point group (madloop's own packages and any other
    installed package's). Each module registers its parts when imported."""
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for point in metadata.entry_points(group=PLUGIN_GROUP):
        point.load()


def load_plugins(modules: list[str] = ()) -> None:
    """Everything that can register parts: the entry-point plug-ins, then the named user modules (params
    ``plugins``), then every registry's own package."""
    load_entry_point_plugins()
    for module in modules:
        importlib.import_module(module)
    for registry in list(Registry.all):
        registry.discover()
