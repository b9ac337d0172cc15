"""
The options of a C{type = kafka} endpoint: evgate's own keys, the librdkafka
properties evgate manages or defaults, and the check of a section against
librdkafka itself.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from evgate.ini import SectionReader
from evgate.schemas.config import registryOptions
from evgate.secrets import CREDENTIAL_PREFIXES, readSecretText, resolvePath

# evgate's own keys: hyphenated, which no librdkafka property is, so they
# can never shadow one.  Name -> (default, description for errors).
OWN_DEFAULTS: Dict[str, Any] = {
    "request-timeout": 5.0,
    "poll-timeout": 0.2,
    "batch-size": 500,
    "batches-in-flight": 2,
    "shutdown-timeout": 5.0,
    "group-prefix": "evgate",
    "group-idle-timeout": 60.0,
    "retry-after": 1,
}

# <librdkafka property>-file reads the property's value from a file.
FILE_SUFFIX = "-file"
# librdkafka properties that name files; a systemd credential may stand for
# one (credential:NAME, see evgate.secrets).
_PATH_SUFFIXES = (".location", ".keytab")

_GROUP_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,100}")

# librdkafka properties evgate decides itself; setting them would break a
# guarantee, so the configuration refuses them by name.
MANAGED_KEYS: Dict[str, str] = {
    "group.id": "evgate names its consumer groups itself (see group-prefix)",
    "group.instance.id": "every group-mode reader is its own member; a static id would be shared by all of them",
    "enable.auto.commit": "evgate commits group positions itself, after each response is written",
    "auto.commit.enable": "evgate commits group positions itself, after each response is written",
    "enable.auto.offset.store": "evgate stores group positions itself",
    "auto.offset.reset": "the API's start key and the clients' cursors decide where reading starts",
    "enable.partition.eof": "evgate's readers rely on it being off",
    "delivery.report.only.error": "evgate needs every delivery report to answer publishers",
    "transactional.id": "evgate does not publish in transactions",
    "log.queue": "evgate routes librdkafka's log lines itself",
}

# Python callbacks of confluent-kafka; an INI can only give them strings.
_CALLBACK_KEY = re.compile(r"(_cb|^on_delivery|^on_commit|^logger)$")

# evgate's defaults for librdkafka properties, applied unless the section
# sets the property or one of its aliases.
PRODUCER_DEFAULTS: Dict[str, str] = {
    # A publish waits at most this long for its delivery report: this is the
    # bound on a 503 when the broker is down.  Keep it below [gateway]
    # publish-timeout so that librdkafka answers before the gateway gives up.
    "message.timeout.ms": "5000",
    # Fail a publish to a topic that does not exist (and that the broker will
    # not create) after 1 s, as a 503, rather than as a timeout.
    "topic.metadata.propagation.max.ms": "1000",
    # librdkafka's default buffers up to 1 GB of unsent messages; a gateway
    # answers 503 (queue full) long before that.
    "queue.buffering.max.kbytes": "65536",
    # Brokers coming back are noticed within 2 s rather than 10 s.
    "reconnect.backoff.max.ms": "2000",
    # Statistics tell whether any broker is up (the connected attribute).
    "statistics.interval.ms": "5000",
    # Every publish waits for its delivery report, so the producer's wait
    # for more messages to batch is part of every answer's latency, and it
    # bounded a publisher with a fixed number of requests in flight: 50
    # connections made 5,400-6,000 req/s with librdkafka's 5 ms, 6,200-8,000
    # with 1 ms (bench/publish, one process).  Under load batches still fill
    # while a produce request is under way.
    "linger.ms": "1",
}

CONSUMER_DEFAULTS: Dict[str, str] = {
    # Prefetch per consumer: one reader per subscription, so keep it modest.
    "queued.max.messages.kbytes": "16384",
    "reconnect.backoff.max.ms": "2000",
}

_ALIASES: Dict[str, Tuple[str, ...]] = {
    "message.timeout.ms": ("delivery.timeout.ms",),
    "linger.ms": ("queue.buffering.max.ms",),
    "queue.buffering.max.kbytes": (),
    "topic.metadata.propagation.max.ms": (),
    "reconnect.backoff.max.ms": (),
    "statistics.interval.ms": (),
    "queued.max.messages.kbytes": (),
}

# The placeholder group of assign-mode readers: librdkafka wants a group.id
# on every consumer, but a reader that only assigns never joins it.
READER_GROUP = "evgate.reader"


def _withDefaults(defaults: Mapping[str, str], settings: Mapping[str, str]) -> Dict[str, str]:
    config: Dict[str, str] = {}
    for key, value in defaults.items():
        if key in settings or any(alias in settings for alias in _ALIASES.get(key, ())):
            continue
        config[key] = value
    config.update(settings)
    return config


def producerSettings(librdkafka: Mapping[str, str]) -> Dict[str, str]:
    """
    The librdkafka configuration of an endpoint's producer: evgate's
    defaults overridden by the section's keys.
    """
    return _withDefaults(PRODUCER_DEFAULTS, librdkafka)


def consumerSettings(librdkafka: Mapping[str, str], group: Optional[str] = None,
                     start: str = "latest") -> Dict[str, str]:
    """
    The librdkafka configuration of a reader: an assign-mode reader when
    C{group} is L{None}, else a member of C{group} that starts at C{start}
    when the group has no position yet.
    """
    config = _withDefaults(CONSUMER_DEFAULTS, librdkafka)
    config.update({
        "group.id": group if group is not None else READER_GROUP,
        "enable.auto.commit": "false",
        "enable.auto.offset.store": "false",
        "enable.partition.eof": "false",
        # Assign mode seeks itself and wants to hear about offsets that are
        # gone (to report a gap) rather than have librdkafka jump silently.
        "auto.offset.reset": start if group is not None else "error",
    })
    if "statistics.interval.ms" not in librdkafka:
        config["statistics.interval.ms"] = "0"
    return config


def _confluent(section: Optional[SectionReader] = None) -> Any:
    # Imported when first needed rather than at the top: reading the
    # configuration of a gateway without a Kafka endpoint should not pay
    # for loading librdkafka.
    try:
        import confluent_kafka
    except ImportError:  # pragma: no cover - a dependency of evgate
        if section is None:
            raise
        raise section.error("type", "type = kafka needs the confluent-kafka package") from None
    return confluent_kafka


class _DiscardLog:
    """
    A librdkafka logger that drops everything (for configuration checks).
    """

    def log(self, level: int, fmt: str, *args: Any) -> None:
        pass


def parseOptions(section: SectionReader) -> Mapping[str, Any]:
    """
    The options of a C{[endpoint:NAME]} section of C{type = kafka}.

    C{bootstrap.servers} is required; evgate's own keys are hyphenated
    (see L{OWN_DEFAULTS}); every other key goes to librdkafka as it is, and
    librdkafka checks them here, so that a misspelt property stops the
    gateway at start-up (and C{--check}) with the file, section and key.

    @raise ConfigError: on any mistake.
    """
    for key in MANAGED_KEYS:
        if section.has(key):
            raise section.error(key, f"is managed by evgate and cannot be set: {MANAGED_KEYS[key]}")
    options: Dict[str, Any] = {
        "request-timeout": section.getFloat("request-timeout", OWN_DEFAULTS["request-timeout"], minimum=0.1),
        "poll-timeout": section.getFloat("poll-timeout", OWN_DEFAULTS["poll-timeout"], minimum=0.01),
        "batch-size": section.getInt("batch-size", OWN_DEFAULTS["batch-size"], minimum=1, maximum=100000),
        "batches-in-flight": section.getInt("batches-in-flight", OWN_DEFAULTS["batches-in-flight"],
                                            minimum=1, maximum=100),
        "shutdown-timeout": section.getFloat("shutdown-timeout", OWN_DEFAULTS["shutdown-timeout"], minimum=0.0),
        "group-prefix": section.get("group-prefix", OWN_DEFAULTS["group-prefix"]),
        "group-idle-timeout": section.getFloat("group-idle-timeout", OWN_DEFAULTS["group-idle-timeout"],
                                               minimum=1.0),
        "retry-after": section.getInt("retry-after", OWN_DEFAULTS["retry-after"], minimum=0, maximum=3600),
    }
    if options["poll-timeout"] > 5:
        raise section.error("poll-timeout", "must be at most 5 seconds: it bounds how fast readers react")
    if not _GROUP_PREFIX.fullmatch(options["group-prefix"]):
        raise section.error("group-prefix", "use 1 to 100 letters, digits, '.', '_' or '-'")
    # The schema-registry* keys are the schema layer's; read here so that
    # section.rest() below does not take them for librdkafka properties.
    options["schema-registry"] = registryOptions(section)
    servers = section.get("bootstrap.servers")
    librdkafka = section.rest()
    for key in list(librdkafka):
        if _CALLBACK_KEY.search(key):
            raise section.error(key, "is a confluent-kafka callback, which a configuration file cannot set")
        if key.endswith(FILE_SUFFIX) and "-" not in key[:-len(FILE_SUFFIX)]:
            _readPropertyFile(section, key, librdkafka)
        elif "-" in key:
            raise section.error(key, "unknown key (evgate's own keys are: "
                                     + ", ".join(sorted(OWN_DEFAULTS)) + ", and <librdkafka property>-file)")
        elif key.endswith(_PATH_SUFFIXES) and librdkafka[key].startswith(CREDENTIAL_PREFIXES):
            # Other values go to librdkafka as written (ssl.ca.location =
            # probe, paths relative to the working directory).
            librdkafka[key] = resolvePath(section, key, librdkafka[key])
    librdkafka["bootstrap.servers"] = servers
    checkWithLibrdkafka(section, librdkafka)
    options["librdkafka"] = MappingProxyType(librdkafka)
    options["source"] = f"{section.path} [{section.name}]"
    return MappingProxyType(options)


def _readPropertyFile(section: SectionReader, key: str, librdkafka: Dict[str, str]) -> None:
    # <property>-file: the property's value is the content of the file (a
    # secret: sasl.password, ssl.key.password, sasl.oauthbearer.client.secret,
    # ssl.key.pem ...), read with evgate.secrets.
    name = key[:-len(FILE_SUFFIX)]
    if name in librdkafka:
        raise section.error(key, f"set {name} or {key}, not both")
    if name in MANAGED_KEYS or name == "bootstrap.servers":
        raise section.error(key, f"{name} cannot be read from a file")
    del librdkafka[key]
    librdkafka[name] = readSecretText(section, key)


_PROPERTY_NAME = re.compile(r"[\"`]([a-z0-9_.]+)[\"`]")


def checkWithLibrdkafka(section: SectionReader, librdkafka: Mapping[str, str]) -> None:
    """
    Build (and at once destroy) a producer and a consumer with C{librdkafka}
    but no bootstrap servers, so that librdkafka refuses unknown properties
    and bad values without connecting anywhere.

    @raise ConfigError: naming the key librdkafka refused.
    """
    ck = _confluent(section)
    settings = {k: v for k, v in librdkafka.items() if k != "bootstrap.servers"}
    checks: List[Tuple[str, Callable[[Dict[str, Any]], Any], Dict[str, Any]]] = [
        ("producer", ck.Producer, producerSettings(settings)),
        ("consumer", ck.Consumer, consumerSettings(settings)),
    ]
    for role, make, config in checks:
        config.pop("bootstrap.servers", None)
        config["logger"] = _DiscardLog()
        try:
            client = make(config)
        except (ck.KafkaException, ValueError, TypeError) as e:
            message = _kafkaReason(e)
            raise section.error(_culprit(make, message, settings, role),
                                f"librdkafka refuses the {role} configuration: {message}"
                                + _defaultsHint(message, role)) from None
        if role == "consumer":
            client.close()
        del client


def _kafkaReason(exception: BaseException) -> str:
    if exception.args and hasattr(exception.args[0], "str"):
        text = exception.args[0].str()
    else:
        text = str(exception)
    for prefix in ("Failed to create producer: ", "Failed to create consumer: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def _culprit(make: Callable[[Dict[str, Any]], Any], message: str, settings: Mapping[str, str],
             role: str) -> Optional[str]:
    # The key the section wrote, which may be an alias of the property
    # librdkafka names (linger.ms is queue.buffering.max.ms to it).
    for name in _PROPERTY_NAME.findall(message):
        if name in settings:
            return name
    for key, value in settings.items():
        alone: Dict[str, Any] = {key: value, "logger": _DiscardLog()}
        if role == "consumer":
            alone["group.id"] = READER_GROUP
        try:
            client = make(alone)
        except Exception:
            return key
        if role == "consumer":
            client.close()
        del client
    return None


def _defaultsHint(message: str, role: str) -> str:
    defaults = PRODUCER_DEFAULTS if role == "producer" else CONSUMER_DEFAULTS
    named = [name for name in _PROPERTY_NAME.findall(message) if name in defaults]
    if not named:
        return ""
    return " (evgate sets " + ", ".join(f"{n} = {defaults[n]}" for n in named) + " unless the section sets it)"
