"""
Plans: how callers of an API authenticate.  One module per plan, each an
L{evgate.interfaces.IPlan}.
"""

from __future__ import annotations

import importlib
from typing import Any, List

PLANS = {
    "keyless": ("evgate.security.keyless", "KeylessPlan"),
}


def buildPlans(api: Any) -> List[Any]:
    """
    The plans of one API runtime, in configuration order.
    """
    built = []
    for name in api.config.plans:
        module, cls = PLANS[name]
        built.append(getattr(importlib.import_module(module), cls)(api))
    return built
