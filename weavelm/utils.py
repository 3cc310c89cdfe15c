"""Small helpers shared by the kernel and plugins."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative ints (also numpy arrays): the one formula for "blocks needed"."""
    return -(-a // b)
