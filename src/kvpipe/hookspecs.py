"""The hook contract of kvpipe's plugins: the two markers and the specs, nothing else.

Hooks are synchronous and run once at set-up (never per chunk): they register objects whose async methods do
the per-chunk work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kvpipe.config import Config
    from kvpipe.connectors.base import Connector
    from kvpipe.plugins import EvictionRegistry, SerdeRegistry, StageRegistry, TierRegistry

hookspec = pluggy.HookspecMarker("kvpipe")
hookimpl = pluggy.HookimplMarker("kvpipe")


@hookspec
def kvpipe_register_tiers(registry: TierRegistry) -> None:
    """Called once when the plugin manager is built. Add tier factories with ``registry.add(scheme, factory)``;
    ``factory(url, ctx)`` is an async callable returning a :class:`~kvpipe.tiers.base.Tier`. A tier registered
    under a URL scheme serves ``remote_url``s of that scheme directly."""


@hookspec
def kvpipe_register_serdes(registry: SerdeRegistry) -> None:
    """Called once. Add serdes with ``registry.add(name, factory)``; ``factory(config)`` returns a
    :class:`~kvpipe.serde.base.Serde`."""


@hookspec
def kvpipe_register_stages(registry: StageRegistry) -> None:
    """Called once. Add pipeline stages with ``registry.add(name, factory, pipeline="store"|"retrieve")``;
    ``factory(config)`` returns a :class:`~kvpipe.pipeline.stages.Stage`, run after the built-in stages of that
    pipeline when the config's ``extra_stages`` names it (or always, with ``always=True``)."""


@hookspec
def kvpipe_register_eviction_policies(registry: EvictionRegistry) -> None:
    """Called once. Add eviction policies with ``registry.add(name, factory)``; ``factory()`` returns a
    :class:`~kvpipe.memory.eviction.EvictionPolicy`."""


@hookspec(firstresult=True)
def kvpipe_connector_for_url(url: str, config: Config) -> Connector | None:
    """Decide which connector serves a ``remote_url``. Return a :class:`~kvpipe.connectors.base.Connector` (not
    yet connected) for a URL this plugin understands, ``None`` otherwise. The first non-``None`` answer wins.

    :raises ConfigError: for a URL of this plugin's scheme that is malformed.
    """
