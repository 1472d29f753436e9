"""Argument checks with one message style, for configs and public functions.

Every failure is a ``ValueError`` that names the argument, shows the value and says what is allowed::

    {name}={value!r}: must be {what}[; allowed: {choices}]

e.g. ``ModelConfig.num_heads=0: must be a positive int`` or
``KVCompressionConfig.policy='lru': must be one of the allowed values; allowed: 'none', 'streaming'``.
Callers pass ``name`` qualified by its owner (``"ModelConfig.num_heads"``) where there is one.

Ints are Python or NumPy integers, never ``bool``; numbers are ints or floats (``numbers.Real``), never
``bool``; NaN is never a valid number. The int checks return the value as a Python ``int`` (None stays None),
the others return it unchanged.

Floor 0: this module imports nothing from ``selmerge_jax`` (and nothing outside the standard library), so
every layer of the package may use it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

__all__ = [
    "UserError",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_int_sequence",
    "check_non_negative_int",
    "check_number",
    "check_number_sequence",
    "check_positive_int",
    "check_positive_number",
    "check_probability",
    "check_shape",
    "check_value_shape",
    "fail",
    "is_int",
    "is_number",
]


class UserError(ValueError):
    """A mistake of the user's, not of the code: a bad path or value, missing data, a run the user must decide
    about (an occupied output directory, a changed config on resume, a corrupted checkpoint, a diverged loss).

    The command line (``selmerge_jax.main.cli``) prints it as one line and exits non-zero; every other
    exception is a bug and keeps its traceback. A ``ValueError``, so callers that catch bad values still
    catch it.
    """


def fail(name: str, value: Any, must: str, allowed: str | None = None) -> NoReturn:
    """Raises the module's ``ValueError``: ``{name}={value!r}: must be {must}[; allowed: {allowed}]``."""
    message = f"{name}={value!r}: must be {must}"
    if allowed is not None:
        message += f"; allowed: {allowed}"
    raise ValueError(message)


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A Python or NumPy int or float (NaN included), not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _num(x: float) -> str:
    return str(int(x)) if is_int(x) else f"{x:g}"


def _interval(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """``>= 1``, ``< 0.5``, ``in [0, 1)``; empty without bounds."""
    if low is None and high is None:
        return ""
    if high is None:
        assert low is not None
        return f"{'>' if low_open else '>='} {_num(low)}"
    if low is None:
        return f"{'<' if high_open else '<='} {_num(high)}"
    return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"


def _inside(value, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and not (value > low if low_open else value >= low):
        return False
    return high is None or (value < high if high_open else value <= high)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, *,
              allow_none: bool = False) -> Any:
    """An int in ``[low, high]`` (either bound optional); with ``allow_none`` also None (returned as is)."""
    if value is None and allow_none:
        return None
    if not is_int(value) or not _inside(value, low, high, False, False):
        fail(name, value, f"an int {_interval(low, high)}".rstrip() + (" or None" if allow_none else ""))
    return int(value)


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """An int > 0 (or None with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value <= 0:
        fail(name, value, "a positive int" + (" or None" if allow_none else ""))
    return int(value)


def check_non_negative_int(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """An int >= 0 (or None with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < 0:
        fail(name, value, "a non-negative int" + (" or None" if allow_none else ""))
    return int(value)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> Any:
    """An int or float, not NaN, in the interval from ``low`` to ``high`` (each optional, closed unless
    ``low_open``/``high_open``; an infinite value passes where the bounds allow it); with ``allow_none`` also
    None."""
    if value is None and allow_none:
        return None
    if not is_number(value) or math.isnan(value) or not _inside(value, low, high, low_open, high_open):
        what = f"a number {_interval(low, high, low_open, high_open)}".rstrip()
        fail(name, value, what + (" or None" if allow_none else ""))
    return value


def check_positive_number(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """An int or float > 0 (infinity included, NaN not)."""
    if value is None and allow_none:
        return None
    if not is_number(value) or not value > 0:
        fail(name, value, "a positive number" + (" or None" if allow_none else ""))
    return value


def check_probability(name: str, value: Any) -> Any:
    """A number in ``[0, 1]``."""
    return check_number(name, value, 0.0, 1.0)


def check_fraction(name: str, value: Any) -> Any:
    """A number in ``[0, 1)``: a share of something that must leave a remainder (e.g. a validation split)."""
    return check_number(name, value, 0.0, 1.0, high_open=True)


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """One of ``allowed`` (compared with ``==``; unhashable values are simply not allowed)."""
    allowed = tuple(allowed)
    try:
        ok = value in allowed
    except TypeError:  # e.g. a list against a tuple of strings that defines no __eq__ for it
        ok = False
    if not ok:
        fail(name, value, "one of the allowed values", ", ".join(repr(a) for a in allowed))
    return value


def check_int_sequence(name: str, values: Any, low: int | None = None, high: int | None = None, *,
                       non_empty: bool = True) -> Any:
    """A list or tuple of ints in ``[low, high]``; non-empty unless ``non_empty=False``."""
    ok = isinstance(values, (list, tuple)) and (len(values) > 0 or not non_empty)
    ok = ok and all(is_int(v) and _inside(v, low, high, False, False) for v in values)
    if not ok:
        what = "a non-empty list of ints" if non_empty else "a list of ints"
        fail(name, values, f"{what} {_interval(low, high)}".rstrip())
    return values


def check_number_sequence(name: str, values: Any, low: float | None = None, high: float | None = None, *,
                          non_empty: bool = True) -> Any:
    """A list or tuple of numbers (not NaN) in ``[low, high]``; non-empty unless ``non_empty=False``."""
    ok = isinstance(values, (list, tuple)) and (len(values) > 0 or not non_empty)
    ok = ok and all(is_number(v) and not math.isnan(v) and _inside(v, low, high, False, False)
                    for v in values)
    if not ok:
        what = "a non-empty list of numbers" if non_empty else "a list of numbers"
        fail(name, values, f"{what} {_interval(low, high)}".rstrip())
    return values


def check_shape(name: str, array: Any, expected: Sequence[int | None]) -> tuple[int, ...]:
    """``array.shape`` (an array, or anything with a ``shape``) equals ``expected``, where ``None`` matches
    any size; returns the shape. The shape is the value shown: ``x.shape=(2, 3): must be (2, *, 4)``."""
    shape = getattr(array, "shape", None)
    if shape is None or len(shape) != len(expected) or any(e is not None and s != e
                                                            for s, e in zip(shape, expected, strict=True)):
        sizes = ["*" if e is None else str(e) for e in expected]
        want = "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"
        fail(f"{name}.shape", None if shape is None else tuple(shape), want)
    return tuple(shape)


def check_value_shape(k: Any, v: Any, value_dim: bool) -> None:
    """v must be ``[B, S, K, H]`` like k, or with ``value_dim`` ``[B, S, K, Hv]`` for any ``Hv`` (MLA-style
    attention, whose values are narrower or wider than its queries and keys)."""
    if value_dim and v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v [B, S, K, Hv] must agree with k [B, S, K, H] on B, S and K, got k {k.shape} and "
                         f"v {v.shape}")
    if not value_dim and k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
