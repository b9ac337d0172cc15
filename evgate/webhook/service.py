"""
Every webhook subscription of one gateway node: the L{WebhookService}.

The store is the list of subscriptions.  The service reads it at start and
every C{webhook-sync-interval} seconds, and runs a
L{evgate.webhook.delivery.Deliverer} for each subscription of a configured
API that is not paused; so subscriptions created, paused, resumed or
deleted through another node's admin API (with a store the nodes share)
reach this node within that interval.  The admin API of this node acts at
once.

Which node delivers: with Kafka, every node runs a deliverer and joins the
subscription's consumer group, and Kafka assigns each partition to one of
them.  With MQTT, every node joins the subscription's share group and the
broker hands each message to one.  The in-memory endpoint is per node:
each node delivers its own messages.
"""

from __future__ import annotations

import random as _random
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Set

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from evgate.entrypoints.webhook import WebhookGatewaySettings
from evgate.errors import BadCursor, BadFilter, BadRequest, Conflict, EndpointUnavailable, NotFound, Problem
from evgate.filters import FilterSyntaxError, SubscriptionFilter, compileFilter
from evgate.interfaces import IConsumerGroups, IRetainedLog, ISharedSubscriptions
from evgate.message import Cursor, CursorError
from evgate.webhook import records
from evgate.webhook.client import DeliveryAgent, DeliveryClient, WebhookTrust
from evgate.webhook.delivery import Deliverer, DeliveryContext, checkStaticHeaders
from evgate.webhook.feeds import HubFeed, ShareGroupFeed
from evgate.webhook.groupreplay import MEMBERS_GRACE, commitGroupOffsets, waitForNoMembers
from evgate.webhook.kafka import KafkaGroupFeed, webhookGroup
from evgate.webhook.retry import RetryPolicy, parsePolicy
from evgate.webhook.signing import newSecret, secretKey
from evgate.webhook.ssrf import (
    AddressPolicy,
    BadCallback,
    GuardedEndpointFactory,
    Resolver,
    checkCallback,
    loggableUrl,
    parseCallbackUrl,
    reactorResolver,
)
from evgate.webhook.starting import FIELDS, checkMaxInFlight, resolveStart

if TYPE_CHECKING:
    from evgate.node import NodeContext


class WebhookService(Service):
    """
    The webhook subscriptions of one node: their deliverers, and the
    operations of the admin API.
    """

    log = Logger()

    def __init__(self, node: "NodeContext", store: Any, reactor: Any, http: Any = None,
                 resolve: Optional[Resolver] = None, random: Any = None) -> None:
        self.node = node
        self.store = store
        self.reactor = reactor
        options = node.settings.options
        self.settings: WebhookGatewaySettings = options.get("webhook") or WebhookGatewaySettings()
        self.policy = AddressPolicy(self.settings.allowPrivate)
        self.resolve = resolve if resolve is not None else reactorResolver(reactor)
        self.http = http
        self.random = random if random is not None else _random.SystemRandom()
        self.agent: Any = None
        self.deliverers: Dict[str, Deliverer] = {}
        self.stopping: Dict[str, Deferred] = {}
        self.loop: Optional[LoopingCall] = None
        self._warned: Set[str] = set()

    # -- lifecycle

    def startService(self) -> None:
        Service.startService(self)
        if self.http is None:
            self.http = self._makeHttp()
        self.loop = LoopingCall(self.sync)
        self.loop.clock = self.reactor
        self.loop.start(self.settings.syncInterval, now=True).addErrback(
            lambda f: self.log.failure("webhook: the store sync loop ended", f))

    def _makeHttp(self) -> Any:
        trust = self.node.settings.options.get("webhook-trust") or WebhookTrust()
        factory = GuardedEndpointFactory(self.reactor, self.policy, self.resolve, tlsPolicy=trust.tlsPolicy())
        self.agent = DeliveryAgent(self.reactor, factory)
        return DeliveryClient(self.agent, self.reactor)

    def stopService(self) -> Deferred:
        """
        Stop every deliverer and fire once their positions are stored.
        """
        Service.stopService(self)
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        for id in list(self.deliverers):
            self._stopDeliverer(id)
        waits = list(self.stopping.values())
        d: Deferred = DeferredList(waits, consumeErrors=True) if waits else succeed(None)
        if self.agent is not None:
            agent = self.agent
            d.addCallback(lambda _: agent.closeCachedConnections())
        return d

    # -- which subscriptions run here

    def apis(self) -> Dict[str, Any]:
        """
        The API runtimes with the webhook entrypoint, by name.
        """
        return {api.name: api for api in self.node.apis if "webhook" in api.config.entrypoints}

    def entrypoint(self, api: Any) -> Any:
        """
        The webhook entrypoint of C{api}.
        """
        for entrypoint in api.entrypoints:
            if entrypoint.name == "webhook":
                return entrypoint
        raise LookupError(api.name)

    def sync(self) -> Deferred:
        """
        Bring the deliverers in line with the store.
        """
        d = self.store.list(records.KIND)
        d.addCallback(self._reconcile)
        d.addErrback(lambda f: self.log.failure("webhook: reading the subscriptions from the store failed", f))
        return d

    def _reconcile(self, items: List[Any]) -> None:
        if not self.running:
            return
        apis = self.apis()
        seen = set()
        for id, record in items:
            seen.add(id)
            api = apis.get(record.get("api"))
            if api is None:
                if id not in self._warned:
                    self._warned.add(id)
                    self.log.warn("webhook subscription {subscription} is for API {api}, which this node does not "
                                  "serve with the webhook entrypoint; not delivering it here",
                                  subscription=id, api=record.get("api"))
                continue
            if record.get("paused"):
                if id in self.deliverers:
                    self._stopDeliverer(id)
            elif id not in self.deliverers and id not in self.stopping:
                self._startDeliverer(api, record)
        for id in list(self.deliverers):
            if id not in seen:
                self._stopDeliverer(id)

    def _startDeliverer(self, api: Any, record: Mapping[str, Any]) -> Optional[Deliverer]:
        id = record["id"]
        entrypoint = self.entrypoint(api)
        settings = entrypoint.settings
        try:
            policy = parsePolicy(record.get("retry"), settings.retry)
            key = secretKey(record["secret"])
            position = None
            if record.get("position"):
                position = Cursor.decode(record["position"], api.tag)
            filter = self.filterFor(api, record.get("filter"))
            maxInFlight = self.maxInFlightOf(api, record)
        except (ValueError, KeyError) as e:
            if id not in self._warned:
                self._warned.add(id)
                self.log.error("webhook subscription {subscription}: its record cannot be used ({error}); "
                               "not delivering it", subscription=id, error=str(e))
            return None
        context = DeliveryContext(
            reactor=self.reactor, http=self.http, store=self.store, api=api.name, tag=api.tag,
            epoch=api.connector.epoch(), timeout=settings.timeout, maxInFlight=maxInFlight,
            dlq=entrypoint.deadLetters, random=self.random, onPaused=self._pausedByDeliverer,
            cloudEvents=api.config.options.get("webhookCloudEvents"))
        if self.agent is not None:
            self.agent.keepAtLeast(maxInFlight)
        deliverer = Deliverer(record, key, policy, position, context)
        self.deliverers[id] = deliverer
        deliverer.start(self.feedFactory(api, id, filter, maxInFlight))
        self.log.info("webhook subscription {subscription} of API {api}: delivering to {url}",
                      subscription=id, api=api.name, url=loggableUrl(record["callbackUrl"]))
        return deliverer

    def feedFactory(self, api: Any, id: str, filter: Any, maxInFlight: int = 1) -> Callable[[Deliverer], Any]:
        """
        What makes the feed of subscription C{id} of C{api}, by what the
        API's endpoint can do: read as a consumer group (the broker spreads
        the work over nodes), else join a share group, else follow the
        node's hub.
        """
        connector = api.connector
        config = api.config
        high = max(self.node.settings.subscriberQueue, 2 * maxInFlight)
        view = api.pipeline.hubView
        if IConsumerGroups.providedBy(connector):
            return lambda deliverer: KafkaGroupFeed(deliverer, connector, config.topic, api.name, filter,
                                                    view=view, window=maxInFlight)
        if ISharedSubscriptions.providedBy(connector):
            return lambda deliverer: ShareGroupFeed(deliverer, connector, config.topic, f"evgate-{id}", filter, high,
                                                    view)
        return lambda deliverer: HubFeed(deliverer, self.node.hub, config.endpoint, config.topic, filter,
                                         config.start, high, view)

    def filterFor(self, api: Any, text: Optional[str]) -> Any:
        """
        The filter of a subscription: the API's operator filter and the
        subscription's own, or L{None}.

        @raise FilterSyntaxError: if C{text} does not compile.
        """
        operator = api.config.options.get("filter")
        program = compileFilter(text) if text else None
        if operator is None and program is None:
            return None
        return SubscriptionFilter(operator, program, {})

    def _stopDeliverer(self, id: str) -> Deferred:
        deliverer = self.deliverers.pop(id, None)
        if deliverer is None:
            return self.stopping.get(id) or succeed(None)
        d = deliverer.stop()
        self.stopping[id] = d

        def stopped(result: Any) -> Any:
            if self.stopping.get(id) is d:
                del self.stopping[id]
            return result

        d.addBoth(stopped)
        return d

    def _pausedByDeliverer(self, deliverer: Deliverer) -> None:
        # Not from inside the deliverer's own call stack.
        self.reactor.callLater(0, self._stopDeliverer, deliverer.id)

    # -- the admin API's operations

    def apiFor(self, name: str) -> Any:
        """
        The runtime of API C{name}, which must have the webhook entrypoint.

        @raise NotFound: if there is no such API.
        @raise Conflict: if it does not list the webhook entrypoint.
        """
        api = self.node.api(name)
        if api is None:
            raise NotFound(f"there is no API named {name}")
        if "webhook" not in api.config.entrypoints:
            raise Conflict(f"API {name} does not list webhook in its entrypoints")
        return api

    def retryOf(self, api: Any, record: Mapping[str, Any]) -> Mapping[str, Any]:
        """
        The retry policy a subscription is delivered with.
        """
        default: RetryPolicy = self.entrypoint(api).settings.retry
        try:
            return parsePolicy(record.get("retry"), default).asJSON()
        except ValueError:
            return default.asJSON()

    def maxInFlightOf(self, api: Any, record: Mapping[str, Any]) -> int:
        """
        How many messages of a subscription are delivered at once: its own
        C{maxInFlight}, else its API's C{webhook.max-in-flight}.

        @raise ValueError: if the record's value is not one.
        """
        own = checkMaxInFlight(record.get("maxInFlight"))
        return own if own is not None else int(self.entrypoint(api).settings.maxInFlight)

    def view(self, api: Any, record: Mapping[str, Any]) -> Dict[str, Any]:
        """
        The admin API's view of a subscription.
        """
        try:
            maxInFlight: Optional[int] = self.maxInFlightOf(api, record)
        except ValueError:
            maxInFlight = None
        return records.publicView(dict(record), dict(self.retryOf(api, record)), maxInFlight)

    def create(self, apiName: str, document: Any) -> Deferred:
        """
        Create a subscription from the admin API's C{document}.

        @return: a Deferred of the stored record (with its secret).
        """
        api = self.apiFor(apiName)
        settings = self.entrypoint(api).settings
        if not isinstance(document, dict):
            raise BadRequest("the body must be a JSON object")
        unknown = sorted(set(document) - FIELDS)
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(FIELDS))})")
        try:
            url = parseCallbackUrl(document.get("callbackUrl"), self.settings.allowHttp)
        except BadCallback as e:
            raise BadRequest(str(e), extra={"field": "callbackUrl"}) from None
        try:
            headers = checkStaticHeaders(document.get("headers"))
        except ValueError as e:
            raise BadRequest(str(e), extra={"field": "headers"}) from None
        filterText = document.get("filter")
        if filterText is not None and not isinstance(filterText, str):
            raise BadRequest("filter must be a string (a CEL expression)", extra={"field": "filter"})
        if filterText is not None and not filterText.strip():
            filterText = None
        if filterText is not None:
            try:
                self.filterFor(api, filterText)
            except FilterSyntaxError as e:
                raise BadFilter(f"filter is not a valid filter: {e}",
                                extra={"field": "filter", "line": e.line, "column": e.column}) from None
        start: Any = document.get("start", api.config.start)
        if not isinstance(start, str) or not start:
            raise BadRequest("start must be \"earliest\", \"latest\" or a cursor", extra={"field": "start"})
        startKind = start
        if start not in ("earliest", "latest"):
            try:
                start = Cursor.decode(start, api.tag)
            except CursorError as e:
                raise BadCursor(f"start is not a cursor of API {api.name}: {e}", extra={"field": "start"}) from None
            startKind = "cursor"
        retry = document.get("retry")
        try:
            parsePolicy(retry, settings.retry)
        except ValueError as e:
            raise BadRequest(str(e), extra={"field": "retry"}) from None
        try:
            maxInFlight = checkMaxInFlight(document.get("maxInFlight"))
        except ValueError as e:
            raise BadRequest(str(e), extra={"field": "maxInFlight"}) from None

        d = self.store.list(records.KIND)

        def counted(items: List[Any]) -> Deferred:
            count = sum(1 for _, r in items if r.get("api") == api.name)
            if count >= settings.maxSubscriptions:
                raise Conflict(f"API {api.name} has {count} webhook subscriptions, the most "
                               "webhook.max-subscriptions allows")
            return checkCallback(url, self.policy, self.resolve)

        def checked(addresses: List[str]) -> Any:
            if not IRetainedLog.providedBy(api.connector):
                # No log to start in (MQTT): every subscription starts live.
                return None
            return resolveStart(api.connector, api.config.topic, start, self.reactor)

        def store(position: Optional[Cursor]) -> Deferred:
            now = records.timestamp(self.reactor.seconds())
            record = {
                "id": records.newSubscriptionId(),
                "api": api.name,
                "callbackUrl": url.url,
                "headers": headers,
                "filter": filterText,
                "secret": newSecret(),
                "retry": retry,
                "maxInFlight": maxInFlight,
                "start": startKind,
                "paused": False,
                "pausedReason": None,
                "state": records.ACTIVE,
                "lastError": None,
                "position": position.encode(api.tag) if position is not None else None,
                "lastDeliveredAt": None,
                "delivered": 0,
                "failedAttempts": 0,
                "deadLettered": 0,
                "createdAt": now,
            }
            created = self.store.create(records.KIND, record["id"], record)

            def started(stored: bool) -> Any:
                if not stored:  # 80 random bits colliding: try once more
                    return store(position)
                self.log.info("admin: created webhook subscription {subscription} of API {api} to {url}",
                              subscription=record["id"], api=api.name, url=loggableUrl(url.url))
                if self.running:
                    self._startDeliverer(api, record)
                return record

            created.addCallback(started)
            return created

        def badCallback(failure: Failure) -> None:
            failure.trap(BadCallback)
            raise BadRequest(failure.getErrorMessage(), extra={"field": "callbackUrl"})

        d.addCallback(counted)
        d.addErrback(badCallback)
        d.addCallback(checked)
        d.addCallback(store)
        return d

    def list(self, apiName: str) -> Deferred:
        """
        The records of API C{apiName}'s subscriptions.
        """
        api = self.apiFor(apiName)
        d = self.store.list(records.KIND)
        d.addCallback(lambda items: [r for _, r in items if r.get("api") == api.name])
        return d

    def get(self, apiName: str, id: str) -> Deferred:
        """
        The record of subscription C{id} of API C{apiName}.

        @raise NotFound: (in the Deferred) if there is none.
        """
        api = self.apiFor(apiName)
        if not records.isSubscriptionId(id):
            raise NotFound(f"API {api.name} has no webhook subscription {id[:60]}")
        d = self.store.get(records.KIND, id)

        def found(record: Optional[Mapping[str, Any]]) -> Mapping[str, Any]:
            if record is None or record.get("api") != api.name:
                raise NotFound(f"API {api.name} has no webhook subscription {id}")
            return record

        d.addCallback(found)
        return d

    def delete(self, apiName: str, id: str) -> Deferred:
        """
        Stop delivering subscription C{id} and forget it.
        """
        d = self.get(apiName, id)
        d.addCallback(lambda _: self._stopDeliverer(id))
        d.addCallback(lambda _: self.store.delete(records.KIND, id))
        d.addCallback(lambda _: self.log.info("admin: deleted webhook subscription {subscription} of API {api}",
                                              subscription=id, api=apiName))
        return d

    def pause(self, apiName: str, id: str) -> Deferred:
        """
        Stop delivering subscription C{id} until it is resumed.
        """
        d = self.get(apiName, id)
        # The deliverer stops (and stores its position) before the pause is
        # written, so that nothing it writes afterwards contradicts it.
        d.addCallback(lambda _: self._stopDeliverer(id))
        d.addCallback(lambda _: self.store.update(records.KIND, id, {
            "paused": True, "pausedReason": "paused by an operator"}))
        d.addCallback(self._existing, apiName, id)
        d.addCallback(self._logged, "paused", apiName)
        return d

    def resume(self, apiName: str, id: str) -> Deferred:
        """
        Deliver subscription C{id} again, from its position; a message that
        paused it is tried again from its first attempt.
        """
        d = self.get(apiName, id)
        d.addCallback(lambda _: self.stopping.get(id))
        d.addCallback(lambda _: self.store.update(records.KIND, id, {
            "paused": False, "pausedReason": None, "state": records.ACTIVE}))
        d.addCallback(self._existing, apiName, id)

        def restart(record: Mapping[str, Any]) -> Mapping[str, Any]:
            if self.running and id not in self.deliverers:
                self._startDeliverer(self.apiFor(apiName), record)
            return record

        d.addCallback(restart)
        d.addCallback(self._logged, "resumed", apiName)
        return d

    def replay(self, apiName: str, id: str, position: Cursor) -> Deferred:
        """
        Deliver subscription C{id} again from C{position}: its deliverer
        stops (storing where it was), the position is replaced, and, unless
        the subscription is paused, it starts again from there.  The
        endpoint must read from the subscription's stored position (the
        hub's feed): see L{evgate.admin.replay} for which can.
        """
        api = self.apiFor(apiName)
        d = self.get(apiName, id)
        d.addCallback(lambda _: self._stopDeliverer(id))
        d.addCallback(lambda _: self.store.update(records.KIND, id, {
            "position": position.encode(api.tag), "state": records.ACTIVE, "lastError": None}))
        d.addCallback(self._existing, apiName, id)

        d.addCallback(self._restart, apiName)
        d.addCallback(self._logged, f"replayed from {position.encode(api.tag)}", apiName)
        return d

    def replayGroup(self, apiName: str, id: str, at: Optional[int] = None,
                    offsets: Optional[Mapping[int, int]] = None) -> Deferred:
        """
        Deliver subscription C{id} of a Kafka API again from the first
        message at or after C{at} (milliseconds), or from C{offsets}, by
        moving its consumer group's committed offsets while no node is in
        the group (L{evgate.webhook.groupreplay}).  The subscription is
        paused meanwhile and left as it was if that fails.
        """
        api = self.apiFor(apiName)
        connector = api.connector
        groupId = connector.groupId(webhookGroup(api.name, id))
        was: Dict[str, Any] = {}

        def pause(record: Mapping[str, Any]) -> Deferred:
            was.update(paused=bool(record.get("paused")), pausedReason=record.get("pausedReason"))
            d = self._stopDeliverer(id)
            d.addCallback(lambda _: self.store.update(records.KIND, id, {
                "paused": True, "pausedReason": "replaying: moving the consumer group's position"}))
            d.addCallback(lambda _: waitForNoMembers(connector, groupId, self.settings.syncInterval + MEMBERS_GRACE,
                                                     self.reactor))
            d.addCallback(lambda _: commitGroupOffsets(connector, api.config.topic, groupId, at, offsets))
            return d

        def moved(committed: Mapping[int, int]) -> Deferred:
            position = Cursor.fromMapping(committed, connector.epoch()).encode(api.tag)
            return self.store.update(records.KIND, id, dict(was, position=position, state=records.ACTIVE,
                                                            lastError=None))

        def failed(failure: Failure) -> Deferred:
            if not was:
                return failure  # type: ignore[return-value]
            if not failure.check(Problem):
                self.log.failure("webhook: replaying subscription {subscription} failed", failure, subscription=id)
                failure = Failure(EndpointUnavailable(
                    f"moving consumer group {groupId} failed: {failure.getErrorMessage()}; its position is as it was"))
            d = self.store.update(records.KIND, id, dict(was))
            d.addCallback(self._existing, apiName, id)
            d.addCallback(self._restart, apiName)
            d.addBoth(lambda _: failure)
            return d

        d = self.get(apiName, id)
        d.addCallback(pause)
        d.addCallback(moved)
        d.addErrback(failed)
        d.addCallback(self._existing, apiName, id)
        d.addCallback(self._restart, apiName)
        d.addCallback(self._logged, f"moved consumer group {groupId} of", apiName)
        return d

    def _restart(self, record: Mapping[str, Any], apiName: str) -> Mapping[str, Any]:
        # Deliver again after a replay, unless the subscription is paused.
        if self.running and not record.get("paused") and record["id"] not in self.deliverers:
            self._startDeliverer(self.apiFor(apiName), record)
        return record

    def _existing(self, record: Optional[Mapping[str, Any]], apiName: str, id: str) -> Mapping[str, Any]:
        if record is None:
            raise NotFound(f"API {apiName} has no webhook subscription {id}")
        return record

    def _logged(self, record: Mapping[str, Any], what: str, apiName: str) -> Mapping[str, Any]:
        self.log.info("admin: {what} webhook subscription {subscription} of API {api}", what=what,
                      subscription=record["id"], api=apiName)
        return record
