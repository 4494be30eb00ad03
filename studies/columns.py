"""The columns every study table draws from: one header per accuracy key of an evaluation (the keys
of eval.json's "accuracy"), so the same attack reads the same in every report. A table picks the
keys it shows, in its order."""
from __future__ import annotations

HEADERS = {"clean": "clean", "pgd-10": "PGD-10", "pgd-50": "PGD-50", "apgd": "APGD-CE+T", "autoattack": "AutoAttack",
           "fab": "FAB-T", "route-fixed": "route-fixed", "router": "router attack", "square": "Square alone",
           "robust": "worst case"}


def header(key: str) -> str:
    """The column header of an accuracy key; PGD with any number of steps reads PGD-N."""
    return HEADERS.get(key, key.upper() if key.startswith("pgd-") else key)
