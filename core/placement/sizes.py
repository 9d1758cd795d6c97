"""Byte sizes as people write them ("24GiB", "512GB", "1.5 TiB", "0") and back: the one parser every
memory option uses."""
from __future__ import annotations

import re

from ..errors import SettingError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    # bare K/M/G/T: binary, as `free -g`, llama.cpp and most GPU tools use them
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from "24GiB", "512GB", "1.5TiB", "64G" (binary), "1000000" (bytes) or "0".

    GB/MB/... are decimal, GiB/MiB/... and bare G/M/... binary; case is ignored. A SettingError names
    `what` (e.g. "--gpu-mem") and says what is accepted.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise SettingError(f"{what} must not be negative, got {text}")
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise SettingError(f"{what}: cannot read {text!r} as a size; write e.g. 24GiB, 512GB, 64G or 0")
    return int(round(float(m.group(1)) * _UNITS[unit]))


def format_size(nbytes: int | float) -> str:
    """A short human size in binary units: "23.4 GiB", "512 MiB", "0 B"."""
    n = float(nbytes)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            v = n / scale
            return f"{sign}{v:.1f} {unit}" if v < 100 else f"{sign}{v:.0f} {unit}"
    return f"{sign}{n:.0f} B"
