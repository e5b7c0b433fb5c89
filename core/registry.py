"""The modality plugin registry: a decorator for ours, entry points for other people's,
a read-only view for everyone.

    from tessera.core.registry import register_modality

    @register_modality
    class ImageTokenizer:
        name = "image"
        media_kind = "image"
        ...

Third-party packages declare ``[project.entry-points."tessera.modalities"]
name = "package.module:PluginClass"`` and are discovered by :func:`discover`.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import threading
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

from .spec import MEDIA_KINDS

__all__ = [
    "register_modality",
    "unregister_modality",
    "get_modality",
    "registry",
    "discover",
    "RegistryError",
    "REQUIRED_MEMBERS",
    "ENTRY_POINT_GROUP",
    "BUILTIN_MODALITIES",
]

ENTRY_POINT_GROUP = "tessera.modalities"
# Built-in plugins, imported on first look-up (lazy: importing tessera.core stays light).
BUILTIN_MODALITIES: dict[str, str] = {
    "image": "tessera.modalities.image",
    "video": "tessera.modalities.video",
    "speech": "tessera.modalities.speech",
}

# member -> kind ("attr": class attribute, "method": callable, "classmethod", "property")
REQUIRED_MEMBERS: dict[str, str] = {
    "name": "attr",
    "media_kind": "attr",
    "file_extensions": "attr",
    "spec": "property",
    "encode": "method",
    "decode": "method",
    "read": "method",
    "write": "method",
    "save": "method",
    "load": "classmethod",
    "debug": "classmethod",
    "example": "method",
}


class RegistryError(ValueError):
    """A plugin breaks the contract, a name is taken, or a name is unknown."""


T = TypeVar("T", bound=type)

_lock = threading.RLock()
_plugins: dict[str, type] = {}
_discovered = False
_discovering = False


def _check_contract(cls: type) -> None:
    if not isinstance(cls, type):
        raise RegistryError(
            f"register_modality got {cls!r}, a {type(cls).__name__}; register the plugin class itself "
            f"(decorate the class, do not pass an instance)"
        )
    who = getattr(cls, "__qualname__", repr(cls))
    missing = [m for m in REQUIRED_MEMBERS if not hasattr(cls, m)]
    if missing:
        raise RegistryError(
            f"modality plugin {who} is missing {', '.join(missing)}; every plugin implements "
            f"{', '.join(REQUIRED_MEMBERS)} (see tessera.core.spec.ModalityPlugin)"
        )
    name = cls.name
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise RegistryError(f"modality plugin {who}: name={name!r} must be a lower-case identifier")
    if cls.media_kind not in MEDIA_KINDS:
        raise RegistryError(
            f"modality plugin {who} ({name}): media_kind={cls.media_kind!r} is not one of {MEDIA_KINDS}"
        )
    exts = cls.file_extensions
    if not isinstance(exts, tuple) or not all(isinstance(e, str) and e.startswith(".") for e in exts):
        raise RegistryError(
            f"modality plugin {who} ({name}): file_extensions={exts!r} must be a tuple like ('.png', '.jpg')"
        )
    for member, kind in REQUIRED_MEMBERS.items():
        raw = inspect.getattr_static(cls, member)
        if kind == "method" and not callable(raw):
            raise RegistryError(f"modality plugin {who} ({name}): {member} must be a method")
        if kind == "classmethod" and not isinstance(raw, (classmethod, staticmethod)):
            raise RegistryError(f"modality plugin {who} ({name}): {member} must be a classmethod")
        if kind == "property" and not isinstance(raw, (property, functools.cached_property)):
            raise RegistryError(f"modality plugin {who} ({name}): {member} must be a property")


def register_modality(cls: T | None = None, *, override: bool = False) -> T | Callable[[T], T]:
    """Class decorator: check ``cls`` against the plugin contract and register it under
    ``cls.name``. A second plugin with the same name raises unless ``override=True``."""

    def deco(c: T) -> T:
        _check_contract(c)
        with _lock:
            old = _plugins.get(c.name)
            if old is not None and old is not c and not override:
                raise RegistryError(
                    f"modality {c.name!r} is already registered by {old.__module__}.{old.__qualname__}; "
                    f"pick another name, or pass register_modality(override=True) to replace it on purpose"
                )
            _plugins[c.name] = c
        return c

    return deco(cls) if cls is not None else deco


def unregister_modality(name: str) -> None:
    """Remove ``name`` from the registry (no error if it is not there), e.g. after a test."""
    with _lock:
        _plugins.pop(name, None)


def discover(*, reload: bool = False) -> None:
    """Import built-in plugins and entry-point plugins (once, unless ``reload``). A built-in
    that is not part of this install is skipped. A broken third-party plugin raises
    :class:`RegistryError` naming the entry point, on every call until it is fixed."""
    global _discovered, _discovering
    with _lock:
        if (_discovered and not reload) or _discovering:  # a plugin module looking up another one
            return
        _discovering = True
        try:
            for name, module in BUILTIN_MODALITIES.items():
                if name in _plugins:
                    continue
                try:
                    importlib.import_module(module)
                except ModuleNotFoundError as e:
                    if e.name and (e.name == module or module.startswith(e.name + ".")):
                        continue  # that built-in is not part of this install
                    raise RegistryError(
                        f"built-in modality {name!r} ({module}) needs the module {e.name!r}, which is not "
                        f"installed; run `pip install -e .` (or make env) to install Tessera's dependencies"
                    ) from e
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                _register_entry_point(ep)
            _discovered = True
        finally:
            _discovering = False


def _register_entry_point(ep: EntryPoint) -> None:
    where = f"entry point {ep.name!r} = {ep.value!r} in group {ENTRY_POINT_GROUP!r}"
    try:
        cls = ep.load()
    except Exception as e:
        raise RegistryError(f"{where} failed to import: {e}; fix or uninstall that package") from e
    if getattr(cls, "name", None) != ep.name:
        raise RegistryError(
            f"{where} points to a plugin named {getattr(cls, 'name', None)!r}; the entry-point name "
            f"must equal the plugin's name"
        )
    old = _plugins.get(ep.name)
    if old is cls:
        return
    if old is not None:
        raise RegistryError(
            f"{where} (distribution {ep.dist.name if ep.dist else '?'}) clashes with the modality "
            f"{ep.name!r} already registered by {old.__module__}.{old.__qualname__}; rename the "
            f"third-party plugin or uninstall one of them"
        )
    try:
        register_modality(cls)
    except RegistryError as e:
        raise RegistryError(f"{where}: {e}") from e


def get_modality(name: str) -> type:
    """The plugin class registered as ``name``; unknown names list close matches."""
    with _lock:
        if name not in _plugins:
            discover()
        if name in _plugins:
            return _plugins[name]
        close = difflib.get_close_matches(name, list(_plugins), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(map(repr, close))}?" if close else "no close match"
        raise RegistryError(
            f"no modality named {name!r} ({hint}); registered: {sorted(_plugins)}. Install its "
            f"package or register it with @register_modality"
        )


class _RegistryView(Mapping[str, type]):
    """Read-only view of the registered plugins (discovers on first use)."""

    def __getitem__(self, name: str) -> type:
        return get_modality(name)

    def __iter__(self) -> Iterator[str]:
        """Built-ins first (in :data:`BUILTIN_MODALITIES` order), then every other plugin by
        name, so a vocabulary built by iterating the registry gives third-party plugins
        the ids after the built-in ones."""
        discover()
        with _lock:
            builtins = [n for n in BUILTIN_MODALITIES if n in _plugins]
            return iter(builtins + sorted(n for n in _plugins if n not in BUILTIN_MODALITIES))

    def __len__(self) -> int:
        discover()
        return len(_plugins)

    def __contains__(self, name: Any) -> bool:
        discover()
        return name in _plugins

    def __repr__(self) -> str:
        with _lock:
            return f"registry({sorted(_plugins)})"


registry: Mapping[str, type] = _RegistryView()
