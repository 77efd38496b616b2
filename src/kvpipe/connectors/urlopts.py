"""Query options of ``remote_url`` values, shared by the connectors' ``from_url`` parsers.

Every bad value is one :class:`~kvpipe.errors.ConfigError` line naming the URL and the option, and so is an option
the connector does not know (a misspelt ``max_conections`` would otherwise be ignored without a word). A query
option given twice takes its last value, as redis-py does.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import SplitResult, parse_qs, urlsplit

from kvpipe.config import parse_bool
from kvpipe.errors import ConfigError

__all__ = ["bool_opt", "check_options", "host_port", "number_opt", "split_url"]

def split_url(url: str, scheme: str | None = None) -> tuple[SplitResult, dict[str, str]]:
    """``url``'s parts and its query options (last value wins).

    :raises ConfigError: when ``scheme`` is given and the URL has another one.
    """
    parts = urlsplit(url)
    if scheme is not None and parts.scheme != scheme:
        raise ConfigError(f"remote_url={url!r}: expected a URL starting with {scheme}://")
    return parts, {k: v[-1] for k, v in parse_qs(parts.query).items()}


def host_port(parts: SplitResult, url: str, expected: str) -> tuple[str, int]:
    """The one ``host:port`` of a split URL.

    :raises ConfigError: for a bad port, or a missing host or port (the message shows ``expected``).
    """
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError(f"remote_url={url!r}: bad port") from None
    if not host or port is None:
        raise ConfigError(f"remote_url={url!r}: expected {expected}")
    return host, port


def bool_opt(q: dict[str, str], name: str, url: str, default: bool) -> bool:
    """Option ``name`` as a bool (true/false, 1/0, yes/no, on/off). :raises ConfigError: for another value."""
    v = q.get(name)
    if v is None:
        return default
    try:
        return parse_bool(name, v)  # the values every bool config key takes
    except ConfigError:
        raise ConfigError(f"remote_url={url!r}: {name} must be true or false, got {v!r}") from None


def number_opt(q: dict[str, str], name: str, url: str, default: int | float, *, minimum: float | None = None
               ) -> int | float:
    """Option ``name`` as a number of ``default``'s type (int or float), at least ``minimum`` when given.

    :raises ConfigError: when it does not parse or is below ``minimum``.
    """
    v = q.get(name)
    if v is None:
        return default
    kind = "an integer" if isinstance(default, int) else "a number"
    try:
        n = int(v) if isinstance(default, int) else float(v)
    except ValueError:
        raise ConfigError(f"remote_url={url!r}: {name} must be {kind}, got {v!r}") from None
    if minimum is not None and n < minimum:
        raise ConfigError(f"remote_url={url!r}: {name} must be >= {minimum:g}, got {v!r}")
    return n


def check_options(q: dict[str, str], url: str, known: Collection[str]) -> None:
    """:raises ConfigError: for the first query option (sorted) not in ``known``, listing the known ones."""
    unknown = sorted(set(q) - set(known))
    if unknown:
        raise ConfigError(f"remote_url={url!r}: unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
