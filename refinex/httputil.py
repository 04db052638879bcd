"""Small HTTP helpers shared by the clients of OpenAI-compatible servers (pure)."""
from __future__ import annotations

import email.utils
from datetime import datetime, timezone
from typing import Optional


def retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    None when the header is absent or unreadable; never negative.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
