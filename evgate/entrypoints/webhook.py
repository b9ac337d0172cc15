"""
The webhook entrypoint: the gateway POSTs an API's messages to callback
URLs that subscribers registered through the admin API.

Unlike the other entrypoints it serves no request on the API's path; an
API lists C{webhook} in its C{entrypoints} to allow subscriptions, and the
node's L{evgate.webhook.service.WebhookService} delivers them.  This module
holds the entrypoint and the configuration keys:

C{[gateway]} keys (all optional):

 - C{webhook-allow-private} (false): allow callbacks to loopback, private
   and other non-public addresses (development, tests);
 - C{webhook-allow-http} (false): allow plain C{http} callback URLs;
 - C{webhook-sync-interval} (5 s): how often a node reads the store for
   subscriptions created, paused or deleted on other nodes.

C{[api:NAME]} keys (only with the webhook entrypoint):

 - C{webhook.retry.initial-delay} (1 s), C{webhook.retry.max-delay}
   (600 s), C{webhook.retry.max-attempts} (15): the default retry policy
   of the API's subscriptions;
 - C{webhook.timeout} (10 s): how long an attempt waits for the answer;
 - C{webhook.max-in-flight} (1): messages of one subscription delivered
   at once (a subscription's C{maxInFlight} overrides it); 1 keeps the
   stream's order, more keeps the order per message key;
 - C{webhook.max-subscriptions} (100);
 - C{dlq = <endpoint>/<topic>}: where undeliverable messages go; without
   it, a subscription that cannot deliver a message pauses.

See docs/entrypoints/webhook.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from twisted.web.server import Request
from zope.interface import implementer

from evgate.answers import writeProblem
from evgate.errors import MethodNotAllowed
from evgate.gateway import ApiCall
from evgate.ini import ApiContext, ConfigError, SectionReader, apiOptionParser, gatewayKeys
from evgate.interfaces import IEntrypoint
from evgate.webhook.delivery import DeadLetters, splitDeadLetterTarget
from evgate.webhook.retry import (
    DEFAULT_INITIAL_DELAY,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_DELAY,
    MAX_ATTEMPTS_LIMIT,
    MAX_DELAY_LIMIT,
    RetryPolicy,
)

API_KEYS = (
    "webhook.retry.initial-delay", "webhook.retry.max-delay", "webhook.retry.max-attempts", "webhook.timeout",
    "webhook.max-in-flight", "webhook.max-subscriptions", "dlq",
)


@dataclass(frozen=True)
class WebhookGatewaySettings:
    """
    The C{[gateway]} keys of webhooks.
    """

    allowPrivate: bool = False
    allowHttp: bool = False
    syncInterval: float = 5.0


@dataclass(frozen=True)
class WebhookApiSettings:
    """
    The C{[api:NAME]} keys of webhooks.

    @ivar dlq: the C{(endpoint, topic)} of C{dlq}, or L{None}.
    """

    retry: RetryPolicy = RetryPolicy()
    timeout: float = 10.0
    maxInFlight: int = 1
    maxSubscriptions: int = 100
    dlq: Optional[tuple] = None


@gatewayKeys
def parseWebhookGatewayKeys(section: SectionReader) -> Mapping[str, Any]:
    """
    C{webhook-allow-private}, C{webhook-allow-http} and
    C{webhook-sync-interval}, as L{WebhookGatewaySettings} under
    C{options["webhook"]}.
    """
    return {"webhook": WebhookGatewaySettings(
        allowPrivate=section.getBool("webhook-allow-private", False),
        allowHttp=section.getBool("webhook-allow-http", False),
        syncInterval=section.getFloat("webhook-sync-interval", 5.0, minimum=0.1),
    )}


@apiOptionParser
def parseWebhookOptions(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    The webhook keys of an API, as L{WebhookApiSettings} under
    C{options["webhook"]}; refused on APIs without the entrypoint.
    """
    if "webhook" not in context.entrypoints:
        for key in API_KEYS:
            if section.has(key):
                raise section.error(key, "is only used by the webhook entrypoint, which this API does not list")
        return {}
    if context.gateway.options.get("store") is None:
        raise section.error("entrypoints", "the webhook entrypoint keeps its subscriptions in a store: "
                            "set store = sqlite:PATH in [gateway]")
    initial = section.getFloat("webhook.retry.initial-delay", DEFAULT_INITIAL_DELAY, minimum=0.001)
    maximum = section.getFloat("webhook.retry.max-delay", max(DEFAULT_MAX_DELAY, initial), minimum=0.001)
    if maximum < initial:
        raise section.error("webhook.retry.max-delay", "must not be smaller than webhook.retry.initial-delay")
    if maximum > MAX_DELAY_LIMIT:
        raise section.error("webhook.retry.max-delay", f"must be at most {MAX_DELAY_LIMIT:g}")
    attempts = section.getInt("webhook.retry.max-attempts", DEFAULT_MAX_ATTEMPTS, minimum=1,
                              maximum=MAX_ATTEMPTS_LIMIT)
    dlq = section.getParsed("dlq", splitDeadLetterTarget)
    if dlq is not None and dlq == (context.endpoint.name, section.get("topic")):
        raise section.error("dlq", "must not be the API's own topic: dead letters would be delivered again")
    return {"webhook": WebhookApiSettings(
        retry=RetryPolicy(initial, maximum, attempts),
        timeout=section.getFloat("webhook.timeout", 10.0, minimum=0.1),
        maxInFlight=section.getInt("webhook.max-in-flight", 1, minimum=1, maximum=1000),
        maxSubscriptions=section.getInt("webhook.max-subscriptions", 100, minimum=1, maximum=100000),
        dlq=dlq,
    )}


@implementer(IEntrypoint)
class WebhookEntrypoint:
    """
    The webhook entrypoint of one API: its settings and dead-letter
    destination, for the node's webhook service.  It serves no request on
    the API's path.
    """

    name = "webhook"
    methods = ()

    def __init__(self, api: Any) -> None:
        self.api = api
        self.settings: WebhookApiSettings = api.config.options["webhook"]
        self.deadLetters: Optional[DeadLetters] = None
        if self.settings.dlq is not None:
            endpoint, topic = self.settings.dlq
            connector = api.node.connectors.get(endpoint)
            if connector is None:
                known = ", ".join(sorted(api.node.connectors))
                raise ConfigError(api.node.config.path, f"api:{api.name}", "dlq",
                                  f"unknown endpoint {endpoint!r} (known: {known})")
            self.deadLetters = DeadLetters(endpoint, topic, connector, api.node.settings.publishTimeout)
        # Requests never reach this entrypoint; 405s count on the API's.
        self.tally = api.tally

    def accepts(self, request: Request) -> bool:
        """
        Never: subscriptions are made through the admin API.
        """
        return False

    def render(self, request: Request, call: ApiCall) -> bytes:
        """
        Not reached (see L{accepts}); a 405 if it ever is.
        """
        return writeProblem(request, MethodNotAllowed("webhook subscriptions are made through the admin API"))

    def stop(self) -> None:
        """
        Nothing to end here: the node's webhook service stops deliveries.
        """
