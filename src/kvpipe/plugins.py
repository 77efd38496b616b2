"""The plugin manager: built-in plugins, then the ``kvpipe`` entry-point group, then ``check_pending()``.

Built-ins register through the same hooks as outside plugins (``DEFAULT_PLUGINS``). ``KVPIPE_DISABLE_PLUGINS``
(comma-separated plugin names) blocks plugins by name, built-in or not.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs
import pluggy

from kvpipe import hookspecs
from kvpipe.errors import ConfigError, PluginError

__all__ = [
    "DEFAULT_PLUGINS",
    "EvictionRegistry",
    "Registries",
    "SerdeRegistry",
    "StageRegistry",
    "TierRegistry",
    "get_plugin_manager",
    "registries",
]

DEFAULT_PLUGINS: list[str] = [
    "kvpipe.builtin_plugin",
    "kvpipe.connectors.plugin",
    "kvpipe.serde.cachegen.plugin",
]

F = TypeVar("F")


@attrs.define(eq=False)
class _Registry(Generic[F]):
    """Name → factory, remembering which plugin added each name so a duplicate names both."""

    kind: str
    factories: dict[str, F] = attrs.field(factory=dict)
    owners: dict[str, str] = attrs.field(factory=dict)
    current_plugin: str = "?"

    def add(self, name: str, factory: F) -> None:
        """Register ``factory`` under ``name``.

        :raises PluginError: when another plugin already registered ``name``.
        """
        key = name.lower()
        if key in self.factories:
            raise PluginError(f"{self.kind} {name!r} registered twice: by plugin {self.owners[key]!r} and by "
                              f"plugin {self.current_plugin!r}")
        self.factories[key] = factory
        self.owners[key] = self.current_plugin

    def get(self, name: str) -> F:
        """The factory for ``name``.

        :raises ConfigError: naming the known names when ``name`` is not registered.
        """
        try:
            return self.factories[name.lower()]
        except KeyError:
            known = ", ".join(sorted(self.factories)) or "none"
            raise ConfigError(f"unknown {self.kind} {name!r}: known are {known}") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.factories

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self.factories)


class TierRegistry(_Registry[Callable[..., Any]]):
    """URL scheme / tier name → async ``factory(url, ctx) -> Tier``."""


class SerdeRegistry(_Registry[Callable[..., Any]]):
    """Serde name → ``factory(config) -> Serde``."""


class EvictionRegistry(_Registry[Callable[[], Any]]):
    """Policy name → ``factory() -> EvictionPolicy``."""


@attrs.frozen
class StageSpec:
    """A registered pipeline stage."""

    name: str
    factory: Callable[..., Any]
    pipeline: str
    always: bool


class StageRegistry(_Registry[StageSpec]):
    """Stage name → :class:`StageSpec`."""

    def add(self, name: str, factory: Any, pipeline: str = "store", always: bool = False) -> None:  # type: ignore[override]
        """Register a stage factory for the ``store`` or ``retrieve`` pipeline.

        :raises PluginError: for a duplicate name or an unknown pipeline.
        """
        if pipeline not in ("store", "retrieve"):
            raise PluginError(f"stage {name!r}: pipeline must be 'store' or 'retrieve', not {pipeline!r}")
        super().add(name, StageSpec(name, factory, pipeline, always))


@attrs.frozen
class Registries:
    """Everything the plugins registered."""

    pm: pluggy.PluginManager
    tiers: TierRegistry
    serdes: SerdeRegistry
    stages: StageRegistry
    eviction: EvictionRegistry


_lock = threading.Lock()
_cached: Registries | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """A new plugin manager with built-ins and entry-point plugins loaded (minus ``KVPIPE_DISABLE_PLUGINS``).

    :raises PluginError: when a plugin does not match the hook specs.
    """
    pm = pluggy.PluginManager("kvpipe")
    pm.add_hookspecs(hookspecs)
    blocked = {n.strip() for n in os.environ.get("KVPIPE_DISABLE_PLUGINS", "").split(",") if n.strip()}
    for name in blocked:
        pm.set_blocked(name)
    for modname in DEFAULT_PLUGINS:
        if modname not in blocked:
            pm.register(importlib.import_module(modname), name=modname)
    try:
        pm.load_setuptools_entrypoints("kvpipe")
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"invalid kvpipe plugin: {exc}") from None
    return pm


def _collect(pm: pluggy.PluginManager) -> Registries:
    regs = Registries(pm, TierRegistry("tier"), SerdeRegistry("serde"), StageRegistry("stage"),
                      EvictionRegistry("eviction policy"))
    for hook, reg in ((pm.hook.kvpipe_register_tiers, regs.tiers), (pm.hook.kvpipe_register_serdes, regs.serdes),
                      (pm.hook.kvpipe_register_stages, regs.stages),
                      (pm.hook.kvpipe_register_eviction_policies, regs.eviction)):
        # One call per plugin, so a duplicate can name the plugin that added it.
        for impl in hook.get_hookimpls():
            reg.current_plugin = pm.get_name(impl.plugin) or "?"
            impl.function(registry=reg)
    return regs


def registries(*, reload: bool = False) -> Registries:
    """The process-wide registries (built once; ``reload=True`` rebuilds them, e.g. after installing a plugin)."""
    global _cached
    with _lock:
        if _cached is None or reload:
            _cached = _collect(get_plugin_manager())
        return _cached
