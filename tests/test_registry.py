"""Plugin registry (core/registry.py): decorator, duplicates, close matches, contract
checks, entry-point discovery, built-ins, the read-only view - each error message checked."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
import tessera.core.registry as reg
from doubles import FixedDouble, GridDouble, register_doubles
from tessera.core.registry import RegistryError, get_modality, register_modality, registry


@pytest.fixture(autouse=True)
def _isolated_registry() -> Iterator[None]:
    """Every test sees the real registry (doubles included) and leaves it as it found it."""
    register_doubles()
    saved, discovered = dict(reg._plugins), reg._discovered
    yield
    with reg._lock:
        reg._plugins.clear()
        reg._plugins.update(saved)
        reg._discovered = discovered


def make_plugin(name: str = "toy", drop: tuple[str, ...] = (), **override: Any) -> type:
    """A class with every contract member (borrowed from FixedDouble), minus ``drop``."""
    members: dict[str, Any] = {
        "name": name,
        "media_kind": "timeseries",
        "file_extensions": (".txt",),
        "spec": FixedDouble.spec,
        **{m: FixedDouble.__dict__[m] for m in ("encode", "decode", "read", "write", "save", "load", "debug", "example")},
    }
    members.update(override)
    for m in drop:
        del members[m]
    return type("ToyPlugin", (), members)


# ---- decorator, duplicates, look-up ---------------------------------------------------
def test_decorator_registers_and_returns_the_class() -> None:
    cls = make_plugin("toy_ok")
    assert register_modality(cls) is cls
    assert get_modality("toy_ok") is cls and registry["toy_ok"] is cls and "toy_ok" in registry
    assert register_modality(cls) is cls  # the same class again is not a duplicate


def test_duplicate_name_raises_unless_override() -> None:
    other = make_plugin("double_fixed")
    with pytest.raises(RegistryError, match=r"'double_fixed' is already registered by doubles.FixedDouble; "
                                            r"pick another name, or pass register_modality\(override=True\)"):
        register_modality(other)
    assert get_modality("double_fixed") is FixedDouble
    assert register_modality(override=True)(other) is other
    assert get_modality("double_fixed") is other


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(RegistryError, match=r"no modality named 'double_fixd' \(did you mean 'double_fixed'.*"
                                            r"registered: \[.*\]\. Install its package or register it"):
        get_modality("double_fixd")
    with pytest.raises(RegistryError, match=r"'zzz' \(no close match\)"):
        registry["zzz"]
    assert "zzz" not in registry


def test_view_is_read_only_and_lists_builtins_first(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TypeError):
        registry["x"] = FixedDouble  # type: ignore[index]
    with pytest.raises(TypeError):
        del registry["double_fixed"]  # type: ignore[attr-defined]
    monkeypatch.setattr(reg, "BUILTIN_MODALITIES", {"double_grid": "doubles", "double_fixed": "doubles"})
    names = list(registry)
    assert names[:2] == ["double_grid", "double_fixed"]
    assert names[2:] == sorted(names[2:]) and "double_variable" in names[2:]
    assert len(registry) == len(names)


def test_unregister_then_register_doubles_again() -> None:
    reg.unregister_modality("double_grid")
    assert "double_grid" not in registry
    reg.unregister_modality("double_grid")  # absent: no error
    register_doubles()
    assert get_modality("double_grid") is GridDouble


# ---- contract violations ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"drop": ("decode", "example")}, r"modality plugin ToyPlugin is missing decode, example; every plugin "
                                          r"implements name, media_kind.*tessera.core.spec.ModalityPlugin"),
        ({"name": "Toy-Plugin"}, r"ToyPlugin: name='Toy-Plugin' must be a lower-case identifier"),
        ({"media_kind": "smell"}, r"ToyPlugin \(toy\): media_kind='smell' is not one of \('image'"),
        ({"file_extensions": ["txt"]}, r"ToyPlugin \(toy\): file_extensions=\['txt'\] must be a tuple like"),
        ({"encode": 3}, r"ToyPlugin \(toy\): encode must be a method"),
        ({"load": lambda path: None}, r"ToyPlugin \(toy\): load must be a classmethod"),
        ({"spec": lambda self: None}, r"ToyPlugin \(toy\): spec must be a property"),
    ],
)
def test_contract_violation_names_plugin_and_member(kwargs: dict, needle: str) -> None:
    with pytest.raises(RegistryError, match=needle):
        register_modality(make_plugin(**kwargs))


def test_registering_an_instance_says_register_the_class() -> None:
    with pytest.raises(RegistryError, match="got <.*a FixedDouble; register the plugin class itself"):
        register_modality(FixedDouble.debug())  # type: ignore[arg-type]


# ---- entry points and built-ins --------------------------------------------------------------
def test_installed_template_plugin_is_discovered_through_its_entry_point() -> None:
    eps = {ep.name: ep.value for ep in reg.entry_points(group=reg.ENTRY_POINT_GROUP)}
    assert eps.get("sensor") == "tessera_sensor:SensorTokenizer", "run `make env` (pip install -e examples/plugin-template)"
    reg.unregister_modality("sensor")
    reg.discover(reload=True)
    cls = get_modality("sensor")
    assert cls.__module__ == "tessera_sensor.tokenizer" and cls.media_kind == "timeseries"


def _fake_eps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *eps: tuple[str, str], module: str = "") -> None:
    if module:
        (tmp_path / "tess_fake_plugin.py").write_text(module)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "tess_fake_plugin", raising=False)
    points = [EntryPoint(name=n, value=v, group=reg.ENTRY_POINT_GROUP) for n, v in eps]
    monkeypatch.setattr(reg, "entry_points", lambda group: points if group == reg.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(reg, "_discovered", False)


PLUGIN_SRC = """
from doubles import FixedDouble
class Third:
    name = "third"
    media_kind = "motion"
    file_extensions = (".npy",)
    spec = FixedDouble.spec
    encode, decode, read, write, save, example = (FixedDouble.__dict__[m] for m in
        ("encode", "decode", "read", "write", "save", "example"))
    load, debug = FixedDouble.__dict__["load"], FixedDouble.__dict__["debug"]
class NoDecode:
    name = "nodecode"
    media_kind = "motion"
    file_extensions = (".npy",)
"""


def test_entry_point_plugin_is_registered(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_eps(monkeypatch, tmp_path, ("third", "tess_fake_plugin:Third"), module=PLUGIN_SRC)
    assert "third" in registry and get_modality("third").__name__ == "Third"
    assert "third" in list(registry)


@pytest.mark.parametrize(
    ("ep", "needle"),
    [
        (("ghost", "tess_no_such_package:Plugin"), r"entry point 'ghost' = 'tess_no_such_package:Plugin' in group "
                                                   r"'tessera.modalities' failed to import: .*fix or uninstall"),
        (("wrong", "tess_fake_plugin:Third"), r"entry point 'wrong' .* points to a plugin named 'third'; the "
                                              r"entry-point name must equal the plugin's name"),
        (("nodecode", "tess_fake_plugin:NoDecode"), r"entry point 'nodecode' .*: modality plugin NoDecode is "
                                                    r"missing spec, encode, decode"),
    ],
)
def test_broken_entry_points_name_the_entry_point(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ep: tuple[str, str], needle: str
) -> None:
    _fake_eps(monkeypatch, tmp_path, ep, module=PLUGIN_SRC)
    with pytest.raises(RegistryError, match=needle):
        reg.discover()
    with pytest.raises(RegistryError, match=needle):  # raised again, never silently skipped later
        get_modality("not_there")


def test_entry_point_clashing_with_a_registered_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = PLUGIN_SRC.replace('name = "third"', 'name = "double_grid"')
    _fake_eps(monkeypatch, tmp_path, ("double_grid", "tess_fake_plugin:Third"), module=src)
    with pytest.raises(RegistryError, match=r"clashes with the modality 'double_grid' already registered by "
                                            r"doubles.GridDouble; rename the third-party plugin or uninstall"):
        reg.discover()


def test_builtins_absent_are_skipped_broken_ones_raise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_eps(monkeypatch, tmp_path)
    monkeypatch.setattr(reg, "BUILTIN_MODALITIES", {"ghost": "tessera.modalities.ghost_not_installed"})
    reg.discover()  # absent built-in: skipped
    assert "ghost" not in registry
    (tmp_path / "tess_fake_builtin.py").write_text("import tess_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(reg, "BUILTIN_MODALITIES", {"fake": "tess_fake_builtin"})
    with pytest.raises(RegistryError, match=r"built-in modality 'fake' \(tess_fake_builtin\) needs the module "
                                            r"'tess_missing_dependency', which is not installed; run `pip install"):
        reg.discover(reload=True)
