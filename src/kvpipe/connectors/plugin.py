"""The built-in connector plugin: ``redis://``, ``rediss://``, ``unix://``, ``valkey://``, ``valkeys://``,
``redis-sentinel://``, ``redis-cluster://``, ``lm://``, ``mooncakestore://`` and ``mock://`` remote URLs.

Connectors are built without I/O (connections are made on first use), so this hook stays synchronous and cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvpipe.config import parse_bool
from kvpipe.hookspecs import hookimpl

if TYPE_CHECKING:
    from kvpipe.config import Config
    from kvpipe.connectors.base import Connector

__all__ = ["SCHEMES", "connector_for_url", "kvpipe_connector_for_url"]

_REDIS = ("redis", "rediss", "unix", "valkey", "valkeys", "redis-sentinel", "valkey-sentinel", "redis-cluster",
          "valkey-cluster")
SCHEMES = (*_REDIS, "lm", "mooncakestore", "mock")


def connector_for_url(url: str, config: Config | None = None) -> Connector | None:
    """The connector for ``url``, or ``None`` when its scheme is not one of :data:`SCHEMES`.

    The Sentinel master name comes from the URL (path or ``?master_name=``), else from the config's
    ``extra_config["redis_sentinel_master"]``, else ``mymaster``; ``extra_config["remote_max_connections"]``
    bounds connections per node; ``extra_config["redis_read_from_replicas"]`` (Sentinel, cluster) is the default for the
    URL's ``?read_from_replicas=``.

    :raises ConfigError: for a malformed URL of one of these schemes.
    """
    scheme = url.split("://", 1)[0].lower()
    extra = dict(getattr(config, "extra_config", None) or {})
    maxc = extra.get("remote_max_connections")
    if scheme in _REDIS:
        from kvpipe.connectors.redis import RedisConnector

        return RedisConnector.from_url(url, master_name=extra.get("redis_sentinel_master"),
                                       max_connections=int(maxc) if maxc else None,
                                       read_from_replicas=parse_bool("redis_read_from_replicas",
                                                                     extra.get("redis_read_from_replicas", False)))
    if scheme == "lm":
        from kvpipe.connectors.lm import LmConnector

        return LmConnector.from_url(url)
    if scheme == "mooncakestore":
        from kvpipe.connectors.mooncake import MooncakeConnector

        return MooncakeConnector.from_url(url, extra)
    if scheme == "mock":
        from kvpipe.connectors.mock import MockConnector

        return MockConnector.from_url(url)
    return None


@hookimpl
def kvpipe_connector_for_url(url: str, config: Config) -> Connector | None:
    """Connectors for the Redis family, ``lm://``, ``mooncakestore://`` and ``mock://``; ``None`` for any other
    scheme."""
    return connector_for_url(url, config)
