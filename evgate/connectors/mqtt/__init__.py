"""
The MQTT 5 endpoint (C{type = mqtt5}) on paho-mqtt.

Threads
=======

paho's client runs its network loop on a thread of its own
(C{loop_start()}), which also does the blocking parts: DNS, the TCP connect,
the TLS handshake and the reconnect back-off.  Every paho callback does one
thing only: it turns what paho hands it into plain values and appends them
to an L{_Inbox}, which hops to the reactor with C{callFromThread} once per
batch.  The reactor thread then does everything else in the order the
events happened (connects, acknowledgements, messages): numbering, logging,
firing Deferreds.  The reactor thread calls paho only through its
thread-safe entry points (C{publish}, C{subscribe}, C{unsubscribe},
C{disconnect}), which queue a packet and wake the loop; nothing is ever
published from paho's thread.

Numbering: one MQTT subscription per topic filter
=================================================

MQTT keeps no log: a message exists for a subscriber only at the moment the
broker hands it over.  To give cursors a meaning, the connector numbers the
messages it receives.  It holds I{one} MQTT subscription per (share group,
topic filter) -- a L{_Feed} -- shared by every upstream subscription of that
filter (the hub's shared stream and any private stream), and numbers each
message once, on the reactor thread, as it arrives on that feed: partition
0, offsets 0, 1, 2 ...  Every reader of a filter therefore sees a message
under the same offset, so a cursor minted by the hub's shared stream means
the same thing to a private stream.  (One MQTT subscription per reader
with a shared counter could not do that: each reader would get its own copy
of a message at its own moment, and there is no way to tell which copies
are the same message.)

The numbers are only meaningful within one run of the connector, which is
why every cursor carries the connector's I{epoch}, random per start.  A
feed's counter survives the feed (the last reader leaving unsubscribes) and
jumps by one whenever continuity is broken -- a new MQTT subscription for a
filter that had one before, a reconnect whose session the broker did not
keep, a reconnect of a QoS 0 subscription -- so that a cursor taken before
the break can never look as if it missed nothing: the hub finds it outside
its window and the client is told about the gap.

A cursor from outside the hub's window (or from another epoch) cannot be
replayed: L{MqttConnector.subscribe} starts such a reader at the live head
and reports the gap with C{sink.gap}, never silently.

See docs/endpoints/mqtt5.md for what this promises to clients.

Modules
=======

The package's modules are private; this module is its public face:
C{_options} (topics, filters, endpoint and API options), C{_paho} (what
crosses from paho's thread, and the client), C{_feeds} (L{MqttSubscription}
and the feeds it reads) and C{_connector} (L{MqttConnector}).
"""

from evgate.connectors.mqtt._connector import BATCH, MqttConnector
from evgate.connectors.mqtt._feeds import MqttSubscription
from evgate.connectors.mqtt._options import (
    DEFAULT_API_OPTIONS,
    NO_OFFSET,
    MqttApiOptions,
    TopicTemplate,
    _matches,
    filterProblem,
    hasWildcards,
    parseApiOptions,
    parseOptions,
    tlsContext,
)
from evgate.connectors.mqtt._paho import pahoClient

__all__ = [
    "BATCH", "DEFAULT_API_OPTIONS", "NO_OFFSET", "MqttApiOptions", "MqttConnector", "MqttSubscription",
    "TopicTemplate", "_matches", "filterProblem", "hasWildcards", "pahoClient", "parseApiOptions", "parseOptions",
    "tlsContext",
]

# The classes keep the module name they had before the package was split:
# a class's Logger takes its namespace from it, and operators filter logs
# by namespace.
for _public in (MqttApiOptions, MqttConnector, MqttSubscription, TopicTemplate):
    _public.__module__ = __name__
del _public
