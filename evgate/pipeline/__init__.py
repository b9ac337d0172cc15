"""
The pipeline seam: what happens to a message between an API's entrypoints
and its connector, per API.

Shape
=====

An API's L{Pipeline} is built once, when the API is built
(L{buildPipeline}, from C{publish-steps} and C{deliver-steps} of its
section, see L{evgate.pipeline.syntax} and docs/transforms.md, and from
the registered codecs).  It holds two ordered lists of steps:

 - on publish, L{evgate.interfaces.IPublishStep}s, C{Draft -> Draft} (or a
   Deferred of one): entrypoint -> transform steps -> encoders ->
   connector.  A step refuses a message with a L{evgate.errors.Problem}
   (a 400 naming the step, with a JSON Pointer where one applies) and
   nothing is published;
 - on delivery, L{evgate.interfaces.IDeliveryStep}s, C{Message -> Message}:
   connector -> hub -> decoders -> transform steps -> filters -> framers.

Where delivery happens
======================

The hub shares one upstream read per (endpoint, topic) among every API on
that topic, and two APIs over one topic may transform it differently (one
hides a field another shows).  So the steps run where the hub hands a
batch to the subscribers of one API: L{evgate.hub.HubSubscription.offer}
calls the API's L{Pipeline.events}, which gives each shared
L{evgate.hub.Event} a derived event for this API, made once and cached on
the shared event (so on its replay window too).  Every subscriber of the
API gets that same derived event, and the frames entrypoints cache on it
(SSE, WebSocket, JSON page items, filter verdicts) are encoded once per
message and API.  Filters judge the transformed message.  Reads that do
not go through the hub (GET with a consumer group, webhook feeds of
Kafka groups and MQTT share groups) call the same L{Pipeline.events}.

An API without steps has no pipeline on its reads (C{Pipeline.hubView}
is L{None}) and publishes without one: it pays nothing per message.

Failures mark, never drop
=========================

A delivery step that raises L{StepError} (or fails in any other way) does
not drop the message: the reader gets the message as it was read, with
C{message.error} set to a L{evgate.message.MessageError}.  Every reader
shows it (docs/transforms.md): JSON items and envelopes carry an
C{"error"} member, SSE's text format sends C{event: message-error}, a
webhook sends it to the API's dead letters with the reason.  The stream
goes on.

Codecs: plugging in the schema decoder and encoder
==================================================

A codec is a factory registered with L{registerCodec}: given the API's
runtime it returns a L{Codec} (its C{decoder}, an
L{evgate.interfaces.IDeliveryStep}, runs before the configured delivery
steps; its C{encoder}, an L{evgate.interfaces.IPublishStep}, after the
configured publish steps) or L{None} when the API does not use it.  The
schema codec of L{evgate.schemas} plugs in with one line, in
C{evgate/schemas/__init__.py} or the module that builds its steps::

    registerCodec(schemaCodecFor)   # (api) -> Codec(decoder, encoder) or None

where C{decoder.onDeliver} uses C{SchemaDecoder.decodeKnown} and raises
L{StepError} with C{slug="decode-failed"} for a L{DecodeError}, and
C{decoder.prepare(message)} (L{evgate.interfaces.IPreparingDeliveryStep})
returns C{SchemaDecoder.decode}'s Deferred for a schema id it does not know
yet; C{encoder.onPublish} returns C{SchemaEncoder.encode}'s Deferred of the
new content, turning L{EncodeError} into a 400 with its pointer.
L{evgate.config.EXTENSION_MODULES} must list the module so that it is
imported.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface.verify import verifyClass, verifyObject

from evgate.interfaces import IDeliveryStep, IPreparingDeliveryStep, IPublishStep
from evgate.message import Draft, Message, MessageError
from evgate.replay import Event

__all__ = ["Codec", "Pipeline", "StepError", "buildPipeline", "registerCodec", "NO_PIPELINE"]

log = Logger()


class StepError(Exception):
    """
    A delivery step cannot apply to one message.

    @ivar detail: what went wrong.
    @ivar pointer: a JSON Pointer into the content, where that applies.
    @ivar slug: the problem type's last segment.
    """

    def __init__(self, detail: str, pointer: Optional[str] = None, slug: str = "transform-failed") -> None:
        super().__init__(detail)
        self.detail = detail
        self.pointer = pointer
        self.slug = slug


class Codec:
    """
    What a codec factory (L{registerCodec}) gives an API: a decoder that
    runs first on delivery, an encoder that runs last on publish (either
    may be L{None}).
    """

    def __init__(self, decoder: Optional[IDeliveryStep] = None, encoder: Optional[IPublishStep] = None) -> None:
        self.decoder = decoder
        self.encoder = encoder


CodecFactory = Callable[[Any], Optional[Codec]]
_codecs: List[CodecFactory] = []


def registerCodec(factory: CodecFactory) -> CodecFactory:
    """
    Register a codec factory: called with each API's runtime when it is
    built.  Usable as a decorator.
    """
    _codecs.append(factory)
    return factory


def markerOf(step: Any, error: Exception) -> MessageError:
    """
    The marker of a message on which C{step} failed with C{error}.
    """
    if isinstance(error, StepError):
        return MessageError(error.slug, step.text, step.line, error.detail, error.pointer)
    return MessageError("transform-failed", step.text, step.line,
                        f"{type(error).__name__}: {error}"[:300])


class Pipeline:
    """
    The ordered steps of one API.

    @ivar publishSteps: L{IPublishStep}s, in order (encoders last).
    @ivar deliverSteps: L{IDeliveryStep}s, in order (decoders first).
    @ivar hubView: what the API's subscribers give the hub
        (L{evgate.hub.Hub.subscribe}'s C{view}): this pipeline, or L{None}
        when it has no delivery step.
    """

    def __init__(self, publishSteps: Sequence[IPublishStep] = (),
                 deliverSteps: Sequence[IDeliveryStep] = (), api: str = "-") -> None:
        for publishStep in publishSteps:
            verifyObject(IPublishStep, publishStep)
        for deliverStep in deliverSteps:
            verifyObject(IDeliveryStep, deliverStep)
        self.api = api
        self.publishSteps: Tuple[IPublishStep, ...] = tuple(publishSteps)
        self.deliverSteps: Tuple[IDeliveryStep, ...] = tuple(deliverSteps)
        self.preparing = tuple(s for s in self.deliverSteps if IPreparingDeliveryStep.providedBy(s))
        self.hubView: Optional[Pipeline] = self if deliverSteps else None
        # Request header prefixes the publish steps read, kept whole by
        # HTTP POST (CloudEvents' ce- headers in binary mode).
        kept = {p for s in self.publishSteps for p in getattr(s, "requestHeaders", ())}
        self.requestHeaders: Tuple[bytes, ...] = tuple(sorted(kept))
        # The last batch in and out: every subscriber of the API is offered
        # the same batch object in turn, and gets the same list back.
        self._lastIn: Any = None
        self._lastOut: List[Event] = []

    # delivery

    def deliver(self, message: Message) -> Message:
        """
        C{message} through the delivery steps; marked with the first
        failure, with the content as it was read.
        """
        current = message
        for step in self.deliverSteps:
            try:
                current = step.onDeliver(current)
            except Exception as e:
                if not isinstance(e, StepError):
                    log.failure("{api}: delivery step {step!r} failed on {topic}/{partition}@{offset}",
                                api=self.api, step=step.text, topic=message.topic,
                                partition=message.partition, offset=message.offset)
                return message._replace(error=markerOf(step, e))
        return current

    def events(self, batch: Sequence[Event]) -> List[Event]:
        """
        This API's events for the shared events of C{batch}: each made
        once per message (cached on the shared event) and the same list for
        every subscriber offered the same batch.
        """
        if batch is self._lastIn:
            return self._lastOut
        out: List[Event] = []
        append = out.append
        for event in batch:
            frames = event.frames
            mine = frames.get(self)
            if mine is None:
                mine = frames[self] = Event(self.deliver(event.message), event.cursor)
            append(mine)
        self._lastIn = batch
        self._lastOut = out
        return out

    def ready(self, batch: Sequence[Event]) -> Optional[Deferred]:
        """
        L{None} when every step can transform C{batch} now; else a
        Deferred that fires when it can (a decoder fetching a schema).
        """
        if not self.preparing:
            return None
        waits: List[Deferred] = []
        for event in batch:
            if self in event.frames:
                continue
            for step in self.preparing:
                d = step.prepare(event.message)  # type: ignore[attr-defined]
                if d is not None:
                    waits.append(d)
        if not waits:
            return None
        return gatherResults(waits, consumeErrors=True).addErrback(lambda _: None)

    # publish

    def publish(self, draft: Draft, call: Any) -> "Deferred[Draft]":
        """
        C{draft} through the publish steps: a Deferred of the draft to
        publish, which fails with the L{evgate.errors.Problem} of a step
        that refuses it.
        """
        d: Deferred = succeed(draft)
        for step in self.publishSteps:
            d.addCallback(_publishOne, step, call)
        return d

    def publishMany(self, drafts: Sequence[Draft], call: Any) -> "Deferred[List[Draft]]":
        """
        Every draft of a batch through L{publish}; fails with the first
        refusal (naming the record's index).
        """
        def one(index: int, draft: Draft) -> Deferred:
            def refused(failure: Any) -> Any:
                problem = failure.value
                if hasattr(problem, "extra"):
                    problem.extra.setdefault("index", index)
                return failure
            return self.publish(draft, call).addErrback(refused)

        def first(failure: Failure) -> Failure:
            return failure.value.subFailure  # type: ignore[union-attr,no-any-return]

        d: Deferred = gatherResults([one(i, draft) for i, draft in enumerate(drafts)], consumeErrors=True)
        d.addErrback(first)
        return d


def _publishOne(draft: Draft, step: IPublishStep, call: Any) -> Deferred:
    return maybeDeferred(step.onPublish, draft, call)


NO_PIPELINE = Pipeline()


def buildPipeline(api: Any) -> Pipeline:
    """
    The pipeline of the API runtime C{api}: its configured steps (parsed
    with its configuration) between the codecs registered for it.
    """
    options = api.config.options
    publish: List[IPublishStep] = list(options.get("publishSteps", ()))
    deliver: List[IDeliveryStep] = list(options.get("deliverSteps", ()))
    for factory in _codecs:
        codec = factory(api)
        if codec is None:
            continue
        if codec.decoder is not None:
            deliver.insert(0, codec.decoder)
        if codec.encoder is not None:
            publish.append(codec.encoder)
    if not publish and not deliver:
        return NO_PIPELINE
    return Pipeline(publish, deliver, api.config.name)


def checkStepClass(cls: type) -> type:
    """
    Verify that a step class provides what it declares (registration runs
    C{verifyClass}, as for every seam).
    """
    for iface in (IPublishStep, IDeliveryStep):
        if iface.implementedBy(cls):
            verifyClass(iface, cls)
    return cls

