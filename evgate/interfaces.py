"""
Every zope Interface of evgate, in one place.

The contracts between the three layers:

 - a connector (L{IConnector}) speaks one broker and lives on its own
   threads; it hands results to the reactor thread only;
 - the hub fans one upstream subscription per (endpoint, topic) out to many
   subscribers (L{ISubscriber});
 - an entrypoint (L{IEntrypoint}) speaks one client protocol over one API.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IUpstreamSink(Interface):
    """
    What a connector delivers a subscription's messages to.  Every method is
    called on the reactor thread.
    """

    def started(cursor):
        """
        The subscription resolved where it starts: C{cursor} names every
        partition it reads and the next offset of each.  Called once, before
        the first L{deliver}.
        """

    def deliver(messages):
        """
        A batch of L{evgate.message.Message}, in the order the broker gave
        them (ordered per partition).
        """

    def gap(cursor, reason):
        """
        Messages the subscription asked for are no longer retained; reading
        resumes at C{cursor}.  C{reason} is one line for the client.
        """

    def failed(reason):
        """
        The subscription ended for good with the L{Failure} C{reason}.
        """


class IUpstreamSubscription(Interface):
    """
    A connector's subscription to one topic.
    """

    def pause():
        """
        Stop delivering until L{resume}; the connector stops reading from
        the broker rather than buffering without bound.
        """

    def resume():
        """
        Deliver again after L{pause}.
        """

    def close():
        """
        End the subscription and release its broker resources.  Idempotent.
        """


class IConnector(Interface):
    """
    One configured endpoint: a broker client.  Connectors are also
    L{twisted.application.service.IService}s: they connect on
    C{startService} and release their threads on C{stopService}.
    """

    name = Attribute("The endpoint's name in the configuration.")
    kind = Attribute("The endpoint type (memory, kafka, mqtt5): a label for logs, metrics and the admin API. "
                     "Code that needs a capability asks for its interface (L{IConsumerGroups}, "
                     "L{IHeadOffsets}, L{IRetainedLog} ...) with C{providedBy}, never by this name.")
    connected = Attribute("Whether the broker is reachable now (bool).")
    notConnectedReason = Attribute("One line on why the endpoint is not connected (a refused password, an "
                                   "untrusted certificate, a broker that does not answer), for /ready; "
                                   "None while it is connected.")

    def publish(topic, draft, timeout):
        """
        Publish the L{evgate.message.Draft} C{draft} to C{topic}.

        @param timeout: seconds to wait for the broker's acknowledgement.
        @return: a Deferred that fires on the reactor thread with the
            L{evgate.message.Position} the broker acknowledged, or fails with
            L{evgate.errors.EndpointUnavailable} /
            L{evgate.errors.EndpointTimeout}.
        """

    def publishMany(topic, drafts, timeout):
        """
        Publish every L{evgate.message.Draft} of C{drafts} to C{topic}, in
        order.

        @param timeout: seconds to wait for all the acknowledgements.
        @return: a Deferred that fires on the reactor thread, once every
            draft has its answer, with a list holding per draft its
            L{evgate.message.Position} or the L{evgate.errors.Problem} it
            failed with.  It does not fail: each record says how it went.
        """

    def subscribe(topic, start, sink):
        """
        Read C{topic} from C{start} into the L{IUpstreamSink} C{sink}.

        @param start: C{"earliest"}, C{"latest"} or an
            L{evgate.message.Cursor}.
        @return: an L{IUpstreamSubscription}.
        """

    def epoch():
        """
        The epoch this connector's cursors carry (see L{evgate.message}).
        """


class IConsumerGroups(Interface):
    """
    A connector whose broker keeps consumer groups: the broker, not the
    gateway, remembers each group's position and shares a topic's
    partitions among the group's members on every node.  HTTP GET's group
    mode and webhook deliveries need it.
    """

    def groupPoll(topic, group, limit, timeout, start):
        """
        Read C{topic} as a member of the consumer group C{group}: up to
        C{limit} messages, answering as soon as there is one or after
        C{timeout} seconds.

        @param start: C{"earliest"} or C{"latest"}: where a group without a
            position starts.
        @return: a Deferred that fires on the reactor thread with a batch
            holding C{messages}, C{first} and C{cursor}, which the caller
            must end with C{commit()} (the client has the messages) or
            C{putBack()} (it has not); until then the group's other polls
            wait.
        """


class IHeadOffsets(Interface):
    """
    A connector that knows, without asking a broker, where each partition of
    a topic ends (for lag metrics, and for a non-blocking GET to know what
    is already there).
    """

    def headOffsets(topic):
        """
        The next offset of every partition of C{topic}: a mapping of
        partition to offset, read on the reactor thread without blocking.
        L{None} when the connector knows nothing of C{topic} yet (Kafka
        learns its heads from its readers).
        """


class IRetainedLog(Interface):
    """
    A marker: the endpoint keeps the messages of a topic after delivering
    them, so a subscription may start at an old position (C{"earliest"} or
    a cursor older than the live head) and be replayed from there.  An
    endpoint without it (MQTT) starts every subscription at the live head.
    """


class ISharedSubscriptions(Interface):
    """
    A connector whose broker shares a subscription among a group of
    subscribers (MQTT 5 shared subscriptions): each message goes to one
    member of the group, across every gateway node.  Webhook deliveries on
    such an endpoint read through it.
    """

    def subscribe(topic, start, sink, group=None):
        """
        Read C{topic} into the L{IUpstreamSink} C{sink}, as L{IConnector}
        does, as a member of the share group C{group} when it is given.

        @return: an L{IUpstreamSubscription}.
        @raise ValueError: when C{group} is not a valid share group name.
        """


class IHoldableSubscription(IUpstreamSubscription):
    """
    An upstream subscription that can stop handing batches to its sink
    without pausing the broker consumer, so that what the consumer fetched
    is kept rather than fetched again (the hub parks pages with it).
    """

    def hold():
        """
        Stop delivering, like L{IUpstreamSubscription.pause}, but keep the
        batches that arrive meanwhile, in order; L{resume} delivers them
        and ends the hold.
        """

    def drainHeld():
        """
        Take the batches held since L{hold}, up to the first gap, as one
        list of L{evgate.message.Message} in order.
        """


class ISubscriber(Interface):
    """
    A client stream attached to the hub (an SSE response, a WebSocket, a
    long poll).  Every method is called on the reactor thread.
    """

    def started(cursor):
        """
        The subscription is attached; C{cursor} (an L{evgate.message.Cursor})
        is where it starts.  Called once, before anything else.
        """

    def deliver(events):
        """
        A batch of L{evgate.hub.Event}, already past the filters.  The
        subscriber writes them or queues them; it must not block.
        """

    def gap(cursor, reason):
        """
        Part of the stream the subscriber asked for is gone; it continues at
        C{cursor} (an L{evgate.message.Cursor}).
        """

    def advanced(cursor):
        """
        Messages were read and dropped by a filter: the subscriber's
        position moved to C{cursor} without an event.
        """

    def failed(reason):
        """
        The upstream subscription ended with the L{Failure} C{reason}.
        """


class IEntrypoint(Interface):
    """
    One client protocol on one API.
    """

    name = Attribute("The name used in the API's C{entrypoints} key.")
    methods = Attribute("The HTTP methods this entrypoint serves (a tuple of bytes), for 405's C{Allow}; "
                        "empty for an entrypoint that clients do not call (webhooks).")
    tally = Attribute("The L{evgate.metrics.Tally} that counts this entrypoint's requests.")

    def accepts(request):
        """
        Whether C{request} is for this entrypoint (method, headers).
        """

    def render(request, call):
        """
        Serve C{request} like L{twisted.web.resource.IResource.render};
        C{call} is the authenticated L{evgate.gateway.ApiCall}.
        """

    def stop():
        """
        End what this entrypoint serves, because the node stops or the API
        is retired by a reload: streams close with their goodbye (an SSE
        comment, WebSocket close 1013) so that clients resume elsewhere.
        Nothing for request/response entrypoints.

        @return: L{None} or a Deferred that fires once everything ended.
        """


class IStreamingEntrypoint(IEntrypoint):
    """
    An entrypoint that keeps client streams open (SSE, WebSocket).
    """

    live = Attribute("The set of streams open now; each has a C{written} cursor (or L{None}).")


class ISubtreeEntrypoint(IEntrypoint):
    """
    An entrypoint that serves its API's whole path subtree (C{/billing/...},
    not only C{/billing}) and takes request bodies as they arrive rather
    than after the site has read them: the HTTP proxy.
    """

    def openBodyPipe(request, length):
        """
        Where the body of C{request} goes while it arrives: an object with
        C{write(data)}, C{bodyEnded()} and an C{ended} flag, put in place of
        C{request.content} once the request's headers are in.

        @param length: the body's C{Content-Length}, or L{None} if chunked.
        """


class IPlan(Interface):
    """
    A way to authenticate a caller of an API.
    """

    name = Attribute("The plan's name in the API's C{plans} key.")
    challenge = Attribute("The C{WWW-Authenticate} challenge of this plan (a str), sent with a 401.")

    def present(request):
        """
        Whether C{request} carries credentials of this plan, valid or not.
        """

    def authenticate(request):
        """
        Check the credentials of this plan in C{request}.

        @return: a Deferred firing with an L{evgate.gateway.Consumer}, or
            failing with L{evgate.errors.Unauthorized} /
            L{evgate.errors.Forbidden}.  Always a Deferred, also when the
            answer is known at once.
        """

    def stop():
        """
        Release what the plan holds on the node (a listener for revoked
        keys, a key-set refresh): called when its API is retired.
        """


class ISynchronousPlan(IPlan):
    """
    A plan that knows its answer at once, from the request alone (keyless):
    the gateway asks it L{consumerOf}, and makes no Deferred.
    """

    def consumerOf(request):
        """
        The L{evgate.gateway.Consumer} of C{request}, now.

        @raise evgate.errors.Problem: when the plan refuses it.
        """


class IBodyPipes(Interface):
    """
    A site's root resource under which some paths take request bodies as
    they arrive (the gateway's, for an API with an L{ISubtreeEntrypoint}).
    """

    streamsBodies = Attribute("Whether any path does now: if not, a request pays this one test, no lookup.")

    def bodyPipeFor(path):
        """
        What opens the pipe a body sent to C{path} goes to
        (L{ISubtreeEntrypoint.openBodyPipe}), or L{None}.
        """


class IMetricsSource(Interface):
    """
    Something that counts more than the node's own metrics say (an C{http}
    endpoint's per-target figures) and adds its families to C{/metrics}.
    """

    def metricFamilies():
        """
        The Prometheus metric families to expose now (a list of
        C{prometheus_client} metric families).  Never blocks.
        """


class IStore(Interface):
    """
    The gateway's durable records: webhook subscriptions and their
    positions, API keys, and whatever features add later.

    A record is a JSON object (a dict of JSON values) filed under a
    C{kind} (C{"webhook-subscription"}, C{"api-key"} ...) and an C{id}
    unique within its kind.  That one shape is all a backend has to keep,
    so that a store shared by several gateway nodes (a Kafka compacted
    topic keyed by C{kind/id}, a database table) can implement it as well
    as the embedded SQLite store.  Typed views (L{evgate.webhook.records})
    live above this interface, not in it.

    Every method returns a Deferred that fires on the reactor thread; no
    method blocks the reactor.  Stores are also
    L{twisted.application.service.IService}s: they open on
    C{startService} and close on C{stopService}, and calls made before
    they are open wait for it.
    """

    description = Attribute("Where the records live, for logs (e.g. C{sqlite:/var/lib/evgate/evgate.sqlite}).")
    isOpen = Attribute("Whether the store can answer for every record now (bool): a store that follows a "
                       "log is open once it has read it up to its end; the others from start-up.")

    def get(kind, id):
        """
        The record C{id} of C{kind}, or L{None}.
        """

    def list(kind):
        """
        Every record of C{kind}: a list of C{(id, record)} sorted by id.
        """

    def create(kind, id, record):
        """
        Store C{record} as C{id} of C{kind} unless that id is taken.

        @return: a Deferred of whether it was stored (C{False}: taken).
        """

    def put(kind, id, record):
        """
        Store C{record} as C{id} of C{kind}, replacing any record there.
        """

    def update(kind, id, changes, increments=None):
        """
        Change some fields of a record atomically: set the top-level fields
        of C{changes} (a dict), and add each number of C{increments} (a dict
        of field to int) to the field's value (missing counts as 0).  Fields
        not named keep their value, so that writers of different fields
        (an operator pausing a subscription, a node moving its position)
        do not undo each other.

        @return: a Deferred of the record as it is after the change, or
            L{None} (and nothing written) when there is no such record.
        """

    def delete(kind, id):
        """
        Remove the record C{id} of C{kind}.

        @return: a Deferred of whether there was one.
        """


class IWatchableStore(IStore):
    """
    An L{IStore} that tells its users about changes as it learns of them,
    whichever node made them: a store that follows a log (the Kafka store)
    learns of every change anyway, so callers need not poll it.

    Optional: a user checks C{IWatchableStore.providedBy(store)} and falls
    back to reading the store from time to time when it is not provided
    (the SQLite store).
    """

    def watch(kind, callback):
        """
        Call C{callback(id, record)} on the reactor thread for every change
        of a record of C{kind} that happens after the store is open, in
        the order the store applies them; C{record} is a copy of the
        record as it is now, or L{None} once it is deleted.  Changes this
        node makes are reported too.

        @return: a callable that stops the calls.
        """


class IStreamFramer(Interface):
    """
    How one stream protocol (SSE, WebSocket) puts a stream on its
    connection: what the events, gaps and heartbeats of a subscriber become
    as bytes, and how the stream starts and says goodbye.  The subscriber
    that holds a framer (L{evgate.entrypoints.streaming.StreamSubscriber})
    owns everything else: queueing, backpressure, filters, limits and
    cursors.  Every method is called on the reactor thread.

    Frames are C{bytes}, complete units of the protocol that the subscriber
    may write in slices (a large frame is written a slice at a time while
    the transport takes it).  A message's frame is encoded once per wire
    format and cached on the L{evgate.hub.Event}, so every subscriber of
    that format holds the same bytes object; frames of notices (gap,
    advance, heartbeat) are made per subscriber.
    """

    def open(producer, cursor):
        """
        Start the stream at C{cursor} (response headers, a preamble, a
        greeting frame) and register C{producer} with the connection's
        transport if the protocol needs it.

        @return: whether the connection is there to stream to.
        """

    def event(event):
        """
        The frame of the L{evgate.hub.Event} C{event}: shared bytes.
        """

    def advance(cursor):
        """
        A frame moving the client's position to C{cursor} without a
        message, or L{None} when the protocol has none.
        """

    def gap(cursor, reason):
        """
        A frame telling the client that part of the stream is gone and
        reading resumes at C{cursor}, or L{None}.
        """

    def heartbeat():
        """
        A frame that carries nothing but proves the stream alive, or
        L{None} when the protocol keeps itself alive.
        """

    def write(data):
        """
        Write C{data} (frames, or a slice of one) to the connection;
        nothing once it is gone.
        """

    def writeFrom(frame, start):
        """
        Write the large frame C{frame} from offset C{start}, as much of it
        as the connection takes now, from views of the shared bytes (see
        L{evgate.directwrite}); the framer may pause the subscriber, as its
        transport would, until what it handed the transport is written.

        @return: the offset where the next write of C{frame} starts (its
            length once it was all written, or once the connection is gone).
        """

    def goodbye(reason, cursor):
        """
        End the connection for C{reason} (an
        L{evgate.entrypoints.streaming.Goodbye}), telling the client to
        resume from C{cursor} (an L{evgate.message.Cursor} or L{None})
        where the protocol can; without a goodbye frame when
        C{reason.midFrame} (a frame is half written: nothing may follow it).
        """


class ISchemaCodec(Interface):
    """
    One schema (Avro, Protobuf or JSON Schema), parsed once, that turns
    payloads into JSON values and JSON values into payloads
    (L{evgate.schemas}).  Payloads here are bare: the Confluent wire-format
    header is read and written around them by L{evgate.schemas.wire}.
    """

    schemaType = Attribute("C{AVRO}, C{PROTOBUF} or C{JSON}: the registry's name for the schema language.")
    indexes = Attribute("The Protobuf message-index array that encode writes; empty for the others.")

    def decode(payload, indexes=()):
        """
        The JSON value of C{payload} (for Protobuf, a message at
        C{indexes}).  Raises L{evgate.schemas.errors.DecodeError}.
        """

    def encode(value):
        """
        The payload of the JSON C{value}.  Raises
        L{evgate.schemas.errors.EncodeError}, whose C{pointer} names the
        value that does not fit.
        """


class IPublishStep(Interface):
    """
    One step of an API's publish pipeline (L{evgate.pipeline}): it turns
    the L{evgate.message.Draft} an entrypoint made into the draft the next
    step (and at the end, the connector) gets.  Built once per API from its
    configuration; called on the reactor thread, once per draft.
    """

    text = Attribute("The step as configured (for messages and logs).")
    line = Attribute("The line of the step in its key's value (1 for the first), or 0.")

    def onPublish(draft, call):
        """
        The draft that goes on, or a Deferred of it.  C{call} is the
        L{evgate.gateway.ApiCall} (the consumer and its claims).

        @raise evgate.errors.Problem: to refuse the message (a 400 naming
            the step, with a JSON Pointer into the content where one
            applies); nothing is published.
        """


class IDeliveryStep(Interface):
    """
    One step of an API's delivery pipeline (L{evgate.pipeline}): it turns a
    message read from the API's topic into what the API's readers see.
    Called once per message and API (the result is shared by every
    subscriber of the API), synchronously, on the reactor thread.
    """

    text = Attribute("The step as configured (for messages and logs).")
    line = Attribute("The line of the step in its key's value (1 for the first), or 0.")

    def onDeliver(message):
        """
        The L{evgate.message.Message} that goes on.

        @raise evgate.pipeline.StepError: when the step cannot apply to
            this message: the pipeline delivers the message as it was read,
            marked with the error (L{evgate.message.Message.error}); it is
            never dropped.
        """


class IPreparingDeliveryStep(IDeliveryStep):
    """
    A delivery step that sometimes needs to fetch something before it can
    answer synchronously (a schema decoder meeting a schema id for the
    first time).  The pipeline asks before a batch; the readers of the API
    wait (in order) for the Deferred, and the other APIs of the topic do
    not.
    """

    def prepare(message):
        """
        L{None} if L{onDeliver} can answer for C{message} now, else a
        Deferred that fires (with anything, or fails: the step then marks
        the message in L{onDeliver}) when it can.
        """
