"""Parsing Redis-family URLs (``redis://``, ``rediss://``, ``unix://``, ``valkey://``, ``valkeys://``,
``redis-sentinel://``, ``redis-cluster://``) into what :class:`~kvpipe.connectors.redis.RedisConnector` needs.

Every problem is a one-line :class:`~kvpipe.errors.ConfigError` naming the URL and the bad part.
"""

from __future__ import annotations

import logging
import ssl
from urllib.parse import unquote

import attrs

from kvpipe.connectors.urlopts import bool_opt, check_options, number_opt, split_url
from kvpipe.errors import ConfigError

__all__ = ["Addr", "RedisUrl", "parse_redis_url"]

log = logging.getLogger(__name__)

_SCHEMES = {"redis": "single", "rediss": "single", "valkey": "single", "valkeys": "single", "unix": "single",
            "redis-sentinel": "sentinel", "redis-cluster": "cluster", "valkey-cluster": "cluster",
            "valkey-sentinel": "sentinel"}
_CERT_REQS = {"none": ssl.CERT_NONE, "cert_none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
              "cert_optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED, "cert_required": ssl.CERT_REQUIRED}
# The query options kvpipe reads (redis-py's names).
_OPTIONS = ("db", "username", "password", "max_connections", "master_name", "service_name", "sentinel_password",
            "read_from_replicas", "ssl", "ssl_cert_reqs", "ssl_ca_certs", "ssl_check_hostname", "ssl_certfile",
            "ssl_keyfile", "ssl_password")
# redis-py connection options with no meaning here, accepted (a URL written for redis-py keeps working) and named in
# a warning: every call is bounded by ``blocking_timeout_secs``, and a failed connection is retried by the tier.
_IGNORED = ("socket_timeout", "socket_connect_timeout", "socket_keepalive", "retry_on_timeout", "health_check_interval",
            "timeout", "client_name", "protocol", "decode_responses", "encoding", "encoding_errors")


@attrs.frozen
class Addr:
    host: str = ""
    port: int = 0
    path: str = ""  # unix socket

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


def _parse_hosts(hostlist: str, default_port: int, url: str) -> list[Addr]:
    out = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [v6]:port
            host, _, rest = item[1:].partition("]")
            port_s = rest.lstrip(":")
        else:
            host, _, port_s = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_s) if port_s else default_port
        except ValueError:
            raise ConfigError(f"remote_url={url!r}: bad port in {item!r}") from None
        if not host or not 0 < port < 65536:
            raise ConfigError(f"remote_url={url!r}: bad host:port {item!r}")
        out.append(Addr(host, port))
    if not out:
        raise ConfigError(f"remote_url={url!r}: expected at least one host:port")
    return out


def _ssl_context(q: dict[str, str], url: str) -> ssl.SSLContext:
    """The client TLS context for redis-py's ``ssl_*`` URL options."""
    reqs_s = q.get("ssl_cert_reqs", "required")
    reqs = _CERT_REQS.get(reqs_s.strip().lower())
    if reqs is None:
        raise ConfigError(f"remote_url={url!r}: ssl_cert_reqs must be required, optional or none, got {reqs_s!r}")
    cafile = q.get("ssl_ca_certs") or None
    try:
        ctx = ssl.create_default_context(cafile=cafile)
    except OSError as exc:  # a missing file, or not PEM certificates (ssl.SSLError is an OSError)
        raise ConfigError(f"remote_url={url!r}: cannot load ssl_ca_certs={cafile!r}: {exc}") from None
    ctx.check_hostname = reqs != ssl.CERT_NONE and bool_opt(q, "ssl_check_hostname", url, True)
    ctx.verify_mode = reqs
    certfile, keyfile = q.get("ssl_certfile") or None, q.get("ssl_keyfile") or None
    if keyfile and not certfile:
        raise ConfigError(f"remote_url={url!r}: ssl_keyfile needs ssl_certfile (the client certificate)")
    if certfile:  # a client certificate, for servers that ask for one (Redis/Valkey --tls-auth-clients yes)
        try:
            ctx.load_cert_chain(certfile, keyfile, password=q.get("ssl_password") or None)
        except OSError as exc:  # missing file, not PEM, key not matching the certificate, wrong password
            raise ConfigError(f"remote_url={url!r}: cannot load the client certificate ssl_certfile={certfile!r}"
                              f"{f' with ssl_keyfile={keyfile!r}' if keyfile else ''}: {exc}") from None
    return ctx


@attrs.frozen
class RedisUrl:
    """A parsed Redis-family URL (the connector's settings)."""

    mode: str  # "single" | "sentinel" | "cluster"
    addrs: list[Addr]
    username: str | None
    password: str | None = attrs.field(repr=False)
    db: int
    ssl_context: ssl.SSLContext | None
    master_name: str
    sentinel_password: str | None = attrs.field(repr=False)
    max_connections: int
    read_from_replicas: bool


def parse_redis_url(url: str, *, master_name: str | None = None, max_connections: int | None = None,
                    read_from_replicas: bool = False) -> RedisUrl:
    """Parse ``url`` (see :meth:`RedisConnector.from_url <kvpipe.connectors.redis.RedisConnector.from_url>` for
    the forms and options); ``read_from_replicas``: the config's default for the URL option of that name.

    :raises ConfigError: for a malformed URL, an unknown scheme, a bad option value or an unreadable
        ``ssl_ca_certs`` file.
    """
    scheme, sep, _ = url.partition("://")
    mode = _SCHEMES.get(scheme.lower())
    if not sep or mode is None:
        raise ConfigError(f"remote_url={url!r}: expected one of " + ", ".join(f"{s}://" for s in _SCHEMES))
    parts, q = split_url(url)
    check_options(q, url, (*_OPTIONS, *_IGNORED))
    ignored = sorted(set(q) & set(_IGNORED))
    if ignored:
        log.warning("remote_url %s://%s: %s ignored: kvpipe bounds every call by blocking_timeout_secs and reconnects "
                    "by itself", parts.scheme, parts.netloc.rpartition("@")[2], ", ".join(ignored))
    netloc = parts.netloc
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, _, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if pw else None
    username = q.get("username", username)
    password = q.get("password", password)
    path = parts.path.strip("/")
    db = 0
    name = q.get("master_name") or q.get("service_name") or master_name or "mymaster"
    if scheme == "unix":
        sock_path = parts.path
        if not sock_path:
            raise ConfigError(f"remote_url={url!r}: expected unix:///path/to/redis.sock")
        addrs = [Addr(path=sock_path)]
        path = ""
    elif mode == "sentinel":
        addrs = _parse_hosts(hostlist, 26379, url)
        if path:
            name = path
            path = ""
    else:
        addrs = _parse_hosts(hostlist, 6379, url)
        if mode == "single" and len(addrs) != 1:
            raise ConfigError(f"remote_url={url!r}: {scheme}:// takes one host; use redis-sentinel:// or "
                              "redis-cluster:// for several")
    db_s = q.get("db", path or "0")
    try:
        db = int(db_s)
    except ValueError:
        raise ConfigError(f"remote_url={url!r}: database must be an integer, got {db_s!r}") from None
    if mode == "cluster" and db:
        raise ConfigError(f"remote_url={url!r}: Redis Cluster has only database 0")
    maxc = max_connections or int(number_opt(q, "max_connections", url, 8))
    ctx = None
    if scheme in ("rediss", "valkeys") or bool_opt(q, "ssl", url, False):
        ctx = _ssl_context(q, url)
    else:
        tls_opts = sorted(k for k in q if k.startswith("ssl_"))
        if tls_opts:  # certificates given, yet the connection would be plaintext
            raise ConfigError(f"remote_url={url!r}: {tls_opts[0]} needs TLS: use rediss:// (or add ssl=true)")
    replicas = bool_opt(q, "read_from_replicas", url, read_from_replicas)  # the URL's option wins
    if replicas and mode == "single":
        raise ConfigError(f"remote_url={url!r}: read_from_replicas needs redis-sentinel:// or redis-cluster:// "
                          "(a single server has no replicas to read from)")
    return RedisUrl(mode=mode, addrs=addrs, username=username, password=password, db=db, ssl_context=ctx,
                    master_name=name, sentinel_password=q.get("sentinel_password"), max_connections=max(1, maxc),
                    read_from_replicas=replicas)
