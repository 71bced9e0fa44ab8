"""Bar charts as inline SVG, drawn on the server: no JavaScript, nothing loaded from elsewhere, fine under a
strict Content-Security-Policy, in print and in screenshots.

Colours and text come from classes styled by ``popserver/admin/overview.css`` with the admin's own colour
variables (so the admin's dark mode applies); presentation attributes are only the fallback. Every column
has a ``<title>`` (the hover text: the hour and each series' value), the axes are labelled with units.
"""

from __future__ import annotations

import math
from html import escape  # the stdlib's: plain str in, plain str out (the page has thousands)
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone
from django.utils.formats import date_format, time_format
from django.utils.safestring import SafeString, mark_safe

from popserver.mailin.quota import format_octets

# The drawing's own coordinates; the SVG scales to the width of its box.
WIDTH, HEIGHT = 720, 190
LEFT, RIGHT, TOP, BOTTOM = 56, 8, 10, 30
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

# Fallback fills (when the stylesheet is missing); the stylesheet sets both light and dark colours.
FALLBACK = {
    "ok": "#2e8540",
    "bad": "#c9302c",
    "lock": "#d98200",
    "busy": "#7b5ea7",
    "other": "#808080",
    "main": "#2f6fae",
}
BINARY = ("octets", "KiB", "MiB", "GiB", "TiB")


@dataclass(frozen=True)
class Series:
    label: str
    values: Sequence[int]
    colour: str = "main"  # a key of FALLBACK: the class "c-<colour>"

    @property
    def total(self) -> int:
        return sum(self.values)


@dataclass(frozen=True)
class Axis:
    """How values read: ``per_hour`` names the unit on the y axis, ``format`` writes one value."""

    per_hour: str
    format: Callable[[int], str] = str
    binary: bool = False  # octets: ticks in KiB, MiB, ...


COUNT = Axis("per hour")
OCTETS = Axis("per hour", format_octets, binary=True)


def nice_step(span: float, ticks: int = 4) -> float:
    """A round step (1, 2 or 5 times a power of ten) that divides ``span`` into about ``ticks`` parts."""
    raw = max(span / ticks, 1e-9)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def y_scale(maximum: int, axis: Axis) -> tuple[float, list[tuple[float, str]], str]:
    """(top of the scale, [(tick value, label)], unit label) for values up to ``maximum``."""
    unit, factor = "", 1
    if axis.binary:
        power = 0
        while maximum / 1024 ** (power + 1) >= 1 and power < len(BINARY) - 1:
            power += 1
        unit, factor = BINARY[power], 1024**power
    scaled = maximum / factor
    step = max(nice_step(scaled), 1 if not axis.binary or factor == 1 else 0)
    top = max(step * math.ceil(scaled / step), step)
    ticks = []
    value = 0.0
    while value <= top + step / 2:
        text = f"{value:.10g}"
        ticks.append((value * factor, text))
        value += step
    return top * factor, ticks, f"{unit} {axis.per_hour}".strip()


@dataclass(frozen=True)
class Hours:
    """The columns of a chart: the UTC hours, with their hover labels and axis labels in local time, worked
    out once for every chart of a page (Django's date formatting is not free)."""

    starts: Sequence[datetime]
    titles: Sequence[str]
    ticks: Sequence[tuple[int, str]]  # (column, text): where the x axis is labelled

    @classmethod
    def of(cls, starts: Sequence[datetime]) -> Hours:
        days: dict = {}
        times: dict = {}

        def day(local: datetime) -> str:
            if local.date() not in days:
                days[local.date()] = date_format(local, "DATE_FORMAT")
            return days[local.date()]

        def clock(local: datetime) -> str:
            key = (local.hour, local.minute)
            if key not in times:
                times[key] = time_format(local, "TIME_FORMAT")
            return times[key]

        titles, ticks = [], []
        for index, start in enumerate(starts):
            local = timezone.localtime(start)
            end = timezone.localtime(start + timedelta(hours=1))
            titles.append(f"{day(local)}, {clock(local)}–{clock(end)}")
            if len(starts) <= 48:  # a day: every third hour
                if local.hour % 3 == 0:
                    ticks.append((index, clock(local)))
            elif local.hour == 0:  # longer: each local midnight
                ticks.append((index, date_format(local, "D j")))
        return cls(starts, titles, ticks)


def bar_chart(
    chart_id: str, title: str, hours: Hours, series: Sequence[Series], axis: Axis = COUNT
) -> SafeString:
    """A bar chart of values per hour, the ``series`` stacked in each column. Built as text (a page has
    hundreds of columns): numbers go in as they are, every text through ``escape``."""
    count = len(hours.starts)
    totals = [sum(s.values[i] for s in series) for i in range(count)]
    top, ticks, unit_label = y_scale(max(totals, default=0), axis)
    column = PLOT_W / max(count, 1)
    bar = max(column * 0.8, 1)
    base_y = TOP + PLOT_H
    parts: list[str] = []

    # The grid and the y axis: a line and a label per tick, and the unit.
    for value, text in ticks:
        y = _n(base_y - value / top * PLOT_H)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y}" y2="{y}" stroke="#ccc"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{_n(float(y) + 4)}" text-anchor="end">{escape(text)}</text>'
        )
    middle = _n(TOP + PLOT_H / 2)
    parts.append(
        f'<text class="unit" x="12" y="{middle}" text-anchor="middle" transform="rotate(-90 12 {middle})">'
        f"{escape(unit_label)}</text>"
    )
    # The x axis: the baseline and labels in local time.
    parts.append(
        f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{base_y}" y2="{base_y}" stroke="#888"/>'
    )
    for index, text in hours.ticks:
        x = LEFT + index * column
        parts.append(
            f'<line class="axis" x1="{_n(x)}" x2="{_n(x)}" y1="{base_y}" y2="{base_y + 5}" stroke="#888"/>'
            f'<text class="tick" x="{_n(x + 1)}" y="{HEIGHT - 10}" text-anchor="start">{escape(text)}</text>'
        )
    # One group per hour: its stacked bars, and a transparent full-height box that carries the hover text.
    labels = [(escape(s.label), s.colour, FALLBACK[s.colour]) for s in series]
    for index in range(count):
        left = LEFT + index * column
        x = _n(left + (column - bar) / 2)
        lines = [hours.titles[index]]
        bars = []
        stacked = 0
        for s, (label, colour, fill) in zip(series, labels, strict=True):
            value = s.values[index]
            lines.append(f"{label}: {escape(axis.format(value))}")
            if not value:
                continue
            y0 = base_y - stacked / top * PLOT_H
            stacked += value
            y1 = base_y - stacked / top * PLOT_H
            bars.append(
                f'<rect class="bar c-{colour}" x="{x}" y="{_n(y1)}" width="{_n(bar)}" '
                f'height="{_n(max(y0 - y1, 0.5))}" fill="{fill}" data-value="{int(value)}"/>'
            )
        parts.append(
            f'<g class="hour"><title>{escape(lines[0])}\n' + "\n".join(lines[1:]) + "</title>"
            f'<rect class="hit" x="{_n(left)}" y="{TOP}" width="{_n(column)}" height="{PLOT_H}" '
            f'fill="transparent"/>{"".join(bars)}</g>'
        )
    if not any(totals):
        parts.append(
            f'<text class="empty" x="{_n(LEFT + PLOT_W / 2)}" y="{middle}" text-anchor="middle">'
            "nothing in this period</text>"
        )
    summary = "; ".join(f"{s.label}: {axis.format(s.total)} in all" for s in series)
    chart_id = escape(chart_id)
    svg = (
        f'<svg class="chart" id="{chart_id}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{chart_id}-title {chart_id}-desc" preserveAspectRatio="xMidYMid meet">'
        f'<title id="{chart_id}-title">{escape(title)}</title><desc id="{chart_id}-desc">{escape(summary)}</desc>'
        + "".join(parts)
        + "</svg>"
    )
    legend = "".join(
        f'<li><svg class="swatch" viewBox="0 0 10 10" aria-hidden="true"><rect class="c-{colour}" width="10" '
        f'height="10" fill="{fill}"/></svg> {label} <span class="total">{escape(axis.format(s.total))}</span></li>'
        for s, (label, colour, fill) in zip(series, labels, strict=True)
    )
    return mark_safe(f'{svg}<ul class="legend">{legend}</ul>')  # noqa: S308  (every text escaped above)


def _n(value: float) -> str:
    """A coordinate, short: "12.5", "40"."""
    return f"{value:.1f}".removesuffix(".0")
