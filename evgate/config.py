"""
evgate.ini, read into a frozen model.

The file is a configparser INI with interpolation off.  Sections:

 - C{[gateway]}: listeners and limits of the whole process;
 - C{[endpoint:NAME]}: one broker connection (C{type} picks the connector);
 - C{[api:NAME]}: one API (a path on the gateway, bound to an endpoint topic).

Every mistake raises L{ConfigError}, whose text names the file, the section
and the key, so that start-up can stop with one line the operator can act on.
docs/configuration.md documents every key read here.
"""

from __future__ import annotations

import configparser
import importlib
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Mapping, Tuple

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from evgate.connectors.kafka import parseOptions as kafkaOptions
from evgate.connectors.mqtt import parseOptions as mqttOptions
from evgate.ini import (
    REQUIRED,
    ApiContext,
    ApiOptionParser,
    ConfigError,
    EndpointConfig,
    GatewayConfig,
    GatewayKeyParser,
    SectionReader,
    _apiOptionParsers,
    _gatewayKeyParsers,
    apiOptionParser,
    gatewayKeys,
)
from evgate.proxy.endpoint import parseOptions as httpOptions

__all__ = [
    # The INI primitives live in evgate.ini; they are importable from here
    # as they always were.
    "REQUIRED", "ApiContext", "ApiOptionParser", "ConfigError", "EndpointConfig", "GatewayConfig",
    "SectionReader", "apiOptionParser",
    "ENTRYPOINT_NAMES", "PLAN_NAMES", "START_CHOICES", "ApiConfig", "Config", "EndpointParser",
    "EXTENSION_MODULES", "GatewayKeyParser", "endpointParsers", "gatewayKeys", "loadConfig", "parseConfig",
]


ENTRYPOINT_NAMES = ("http-post", "http-get", "sse", "websocket", "webhook", "http-proxy")
PLAN_NAMES = ("keyless", "api-key", "jwt", "oauth2", "mtls")
START_CHOICES = ("latest", "earliest")

_API_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ApiConfig:
    """
    One C{[api:NAME]} section.
    """

    name: str
    path: str
    endpoint: str
    topic: str
    entrypoints: Tuple[str, ...]
    plans: Tuple[str, ...] = ("keyless",)
    start: str = "latest"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """
    The whole configuration file.
    """

    path: str
    gateway: GatewayConfig
    endpoints: Mapping[str, EndpointConfig]
    apis: Mapping[str, ApiConfig]
    # The text of every section as read ({section: {key: value}}), which a
    # reload compares with the running one (evgate.reload).
    sections: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


EndpointParser = Callable[[SectionReader], Mapping[str, Any]]


def _memoryOptions(section: SectionReader) -> Mapping[str, Any]:
    return {"retention": section.getInt("retention", 10000, minimum=1, maximum=10_000_000)}


def endpointParsers() -> Dict[str, EndpointParser]:
    """
    The option parser of every endpoint type, by type name.
    """
    return {"memory": _memoryOptions, "kafka": kafkaOptions, "mqtt5": mqttOptions, "http": httpOptions}


# Modules that register more keys with apiOptionParser / gatewayKeys when
# imported; parseConfig imports them first.
EXTENSION_MODULES: Tuple[str, ...] = (
    "evgate.filters",
    "evgate.entrypoints.streaming",
    "evgate.entrypoints.queues",
    "evgate.connections",
    "evgate.cors",
    "evgate.entrypoints.http_post",
    "evgate.connectors.mqtt",
    "evgate.security.apikey",
    "evgate.security.jwt",
    "evgate.security.oauth2",
    "evgate.security.mtls",
    "evgate.security.mtls_listener",
    "evgate.security.limits",
    "evgate.store",
    "evgate.entrypoints.webhook",
    "evgate.webhook.client",
    "evgate.admin.app",
    "evgate.portal",
    "evgate.logs",
    "evgate.proxy.entrypoint",
    "evgate.schemas.config",
    "evgate.schemas.steps",
    "evgate.pipeline.syntax",
)


def _loadExtensions() -> None:
    for name in EXTENSION_MODULES:
        importlib.import_module(name)


def _checkListen(section: SectionReader, key: str, description: str) -> None:
    if description.startswith("systemd:"):
        if not re.search(r"(^|:)index=\d+", description):
            raise section.error(key, f"{description!r}: systemd listeners need index=N")
        return
    if description.split(":", 1)[0].lower() == "mtls":
        # evgate's own TLS listener, read with its files by
        # evgate.security.mtls_listener.
        return
    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:  # the parser raises many kinds; all mean a bad string
        raise section.error(key, f"bad endpoint {description!r}: {e}") from None


def _gatewayConfig(parser: configparser.ConfigParser, path: str) -> GatewayConfig:
    values = parser["gateway"] if parser.has_section("gateway") else {}
    section = SectionReader(path, "gateway", values)
    listen = section.getList("listen", "tcp:8080")
    if not listen:
        raise section.error("listen", "needs at least one endpoint string")
    for description in listen:
        _checkListen(section, "listen", description)
    config = GatewayConfig(
        listen=listen,
        maxMessageBytes=section.getInt("max-message-bytes", 1048576, minimum=1, maximum=64 * 1024 * 1024),
        maxPollTimeout=section.getInt("max-poll-timeout", 30000, minimum=0, maximum=600000),
        maxPollLimit=section.getInt("max-poll-limit", 1000, minimum=1, maximum=100000),
        publishTimeout=section.getFloat("publish-timeout", 10.0, minimum=0.1),
        headerPrefix=section.get("header-prefix", "X-Message-Header-"),
        keyHeader=section.get("key-header", "X-Message-Key"),
        replayWindow=section.getInt("replay-window", 10000, minimum=0, maximum=10_000_000),
        subscriberQueue=section.getInt("subscriber-queue", 1000, minimum=1, maximum=10_000_000),
        accessLog=section.getBool("access-log", False),
        workers=section.getInt("workers", 1, minimum=1, maximum=64),
    )
    if config.workers > 1:
        for description in listen:
            if description.split(":", 1)[0] not in ("tcp", "tcp6", "systemd"):
                raise section.error("workers", f"workers share plain TCP listeners only; {description!r} is not "
                                    "one (for TLS, terminate it in front of evgate; or run one process)")
    config = replace(config, options=_extraGatewayKeys(section))
    section.finish()
    return config


def _extraGatewayKeys(section: SectionReader) -> Dict[str, Any]:
    options: Dict[str, Any] = {}
    for parser in _gatewayKeyParsers:
        options.update(parser(section) or {})
    return options


def _endpointConfig(path: str, name: str, values: Mapping[str, str]) -> EndpointConfig:
    section = SectionReader(path, f"endpoint:{name}", values)
    parsers = endpointParsers()
    kind = section.getChoice("type", sorted(parsers))
    options = parsers[kind](section)
    section.finish()
    return EndpointConfig(name=name, type=kind, options=options)


def _apiConfig(path: str, name: str, values: Mapping[str, str], gateway: GatewayConfig,
               endpoints: Mapping[str, EndpointConfig]) -> ApiConfig:
    section = SectionReader(path, f"api:{name}", values)
    apiPath = section.get("path")
    if not _API_PATH.match(apiPath) or ".." in apiPath.split("/"):
        raise section.error(
            "path",
            f"{apiPath!r} is not a context path: use /segments of letters, digits and ._~- "
            "without a trailing slash",
        )
    endpointName = section.get("endpoint")
    if endpointName not in endpoints:
        known = ", ".join(sorted(endpoints)) or "none"
        raise section.error("endpoint", f"unknown endpoint {endpointName!r} (known: {known})")
    # A proxy API forwards requests: it has no topic.
    topic = section.get("topic", "" if "http-proxy" in section.getList("entrypoints", ()) else REQUIRED)
    entrypoints = section.getList("entrypoints")
    if not entrypoints:
        raise section.error("entrypoints", "needs at least one entrypoint")
    for ep in entrypoints:
        if ep not in ENTRYPOINT_NAMES:
            raise section.error("entrypoints", f"unknown entrypoint {ep!r} (known: {' '.join(ENTRYPOINT_NAMES)})")
    plans = section.getList("plans", "keyless")
    if not plans:
        raise section.error("plans", "needs at least one plan")
    for plan in plans:
        if plan not in PLAN_NAMES:
            raise section.error("plans", f"unknown plan {plan!r} (known: {' '.join(PLAN_NAMES)})")
    start = section.getChoice("start", START_CHOICES, "latest")
    context = ApiContext(gateway, endpoints[endpointName], entrypoints, plans)
    options: Dict[str, Any] = {}
    for parser in _apiOptionParsers:
        options.update(parser(section, context))
    section.finish()
    return ApiConfig(
        name=name, path=apiPath, endpoint=endpointName, topic=topic, entrypoints=entrypoints,
        plans=plans, start=start, options=options,
    )


def parseConfig(text: str, path: str = "<string>") -> Config:
    """
    Parse the text of an evgate.ini.

    @raise ConfigError: on any mistake.
    """
    _loadExtensions()
    # "key = value ; comment" is a comment after whitespace, as in the
    # examples users copy; "#" is not, because MQTT topic filters use it.
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00no-defaults",
                                       inline_comment_prefixes=(";",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(path, e.section, None, f"section appears twice (line {e.lineno})") from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(path, e.section, e.option, f"key appears twice (line {e.lineno})") from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(path, None, None, f"line {e.lineno}: text before the first [section]") from None
    except configparser.ParsingError as e:
        # configparser's own message names the source but no line; the
        # first line it could not read is what the operator has to find.
        # (It keeps each bad line as its repr.)
        lineno, line = e.errors[0] if e.errors else (0, "''")
        text = line[1:-1].replace("\\n", "").strip() if line[:1] in ("'", '"') else line.strip()
        raise ConfigError(path, None, None, f"line {lineno}: not a key = value, [section] or comment: "
                                            f"{text[:80]}") from None
    except configparser.Error as e:
        raise ConfigError(path, None, None, str(e).splitlines()[0]) from None

    for name in parser.sections():
        if name == "gateway":
            continue
        kind, _, rest = name.partition(":")
        if kind not in ("endpoint", "api") or not rest:
            raise ConfigError(path, name, None,
                              "unknown section (expected [gateway], [endpoint:NAME] or [api:NAME])")
        if not _NAME.match(rest):
            raise ConfigError(path, name, None, f"{rest!r} is not a valid name (letters, digits, . _ -)")

    gateway = _gatewayConfig(parser, path)
    endpoints: Dict[str, EndpointConfig] = {}
    for name in parser.sections():
        if name.startswith("endpoint:"):
            endpoints[name[9:]] = _endpointConfig(path, name[9:], parser[name])
    apis: Dict[str, ApiConfig] = {}
    paths: Dict[str, str] = {}
    for name in parser.sections():
        if name.startswith("api:"):
            api = _apiConfig(path, name[4:], parser[name], gateway, endpoints)
            if api.path in paths:
                raise ConfigError(path, name, "path", f"{api.path} is already the path of [api:{paths[api.path]}]")
            paths[api.path] = api.name
            apis[api.name] = api
    if not apis:
        raise ConfigError(path, None, None, "no [api:NAME] section: nothing to serve")
    store: Any = gateway.options.get("store")
    if store is not None and store.kind == "kafka":
        # [gateway] is read before the endpoints; check its reference now.
        target = endpoints.get(store.endpoint)
        if target is None:
            raise ConfigError(path, "gateway", "store", f"there is no [endpoint:{store.endpoint}]")
        if target.type != "kafka":
            raise ConfigError(path, "gateway", "store",
                              f"[endpoint:{store.endpoint}] is of type {target.type}; the store needs kafka")
    if gateway.workers > 1:
        _checkWorkers(path, gateway, endpoints, apis)
    sections = {name: {k: v.strip() for k, v in parser[name].items()} for name in parser.sections()}
    return Config(path=path, gateway=gateway, endpoints=endpoints, apis=apis, sections=sections)


def _checkWorkers(path: str, gateway: GatewayConfig, endpoints: Mapping[str, EndpointConfig],
                  apis: Mapping[str, ApiConfig]) -> None:
    """
    With C{workers > 1}, every process must see the same messages, keys
    and counters: refuse what lives in one process only.
    """
    def refuse(detail: str) -> ConfigError:
        return ConfigError(path, "gateway", "workers", f"{gateway.workers} processes cannot share {detail}")

    store = gateway.options.get("store")
    for api in apis.values():
        if endpoints[api.endpoint].type == "memory":
            raise refuse(f"the memory endpoint [endpoint:{api.endpoint}] of [api:{api.name}]: it lives in one "
                         "process (use a kafka or mqtt5 endpoint, or workers = 1)")
        if api.options.get("limits") and not gateway.options.get("limitsStore"):
            raise refuse(f"the rate limits of [api:{api.name}] counted locally (set limits-store = "
                         "redis://..., or workers = 1)")
        if "api-key" in api.plans and (store is None or store.kind != "kafka"):
            raise refuse(f"the API keys of [api:{api.name}] unless the store is a kafka: store every process "
                         "follows (or workers = 1)")


def loadConfig(path: str) -> Config:
    """
    Read and parse the file at C{path}.

    @raise ConfigError: if the file cannot be read or has a mistake.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, None, "is not UTF-8 text") from None
    return parseConfig(text, path)
