"""Cron schedules in pipeline specs, as pachd reads them.

A cron input's `spec` is parsed as robfig/cron's standard parser does: five fields (minute, hour,
day of month, month, day of week) with `*`, `?`, lists, ranges, steps and JAN-DEC / SUN-SAT
names; the descriptors @yearly (@annually), @monthly, @weekly, @daily (@midnight), @hourly; and
`@every <duration>`. Times are UTC unless the spec starts with `TZ=<zone>` or `CRON_TZ=<zone>`.
As in cron, when both day fields are restricted a day matching either one is due.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pipelines.core.durations import parse_duration

DESCRIPTORS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MONTHS = {m: i for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split(), 1)}
DAYS = {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}
# (name, lowest, highest, names) of the five fields, in order.
FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 6, DAYS),
)


@dataclass(frozen=True)
class Schedule:
    every: float | None = None  # seconds, for '@every'
    fields: tuple[frozenset[int], ...] = ()  # minutes, hours, days, months, weekdays
    any_day: bool = True  # a day field is '*': both must match (else either)
    zone: tzinfo = timezone.utc

    def next(self, after: datetime) -> datetime:
        """The first time strictly after `after` (an aware datetime) that the schedule is due."""
        if self.every is not None:
            # As robfig/cron: whole seconds, counted from `after` without its fraction.
            return after.replace(microsecond=0) + timedelta(seconds=self.every)
        minutes, hours, days, months, weekdays = self.fields
        t = after.astimezone(self.zone).replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t.year + 5  # a schedule such as '0 0 30 2 *' is never due
        while t.year <= limit:
            if t.month not in months:
                t = t.replace(year=t.year + t.month // 12, month=t.month % 12 + 1, day=1)
                t = t.replace(hour=0, minute=0)
            elif not self._day(t, days, weekdays):
                t = (t + timedelta(days=1)).replace(hour=0, minute=0)
            elif t.hour not in hours:
                t = (t + timedelta(hours=1)).replace(minute=0)
            elif t.minute not in minutes:
                t += timedelta(minutes=1)
            else:
                return t.astimezone(timezone.utc)
        raise ValueError("the schedule is never due")

    def _day(self, t: datetime, days: frozenset[int], weekdays: frozenset[int]) -> bool:
        in_month, in_week = t.day in days, (t.weekday() + 1) % 7 in weekdays
        return (in_month and in_week) if self.any_day else (in_month or in_week)


def parse_cron(spec: str) -> Schedule:
    """A cron input's schedule; ValueError says what is wrong with it."""
    text = spec.strip()
    zone: tzinfo = timezone.utc
    if text.startswith(("TZ=", "CRON_TZ=")):
        name, _, text = text.partition("=")[2].partition(" ")
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {name!r}") from exc
        text = text.strip()
    if text.startswith("@every"):
        seconds = parse_duration(text.removeprefix("@every").strip())
        return Schedule(every=max(1.0, float(round(seconds))))
    text = DESCRIPTORS.get(text, text)
    if text.startswith("@"):
        raise ValueError(f"unknown descriptor {text!r} (use @every 10s, @hourly, @daily, ...)")
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(f"cron spec {spec!r} has {len(parts)} fields, expected 5 or @every <d>")
    fields, stars = [], []
    for part, (name, low, high, names) in zip(parts, FIELDS, strict=True):
        values, star = _field(part, name, low, high, names)
        fields.append(values)
        stars.append(star)
    return Schedule(fields=tuple(fields), any_day=stars[2] or stars[4], zone=zone)


def _field(text: str, name: str, low: int, high: int, names: dict[str, int]):
    """(values, whether it is an unstepped '*') of one field such as '1-5', '*/15' or 'MON,FRI'."""

    def number(word: str) -> int:
        value = names.get(word.upper())
        if value is None and not word.isdigit():
            raise ValueError(f"{name} {word!r} is not a number")
        return int(word) if value is None else value

    values: set[int] = set()
    star = False
    for item in text.split(","):
        span, _, step_text = item.partition("/")
        step = number(step_text) if step_text else 1
        if span in ("*", "?"):
            first, last = low, high
            star = star or step == 1
        elif "-" in span:
            first, last = (number(w) for w in span.split("-", 1))
        else:
            first = number(span)
            last = high if step_text else first
        if not low <= first <= last <= high or step < 1:
            raise ValueError(f"{name} {item!r} is outside {low}-{high}")
        values.update(range(first, last + 1, step))
    return frozenset(values), star
