"""Time as the API writes it: ISO-8601 UTC with a ``Z`` suffix, the converter's datetime format."""

from __future__ import annotations

import datetime as dt


def iso(ts: float) -> str:
    """An epoch time as the converter writes datetimes (``2025-04-10T08:30:00.250000Z``)."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")
