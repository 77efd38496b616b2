"""The one boundary where tier failures stop: caught, logged (rate-limited), counted, turned into misses."""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs

from kvpipe.errors import TierError
from kvpipe.tiers.base import Tier

__all__ = ["TierGuard"]

log = logging.getLogger(__name__)

_LOG_EVERY_SECS = 10.0


@attrs.define(eq=False)
class TierGuard:
    """Calls a tier's methods; a ``TierError`` or ``OSError`` becomes ``default`` (a miss), never an exception
    into the engine. Programming errors propagate."""

    tier: Tier
    errors: int = 0
    _last_log: float = -1e9
    _suppressed: int = 0

    async def call(self, method: str, default: Any, *args: Any) -> Any:
        """``await tier.<method>(*args)``, or ``default`` when the tier fails."""
        try:
            return await getattr(self.tier, method)(*args)
        except (TierError, OSError) as exc:
            self.errors += 1
            now = time.monotonic()
            if now - self._last_log >= _LOG_EVERY_SECS:
                more = f" ({self._suppressed} similar errors not logged)" if self._suppressed else ""
                log.warning("%s tier: %s failed, treated as a miss: %s%s", self.tier.name, method, exc, more)
                self._last_log = now
                self._suppressed = 0
            else:
                self._suppressed += 1
            return default
