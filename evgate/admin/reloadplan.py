"""
C{GET /reload/plan}: what C{POST /reload} would do now, without doing it.

It reads the configuration file again and plans the reload exactly as a
reload does (L{evgate.reload.checkConfig}): the answer is the plan
(C{{"applied": false, "apis": {"added", "changed", "removed",
"unchanged"}, "endpoints": {...}, "gateway": {...}}}), or the same 400
(a mistake, naming file, section and key) or 409 (a restart needed) that
the reload would answer.  The runtimes the plan built to check the file
are stopped and dropped; nothing running changes.
"""

from __future__ import annotations

from typing import Any, Dict

from twisted.internet.defer import maybeDeferred
from twisted.web.server import Request

from evgate.admin.app import AdminApp, adminRoute
from evgate.admin.ops import BadConfiguration, RestartNeeded
from evgate.ini import ConfigError
from evgate.reload import RestartRequired


@adminRoute("/reload/plan", methods=["GET"])
def reloadPlan(admin: AdminApp, request: Request) -> Dict[str, Any]:
    """
    The plan of a reload now, not applied.
    """
    gateway = admin.gateway
    try:
        plan = gateway.checkConfig()
    except ConfigError as error:
        raise BadConfiguration(str(error), extra={"file": error.path, "section": error.section,
                                                  "key": error.key, "applied": False}) from None
    except RestartRequired as error:
        raise RestartNeeded(str(error), extra={"restartRequired": error.reasons, "applied": False}) from None
    for runtime in plan.runtimes.values():
        # Built only to check them: release what they hold (a plan's key
        # registry listener, an entrypoint's timers).
        for part in list(runtime.entrypoints) + list(runtime.plans):
            maybeDeferred(part.stop).addErrback(
                lambda f: gateway.log.failure("reload plan: stopping a runtime built to check the file", f))
    summary: Dict[str, Any] = plan.summary()
    summary["applied"] = False
    summary["empty"] = plan.empty
    return summary
