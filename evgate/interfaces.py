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
    kind = Attribute("The endpoint type: memory, kafka or mqtt5.")
    connected = Attribute("Whether the broker is reachable now (bool).")

    def publish(topic, draft, timeout):
        """
        Publish the L{evgate.message.Draft} C{draft} to C{topic}.

        @param timeout: seconds to wait for the broker's acknowledgement.
        @return: a Deferred that fires on the reactor thread with the
            L{evgate.message.Position} the broker acknowledged, or fails with
            L{evgate.errors.EndpointUnavailable} /
            L{evgate.errors.EndpointTimeout}.
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

    def accepts(request):
        """
        Whether C{request} is for this entrypoint (method, headers).
        """

    def render(request, call):
        """
        Serve C{request} like L{twisted.web.resource.IResource.render};
        C{call} is the authenticated L{evgate.gateway.ApiCall}.
        """


class IPlan(Interface):
    """
    A way to authenticate a caller of an API.
    """

    name = Attribute("The plan's name in the API's C{plans} key.")

    def present(request):
        """
        Whether C{request} carries credentials of this plan.
        """

    def authenticate(request):
        """
        Check the credentials of this plan in C{request}.

        @return: a Deferred firing with an L{evgate.gateway.Consumer}, or
            failing with L{evgate.errors.Unauthorized} /
            L{evgate.errors.Forbidden}.
        """
