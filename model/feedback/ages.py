"""Ages and windows of feedback as people write them: ``ctt feedback prune --older-than 90d``,
``--since 7d``, ``GET /feedback/stats?since=12h``. One parser for the command line and the service."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from model.errors import CTTError
from model.feedback.database import utc_now

# What GET /feedback/stats?since= takes: an age back from now (ISO times are for the CLI). Five
# digits of weeks still land after year 1, so every value the pattern allows is a valid time.
SINCE_PATTERN = r"^[0-9]{1,5}[mhdw]$"
AGE_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
AGE_UNIT_NAMES = {"m": "minute", "h": "hour", "d": "day", "w": "week"}


def parse_age(text: str, option: str = "--older-than") -> timedelta:
    """``90d``, ``12h``, ``30m`` (minutes), ``2w``; a bare number is days. An age that reaches back
    before the year 1 is an error, never an overflow."""
    match = re.fullmatch(r"\s*(\d{1,12}(?:\.\d{1,6})?)\s*([mhdw]?)\s*", text or "") if isinstance(text, str) else None
    if not match:
        raise CTTError(f"{option} {_shown(text)}: give an age such as 90d, 12h, 30m (minutes) or 2w")
    try:
        age = float(match.group(1)) * AGE_UNITS[match.group(2) or "d"]
        utc_now() - age  # representable as a time, or the age is out of range
    except OverflowError:
        raise CTTError(f"{option} {_shown(text)}: too long an age (it reaches back before the year 1)") from None
    return age


def describe_age(age: timedelta) -> str:
    """An age in words, in the largest unit it is a whole number of (``3 minutes``, ``90 days``)."""
    for unit in "wdhm":
        count = age / AGE_UNITS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)} {AGE_UNIT_NAMES[unit]}{'s' if count != 1 else ''}"
    return f"{age.total_seconds():g} seconds"


def _shown(text) -> str:
    from model.tags import shown

    return shown(text)


def parse_since(text: str, option: str = "--since") -> datetime:
    """An ISO date or time (UTC), or an age back from now (``7d``)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        age = parse_age(text, option)
        try:
            return utc_now() - age
        except OverflowError:
            raise CTTError(f"{option} {text!r}: too long an age") from None
    # Rows are stored in UTC without a zone; a time given with a zone is converted to it.
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


__all__ = ["AGE_UNITS", "SINCE_PATTERN", "describe_age", "parse_age", "parse_since"]
