# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Type and range checks of the top-level config ids that no constructor of the bundle sees (those of MONAI's and
PyTorch's own objects, and rules across ids), run first in ``initialize``: a command-line override of the wrong
type (``--epochs ten``, ``--resume true`` instead of ``True``) stops the run before any data is cached, with a
message naming the id, instead of failing deep inside Ignite or PyTorch. The bundle's own classes check their
arguments themselves (:mod:`scripts.errors`' ``check_*``).
"""

from __future__ import annotations

from scripts.errors import InputError, is_int, is_number

__all__ = ["check_settings"]


def _int(low: int):
    return (lambda v: is_int(v, low), f"an integer >= {low}")


def _float(low: float, high: float, high_open: bool = False):
    def ok(v):
        if not is_number(v):
            return False
        return low <= v < high if high_open else low <= v <= high

    return ok, f"a number in [{low}, {high}{')' if high_open else ']'}"


def _multiple_of_16(v) -> bool:
    return is_int(v, 16) and v % 16 == 0


_RULES = {
    "epochs": _int(1),
    "batch_size": _int(1),
    "num_workers": _int(0),
    "val_interval": _int(1),
    "seed": _int(0),
    "image_size": (
        lambda v: _multiple_of_16(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_multiple_of_16, v))),
        'a multiple of 16 (the U-Net pools four times), or a pair "[H,W]" of them',
    ),
    "learning_rate": (lambda v: _float(0.0, float("inf"))[0](v) and v > 0, "a positive number"),
    "dropout": _float(0.0, 1.0, high_open=True),
    "cache_rate": _float(0.0, 1.0),
    "resume": (lambda v: isinstance(v, bool), "True or False (capitalised: --resume True)"),
    "adaptive": (lambda v: isinstance(v, bool), "True or False (capitalised)"),
    "deterministic": (lambda v: isinstance(v, bool), "True or False (capitalised)"),
    "eval_split": (lambda v: v in ("test", "validation", "training"), "a datalist key: test, validation or training"),
}


def check_settings(**settings) -> bool:
    """
    Check each ``name=value`` against the rule for that config id; unknown names are rejected so that the
    config and this table cannot drift apart silently.

    Raises:
        InputError: naming every id whose value has the wrong type or range, with what was expected, in one line.
    """
    errors = []
    for name, value in settings.items():
        if name not in _RULES:
            raise KeyError(f"check_settings has no rule for {name!r}; known: {', '.join(sorted(_RULES))}.")
        ok, expected = _RULES[name]
        if not ok(value):
            errors.append(f"--{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if not errors and settings.get("adaptive") and settings.get("dropout", 0.5) == 0:
        errors.append("--dropout 0 makes every dropout sample the same, so the difficulty pass would give every "
                      "image the same eps: train with --dropout > 0, or use a fixed-shape loss overlay "
                      "(configs/loss/*.yaml)")
    if errors:
        raise InputError("; ".join(errors) + ".")
    return True
