"""Kubernetes resource quantities ("500m", "16Gi", "1e3") parsed to exact numbers.

The API server canonicalises quantities, so comparisons must be by value, not by text."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# The grammar of resource.Quantity, without the sign (requests and limits are never negative).
QUANTITY_PATTERN = (
    r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)

_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(1024),
    "Mi": Decimal(1024**2),
    "Gi": Decimal(1024**3),
    "Ti": Decimal(1024**4),
    "Pi": Decimal(1024**5),
    "Ei": Decimal(1024**6),
}


def parse_quantity(text: str | int | float) -> Decimal:
    """Return the value of a quantity: "500m" -> 0.5, "1Gi" -> 1073741824, "2e3" -> 2000.

    Raises ValueError for anything that is not a non-negative quantity.
    """
    if isinstance(text, bool):
        raise ValueError(f"not a quantity: {text!r}")
    if isinstance(text, int | float):
        return Decimal(str(text))
    match = _QUANTITY_RE.match(text.strip())
    if match is None:
        raise ValueError(f"not a quantity: {text!r}")
    number, _, suffix = match.group(1), match.group(2), match.group(3) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number) * (Decimal(10) ** int(suffix[1:]))
        return Decimal(number) * _SUFFIXES[suffix]
    except (InvalidOperation, KeyError) as err:
        raise ValueError(f"not a quantity: {text!r}") from err


def is_quantity(text: object) -> bool:
    """True when `text` is a quantity string or number."""
    if not isinstance(text, str | int | float) or isinstance(text, bool):
        return False
    try:
        parse_quantity(text)
    except ValueError:
        return False
    return True


def format_cpu(cores: float) -> str:
    """Cores as the API server writes them: whole cores plainly, the rest in millicores."""
    millis = max(1, round(cores * 1000))
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def format_bytes(n: float) -> str:
    """Bytes rounded up to whole MiB, or GiB when exact: memory is never rounded down."""
    mib = -(-int(n) // (1024**2))
    return f"{mib // 1024}Gi" if mib % 1024 == 0 and mib > 0 else f"{mib}Mi"
