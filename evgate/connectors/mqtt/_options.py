"""
MQTT topics and filters, and the options of C{type = mqtt5} endpoint and
API sections.
"""

from __future__ import annotations

import os
import ssl
import string
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

from evgate.errors import BadRequest
from evgate.ini import ApiContext, SectionReader, apiOptionParser
from evgate.message import Cursor
from evgate.secrets import resolvePath, secretOption

NO_OFFSET = -1

_MQTT_MAX_TOPIC_BYTES = 65535
_PUBLISH_ENTRYPOINTS = ("http-post", "websocket")
_SUBSCRIPTION_ID_MAX = 268435455

Start = Union[str, Cursor]


def hasWildcards(topic: str) -> bool:
    """
    Whether C{topic} is a filter with C{+} or C{#} rather than one concrete
    topic.
    """
    return "+" in topic or "#" in topic


def filterProblem(topic: str) -> Optional[str]:
    """
    What is wrong with the topic filter C{topic}, or L{None} when it is a
    valid MQTT 5 filter for a gateway API.
    """
    if not topic:
        return "must not be empty"
    if "\x00" in topic:
        return "must not contain NUL"
    if len(topic.encode("utf-8")) > _MQTT_MAX_TOPIC_BYTES:
        return f"is longer than {_MQTT_MAX_TOPIC_BYTES} bytes"
    if topic.startswith("$share/"):
        return "must not name a shared subscription ($share/...); the gateway adds share groups itself"
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return "may use # only as the whole last level (a/#)"
        if "+" in level and level != "+":
            return "may use + only as a whole level (a/+/c)"
    return None


def _matches(topicFilter: str, topic: str) -> bool:
    # MQTT 5 section 4.7: + matches one level, # the rest (and its parent);
    # filters starting with a wildcard do not match $-topics.
    if topic.startswith("$") and topicFilter[:1] in ("+", "#"):
        return False
    want = topicFilter.split("/")
    have = topic.split("/")
    for index, level in enumerate(want):
        if level == "#":
            return True
        if index >= len(have):
            return False
        if level != "+" and level != have[index]:
            return False
    return len(want) == len(have)


class TopicTemplate:
    """
    The C{publish-topic} of an API: a concrete topic, or one with a
    C{{key}} placeholder that the message key fills in (C{{{}} and C{}}}
    stand for literal braces).
    """

    def __init__(self, text: str) -> None:
        fields: List[str] = []
        try:
            for _, field, spec, conversion in string.Formatter().parse(text):
                if field is not None:
                    if field != "key" or spec or conversion:
                        raise ValueError(f"unknown placeholder {{{field}}}: only {{key}} is supported")
                    fields.append(field)
            literal = text.format(key="k")
        except ValueError as e:
            raise ValueError(str(e)) from None
        if hasWildcards(literal):
            raise ValueError("must be a concrete topic: + and # are filter wildcards")
        if "\x00" in literal or not literal:
            raise ValueError("must be a non-empty topic without NUL")
        self.text = text
        self.usesKey = bool(fields)
        self._static = literal

    def render(self, key: Optional[str]) -> str:
        """
        The concrete topic for a message with the key C{key}.

        @raise BadRequest: when the key is missing, not wanted, or would
            change the topic's levels.
        """
        if not self.usesKey:
            if key is not None:
                raise BadRequest(
                    f"MQTT messages carry no key, and this API's publish topic {self.text!r} does not "
                    "use {key}: send the message without a key")
            return self._static
        if key is None or key == "":
            raise BadRequest(f"this API publishes to {self.text!r}: the message key picks the topic, send one")
        for bad, what in (("/", "a topic level separator (/)"), ("+", "a wildcard (+)"),
                          ("#", "a wildcard (#)"), ("\x00", "NUL")):
            if bad in key:
                raise BadRequest(f"the message key fills one level of the topic {self.text!r} "
                                 f"and must not contain {what}")
        topic = self.text.format(key=key)
        if len(topic.encode("utf-8")) > _MQTT_MAX_TOPIC_BYTES:
            raise BadRequest(f"the topic for this key is longer than {_MQTT_MAX_TOPIC_BYTES} bytes")
        return topic

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TopicTemplate) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"TopicTemplate({self.text!r})"


@dataclass(frozen=True)
class MqttApiOptions:
    """
    The MQTT keys of one C{[api:NAME]} section, in C{ApiConfig.options["mqtt"]}.

    @ivar qos: the QoS of publishes and of the subscription (0, 1 or 2).
    @ivar retain: whether published messages are retained by the broker.
    @ivar publishTopic: where publishes go; L{None} means the API's topic.
    """

    qos: int = 1
    retain: bool = False
    publishTopic: Optional[TopicTemplate] = None

    def target(self, topic: str, key: Optional[str]) -> str:
        """
        The concrete topic a message with C{key} is published to on an API
        whose topic is C{topic}.

        @raise BadRequest: when no concrete topic follows.
        """
        if self.publishTopic is not None:
            return self.publishTopic.render(key)
        if hasWildcards(topic):
            raise BadRequest(f"this API's topic {topic!r} is a filter; publishing needs publish-topic "
                             "(a concrete topic or a template with {key})")
        if key is not None:
            raise BadRequest("MQTT messages carry no key: send the message without one, or give the API "
                             "a publish-topic template with {key}")
        return topic


DEFAULT_API_OPTIONS = MqttApiOptions()


def parseOptions(section: SectionReader) -> Mapping[str, Any]:
    """
    The options of an C{[endpoint:NAME]} section of C{type = mqtt5}.
    Every key is documented in docs/endpoints/mqtt5.md.
    """
    tls = section.getBool("tls", False)
    options: Dict[str, Any] = {
        "host": section.get("host", "127.0.0.1"),
        "port": section.getInt("port", 8883 if tls else 1883, minimum=1, maximum=65535),
        "username": section.get("username", None),
        "tls": tls,
        "client-id-prefix": section.get("client-id-prefix", "evgate-"),
        "keepalive": section.getInt("keepalive", 30, minimum=5, maximum=65535),
        "session-expiry": section.getInt("session-expiry", 120, minimum=0, maximum=4294967295),
        "connect-timeout": section.getFloat("connect-timeout", 5.0, minimum=0.1),
        "reconnect-min": section.getFloat("reconnect-min", 1.0, minimum=0.05),
        "reconnect-max": section.getFloat("reconnect-max", 30.0, minimum=0.05),
        "max-inflight": section.getInt("max-inflight", 20, minimum=1, maximum=65535),
        "paused-backlog": section.getInt("paused-backlog", 10000, minimum=1, maximum=10_000_000),
    }
    if not options["host"]:
        raise section.error("host", "must not be empty")
    if options["reconnect-max"] < options["reconnect-min"]:
        raise section.error("reconnect-max", "must be at least reconnect-min")
    prefix = options["client-id-prefix"]
    if len(prefix) > 40 or "/" in prefix or "+" in prefix or "#" in prefix:
        raise section.error("client-id-prefix", "use at most 40 characters, without / + #")
    password = secretOption(section, "password")
    if password is not None and options["username"] is None:
        raise section.error("password", "a password needs a username")
    options["password"] = password
    for key in ("tls-ca", "tls-cert", "tls-key"):
        value = section.get(key, None)
        if value is not None and not tls:
            raise section.error(key, "needs tls = true")
        if value is not None:
            value = resolvePath(section, key, value)
        if value is not None and not os.path.isfile(value):
            raise section.error(key, f"{value!r} is not a readable file")
        options[key] = value
    verify = section.getBool("tls-verify", True)
    if section.has("tls-verify") and not tls:
        raise section.error("tls-verify", "needs tls = true")
    options["tls-verify"] = verify
    if options["tls-key"] is not None and options["tls-cert"] is None:
        raise section.error("tls-key", "a client key needs tls-cert")
    if tls:
        try:
            tlsContext(options)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise section.error("tls", f"cannot set up TLS: {e}") from None
    return options


def tlsContext(options: Mapping[str, Any]) -> ssl.SSLContext:
    """
    The TLS client context of an endpoint's C{tls-*} options.
    """
    context = ssl.create_default_context(cafile=options.get("tls-ca"))
    if options.get("tls-cert"):
        context.load_cert_chain(options["tls-cert"], options.get("tls-key"))
    if not options.get("tls-verify", True):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@apiOptionParser
def parseApiOptions(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    The MQTT keys of an API on an C{mqtt5} endpoint: C{qos}, C{retain},
    C{publish-topic}.  APIs on other endpoints do not read them, so they are
    refused there as unknown keys.
    """
    if context.endpoint.type != "mqtt5":
        return {}
    topic = section.get("topic")
    problem = filterProblem(topic)
    if problem is not None:
        raise section.error("topic", f"{topic!r} {problem}")
    qos = section.getInt("qos", 1, minimum=0, maximum=2)
    retain = section.getBool("retain", False)
    template = section.getParsed("publish-topic", TopicTemplate)
    publishers = [ep for ep in context.entrypoints if ep in _PUBLISH_ENTRYPOINTS]
    if template is None and hasWildcards(topic) and publishers:
        raise section.error(
            "publish-topic",
            f"the topic {topic!r} is a filter, so {' and '.join(publishers)} need a concrete "
            "publish-topic or a template such as a/{key}/b")
    return {"mqtt": MqttApiOptions(qos=qos, retain=retain, publishTopic=template)}
