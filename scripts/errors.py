# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Errors a user can fix, and how a bundle command reports them.

MONAI re-raises every exception of a config expression or component as ``RuntimeError: Failed to evaluate
ConfigExpression ...`` over a long traceback, so a bundle's own message would never be the last line a user
sees. :class:`InputError` marks the messages meant for the user; :func:`install_excepthook` (the first step of
every ``initialize`` in ``configs/``) makes a command that dies of one end with that message alone.
"""

from __future__ import annotations

import numbers
import os
import sys
from collections.abc import Collection

__all__ = ["InputError", "user_message", "install_excepthook", "is_int", "check_int", "check_number", "check_choice"]

TRACEBACK_VARIABLE = "BUNDLE_TRACEBACK"  # set to 1 to see the full traceback under the message


class InputError(ValueError):
    """
    Bad input a user can fix: a file, a folder or a config value. The message is one sentence that names the
    file or id, says what is wrong and what to do.
    """


def is_int(value, low: int = 0) -> bool:
    """Whether ``value`` is an integer (a bool is not) of at least ``low``: the check of every count and size."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def is_number(value) -> bool:
    """Whether ``value`` is a real number (an int or a float; a bool is not): the type check of every number."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(value, name: str, low: int = 0) -> int:
    """``value`` if it is an integer >= ``low``; otherwise an :class:`InputError` naming ``name``."""
    if not is_int(value, low):
        raise InputError(f"{name} must be an integer >= {low}, got {value!r} ({type(value).__name__}).")
    return int(value)


def check_number(value, name: str, low: float = -float("inf"), high: float = float("inf")) -> float:
    """``value`` as a float if it is a real number in [``low``, ``high``]; otherwise an :class:`InputError`."""
    if not is_number(value) or not low <= value <= high:
        raise InputError(f"{name} must be a number in [{low}, {high}], got {value!r} ({type(value).__name__}).")
    return float(value)


def check_choice(value, name: str, choices: Collection) -> str:
    """``value`` if it is one of ``choices``; otherwise an :class:`InputError` listing them."""
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}.")
    return value


def user_message(error: BaseException) -> str | None:
    """
    The message of the first :class:`InputError` in ``error``'s chain of causes (MONAI's wrappers, Ignite's
    re-raise), as one line; None when there is none. A DataLoader worker's error reaches the main process as
    text only (PyTorch re-raises the worker's outermost exception type with its traceback as the message), so
    the last ``InputError: ...`` line of a message counts too.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).strip()
        if isinstance(error, InputError) and "Traceback" not in text:
            return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__
        quoted = [line.split("InputError: ", 1)[1].strip() for line in text.splitlines() if "InputError: " in line]
        if quoted:
            return quoted[-1]
        error = error.__cause__ or error.__context__
    return None


def install_excepthook() -> bool:
    """
    Make an uncaught exception caused by an :class:`InputError` print only ``error: <message>`` (with the full
    traceback above it when the environment variable ``BUNDLE_TRACEBACK`` is set); any other exception is
    reported as Python does. Returns True, so that a config can run it as an ``initialize`` step.
    """
    previous = sys.excepthook
    if getattr(previous, "_bundle_hook", False):
        return True

    def hook(kind, value, traceback):
        message = user_message(value)
        if message is None or os.environ.get(TRACEBACK_VARIABLE):
            previous(kind, value, traceback)
        if message is not None:
            print(f"error: {message}", file=sys.stderr, flush=True)

    hook._bundle_hook = True
    sys.excepthook = hook
    return True
