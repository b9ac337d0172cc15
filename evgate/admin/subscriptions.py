"""
Admin routes of webhook subscriptions (see docs/entrypoints/webhook.md):

    POST   /apis/<api>/subscriptions              create (201, with the secret)
    GET    /apis/<api>/subscriptions              list
    GET    /apis/<api>/subscriptions/<id>         one
    DELETE /apis/<api>/subscriptions/<id>         delete (204)
    POST   /apis/<api>/subscriptions/<id>/pause   pause
    POST   /apis/<api>/subscriptions/<id>/resume  resume

The work is the node's L{evgate.webhook.service.WebhookService}'s; these
handlers translate HTTP.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from evgate.admin.app import AdminApp, Answer, adminRoute, readJson
from evgate.errors import Conflict, NotFound


def webhooks(admin: AdminApp, api: str) -> Any:
    """
    The node's webhook service, once C{api} is known to be an API with the
    webhook entrypoint.

    @raise NotFound: if there is no API C{api}.
    @raise Conflict: if it does not list the webhook entrypoint.
    """
    runtime = admin.gateway.api(api)
    if runtime is None:
        raise NotFound(f"there is no API named {api}")
    service = admin.gateway.webhooks
    if "webhook" not in runtime.config.entrypoints or service is None:
        raise Conflict(f"API {api} does not list webhook in its entrypoints")
    return service


def subscriptionView(admin: AdminApp, api: str, id: str, operation: str) -> Deferred:
    """
    Run the webhook service's C{operation} (C{get}, C{pause}, C{resume})
    on subscription C{id}, and answer the subscription's view.
    """
    service = webhooks(admin, api)
    d = getattr(service, operation)(api, id)
    d.addCallback(lambda record: service.view(service.apiFor(api), record))
    return d  # type: ignore[no-any-return]


@adminRoute("/apis/<api>/subscriptions", methods=["POST"])
def createSubscription(admin: AdminApp, request: Request, api: str) -> Deferred:
    """
    Create a subscription; the answer is the only one that shows its
    signing secret.
    """
    service = webhooks(admin, api)
    document = readJson(request)
    d = service.create(api, document)

    def created(record: Dict[str, Any]) -> Answer:
        view = service.view(service.apiFor(api), record)
        view["secret"] = record["secret"]
        return Answer(201, view, [("Location", f"/apis/{api}/subscriptions/{record['id']}")])

    d.addCallback(created)
    return d


@adminRoute("/apis/<api>/subscriptions", methods=["GET"])
def listSubscriptions(admin: AdminApp, request: Request, api: str) -> Deferred:
    """
    Every subscription of API C{api}.
    """
    service = webhooks(admin, api)
    runtime = service.apiFor(api)
    d = service.list(api)

    def listed(items: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"items": [service.view(runtime, record) for record in items]}

    d.addCallback(listed)
    return d


@adminRoute("/apis/<api>/subscriptions/<id>", methods=["GET"])
def getSubscription(admin: AdminApp, request: Request, api: str, id: str) -> Deferred:
    """
    One subscription, with its status, position, last error and counts.
    """
    return subscriptionView(admin, api, id, "get")


@adminRoute("/apis/<api>/subscriptions/<id>", methods=["DELETE"])
def deleteSubscription(admin: AdminApp, request: Request, api: str, id: str) -> Deferred:
    """
    Stop and forget a subscription.
    """
    service = webhooks(admin, api)
    d = service.delete(api, id)
    d.addCallback(lambda _: None)
    return d


@adminRoute("/apis/<api>/subscriptions/<id>/pause", methods=["POST"])
def pauseSubscription(admin: AdminApp, request: Request, api: str, id: str) -> Deferred:
    """
    Stop delivering until resumed; the position is kept.
    """
    return subscriptionView(admin, api, id, "pause")


@adminRoute("/apis/<api>/subscriptions/<id>/resume", methods=["POST"])
def resumeSubscription(admin: AdminApp, request: Request, api: str, id: str) -> Deferred:
    """
    Deliver again from the position.
    """
    return subscriptionView(admin, api, id, "resume")
