"""Registers the ``cachegen`` serde (a built-in plugin, listed in ``DEFAULT_PLUGINS``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvpipe.hookspecs import hookimpl

if TYPE_CHECKING:
    from kvpipe.plugins import SerdeRegistry


@hookimpl
def kvpipe_register_serdes(registry: SerdeRegistry) -> None:
    """``cachegen``: the CacheGen codec, configured by the config's ``cachegen_*`` keys."""
    from kvpipe.serde.cachegen.serde import create_cachegen_serde

    registry.add("cachegen", create_cachegen_serde)
