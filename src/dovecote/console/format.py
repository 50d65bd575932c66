"""How the console shows numbers, sizes, durations and times (Jinja filters)."""

from __future__ import annotations

import datetime as dt
import math
import time


def fmt_count(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{round(value):,}"


def fmt_bytes(value: float | int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.1f}k/s"
    if value >= 10:
        return f"{value:.0f}/s"
    return f"{value:.1f}/s" if value >= 0.1 or value == 0 else f"{value:.2f}/s"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    s = abs(float(seconds))
    if s < 0.001:
        return "< 1 ms" if s else "0 s"
    if s < 1:
        return f"{s * 1000:.0f} ms" if s >= 0.01 else f"{s * 1000:.1f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        big, small, units = int(s // 60), int(s % 60), ("min", "s")
    elif s < 86_400:
        big, small, units = int(s // 3600), int(s % 3600 // 60), ("h", "min")
    else:
        big, small, units = int(s // 86_400), int(s % 86_400 // 3600), ("d", "h")
    return f"{big} {units[0]} {small} {units[1]}" if small else f"{big} {units[0]}"


def fmt_percent(value: float | int, limit: float | int) -> str:
    if not limit:
        return "-"
    share = 100.0 * float(value) / float(limit)
    return "< 0.1 %" if 0 < share < 0.1 else f"{share:.1f} %"


def fmt_took(seconds: float | None) -> str:
    """A check's timing (/health rounds to 0.1 ms)."""
    if seconds is not None and 0 <= seconds < 0.0001:
        return "< 0.1 ms"
    return fmt_duration(seconds)


def fmt_ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "never"
    delta = (now or time.time()) - float(ts)
    if abs(delta) < 1:
        return "just now"
    return f"{fmt_duration(delta)} ago" if delta > 0 else f"in {fmt_duration(delta)}"


def fmt_utc(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(float(ts), dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_iso(ts: float | None) -> str:
    if not ts:
        return ""
    return dt.datetime.fromtimestamp(float(ts), dt.UTC).isoformat(timespec="seconds")


def spark_points(values: list[float], width: int = 120, height: int = 28) -> str:
    """SVG polyline points for a sparkline (inline SVG: no script, no external image)."""
    if len(values) < 2:
        return ""
    top = max(values) or 1.0
    step = width / (len(values) - 1)
    return " ".join(
        f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values)
    )
