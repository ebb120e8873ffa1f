"""Parse and format link rates ("1gbit") and delays ("0.2ms") for the emulated cluster.

Rates are in bits per second with decimal prefixes, as NICs are sold (1gbit = 10^9 bit/s).
``tc`` itself reads "bps" as *bytes* per second, so "1gbps" is refused instead of guessed.
"""

from __future__ import annotations

import math
import re

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z/]*)\s*$", re.IGNORECASE)

#: Slowest and fastest rates accepted: below 8 kbit a 1500-byte frame takes over a second,
#: above 400 gbit the shaping is no longer what limits a veth pair on one machine.
MIN_RATE = 8_000
MAX_RATE = 400 * 10**9

_RATE_HELP = ("a number with a unit among bit, kbit, mbit, gbit, tbit (e.g. '1gbit', '100mbit', "
              "'2.5gbit'), or 'none' for an unshaped link")


def parse_rate(value: str | int | float | None) -> int | None:
    """Return ``value`` as bits per second, or None for an unshaped link.

    Accepts "1gbit", "100Mbit", "2.5gbit", "1gbit/s"; "none" (any case), "" and None give
    None; an int or float is taken as bits per second already. Anything else raises a
    one-line ``ValueError`` that names the value and what is allowed.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"bad rate {value!r}: expected {_RATE_HELP}")
    if isinstance(value, (int, float)):
        bits = float(value)
    else:
        text = value.strip().lower()
        if text in ("", "none"):
            return None
        m = _NUMBER.match(text)
        if m is None:
            raise ValueError(f"bad rate {value!r}: expected {_RATE_HELP}")
        number, unit = float(m.group(1)), m.group(2).removesuffix("/s")
        if unit.endswith("bits"):
            unit = unit[:-1]  # "100mbits" -> "100mbit"
        if unit.endswith("bps") or unit in ("b", "kb", "mb", "gb", "tb"):
            raise ValueError(f"ambiguous rate {value!r}: bits or bytes? (tc reads 'bps' as "
                             f"bytes/s); write bits, e.g. '1gbit'; expected {_RATE_HELP}")
        if unit not in _RATE_UNITS:
            raise ValueError(f"bad rate {value!r}: unknown unit {unit or '(none)'!r}; "
                             f"expected {_RATE_HELP}")
        bits = number * _RATE_UNITS[unit]
    if not math.isfinite(bits) or not MIN_RATE <= bits <= MAX_RATE:
        raise ValueError(f"bad rate {value!r}: must lie between {format_rate(MIN_RATE)} and "
                         f"{format_rate(MAX_RATE)}; expected {_RATE_HELP}")
    return int(round(bits))


def format_rate(bits_per_s: int | float | None) -> str:
    """Format bits per second the way :func:`parse_rate` reads them: 10**9 -> "1gbit"."""
    if bits_per_s is None:
        return "none"
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        scale = _RATE_UNITS[unit]
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:.4g}{unit}"
    return f"{bits_per_s:.4g}bit"


def parse_duration(value: str | float | None) -> float | None:
    """Return a delay such as "0.2ms", "200us" or "1s" in seconds; "none"/None/"0" give None.

    A bare number is read as milliseconds, as ``tc`` does. Raises a one-line ``ValueError``.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("", "none"):
            return None
        m = _NUMBER.match(text)
        unit = m.group(2) if m else ""
        if m is None or (unit and unit not in _TIME_UNITS):
            raise ValueError(f"bad latency {value!r}: expected a number with a unit among "
                             f"s, ms, us (e.g. '0.2ms'), or 'none'")
        seconds = float(m.group(1)) * _TIME_UNITS[unit or "ms"]
    if not math.isfinite(seconds) or not 0 <= seconds <= 10:
        raise ValueError(f"bad latency {value!r}: must lie between 0 and 10 s")
    return seconds or None
