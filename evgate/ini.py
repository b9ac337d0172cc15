"""
The INI primitives every reader of evgate.ini shares: typed access to one
section (L{SectionReader}), the error that names file, section and key
(L{ConfigError}), the sections other sections' parsers may look at
(L{GatewayConfig}, L{EndpointConfig}, L{ApiContext}) and the registry of
C{[api:NAME]} option parsers (L{apiOptionParser}).

They sit below L{evgate.config} so that the modules whose option parsers
L{evgate.config} calls (connectors, entrypoints, plans) can use them without
importing L{evgate.config} back; L{evgate.config} re-exports every name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

REQUIRED = object()


class ConfigError(Exception):
    """
    A mistake in the configuration, located by file, section and key.
    """

    def __init__(self, path: str, section: Optional[str], key: Optional[str], message: str) -> None:
        self.path = path
        self.section = section
        self.key = key
        self.message = message
        where = path
        if section is not None:
            where += f" [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {message}")


class SectionReader:
    """
    Typed access to one INI section that remembers which keys were read, so
    that L{finish} can refuse the keys nobody knows.
    """

    def __init__(self, path: str, name: str, values: Mapping[str, str]) -> None:
        self.path = path
        self.name = name
        self._values = dict(values)
        self._used: set = set()

    def error(self, key: Optional[str], message: str) -> ConfigError:
        """
        A L{ConfigError} located at C{key} of this section.
        """
        return ConfigError(self.path, self.name, key, message)

    def has(self, key: str) -> bool:
        """
        Whether the section sets C{key}.
        """
        return key in self._values

    def keys(self) -> List[str]:
        """
        The keys the section sets, sorted (for families of keys such as
        C{jwt.claims.<name>}).
        """
        return sorted(self._values)

    def get(self, key: str, default: Any = REQUIRED) -> Any:
        """
        The stripped text of C{key}; C{default} when it is absent.
        """
        self._used.add(key)
        if key not in self._values:
            if default is REQUIRED:
                raise self.error(key, "missing required key")
            return default
        value = self._values[key].strip()
        if value == "" and default is REQUIRED:
            raise self.error(key, "must not be empty")
        return value

    def getInt(self, key: str, default: Any = REQUIRED, minimum: Optional[int] = None,
               maximum: Optional[int] = None) -> int:
        """
        C{key} as an integer within C{[minimum, maximum]}.
        """
        raw = self.get(key, default)
        if not isinstance(raw, str):
            return raw  # type: ignore[no-any-return]
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise self.error(key, f"expected an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, got {value}")
        return value

    def getFloat(self, key: str, default: Any = REQUIRED, minimum: float = 0.0) -> float:
        """
        C{key} as a number no smaller than C{minimum}.
        """
        raw = self.get(key, default)
        if not isinstance(raw, str):
            return raw  # type: ignore[no-any-return]
        try:
            value = float(raw)
        except ValueError:
            raise self.error(key, f"expected a number, got {raw!r}") from None
        if value < minimum:
            raise self.error(key, f"must be at least {minimum:g}, got {raw}")
        return value

    def getBool(self, key: str, default: Any = REQUIRED) -> bool:
        """
        C{key} as a boolean (true/false, yes/no, on/off, 1/0).
        """
        raw = self.get(key, default)
        if not isinstance(raw, str):
            return raw  # type: ignore[no-any-return]
        lowered = raw.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise self.error(key, f"expected true or false, got {raw!r}")

    def getChoice(self, key: str, choices: Sequence[str], default: Any = REQUIRED) -> str:
        """
        C{key}, which must be one of C{choices}.
        """
        raw = self.get(key, default)
        if raw not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {raw!r}")
        return raw  # type: ignore[no-any-return]

    def getList(self, key: str, default: Any = REQUIRED) -> Tuple[str, ...]:
        """
        C{key} as a list of words separated by spaces, commas or newlines.
        """
        raw = self.get(key, default)
        if not isinstance(raw, str):
            return tuple(raw)
        return tuple(word for word in re.split(r"[\s,]+", raw) if word)

    def getParsed(self, key: str, parse: Callable[[str], Any], default: Any = None) -> Any:
        """
        C{key} as C{parse} makes it from the stripped text; C{default} when
        the key is absent.  A C{ValueError} of C{parse} becomes the error
        of the key, quoting its text.
        """
        raw = self.get(key, REQUIRED if default is REQUIRED else None)
        if raw is None:
            return default
        try:
            return parse(raw)
        except ValueError as e:
            raise self.error(key, f"{raw!r}: {e}") from None

    def rest(self) -> Dict[str, str]:
        """
        The keys not read so far, marked as read.
        """
        left = {k: v.strip() for k, v in self._values.items() if k not in self._used}
        self._used.update(left)
        return left

    def finish(self) -> None:
        """
        Refuse any key that no reader asked for.
        """
        unknown = sorted(set(self._values) - self._used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


@dataclass(frozen=True)
class GatewayConfig:
    """
    The C{[gateway]} section.
    """

    listen: Tuple[str, ...] = ("tcp:8080",)
    maxMessageBytes: int = 1048576
    maxPollTimeout: int = 30000
    maxPollLimit: int = 1000
    publishTimeout: float = 10.0
    headerPrefix: str = "X-Message-Header-"
    keyHeader: str = "X-Message-Key"
    replayWindow: int = 10000
    subscriberQueue: int = 1000
    accessLog: bool = False
    workers: int = 1
    # What the readers registered with gatewayKeys return, merged.
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EndpointConfig:
    """
    One C{[endpoint:NAME]} section; C{options} is the connector's own.
    """

    name: str
    type: str
    options: Mapping[str, Any]


ApiOptionParser = Callable[[SectionReader, "ApiContext"], Mapping[str, Any]]


@dataclass
class ApiContext:
    """
    What an API option parser may look at besides the section itself.
    """

    gateway: GatewayConfig
    endpoint: EndpointConfig
    entrypoints: Tuple[str, ...]
    plans: Tuple[str, ...]


_apiOptionParsers: List[ApiOptionParser] = []


def descriptionFields(description: str) -> List[str]:
    """
    The fields of a listener description as Twisted's strports write them:
    C{":"} separates fields and a backslash escapes the next character (an
    IPv6 interface is C{tcp6:8080:interface=\\:\\:1}).
    """
    fields, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


GatewayKeyParser = Callable[[SectionReader], Optional[Mapping[str, Any]]]
_gatewayKeyParsers: List[GatewayKeyParser] = []


def gatewayKeys(parser: GatewayKeyParser) -> GatewayKeyParser:
    """
    Register a reader of more C{[gateway]} keys.  What it returns (if
    anything) is merged into L{GatewayConfig.options}.  It lives here,
    below the configuration model, so that a module registering keys
    never imports L{evgate.config} (which imports the connectors).
    """
    _gatewayKeyParsers.append(parser)
    return parser


def apiOptionParser(parser: ApiOptionParser) -> ApiOptionParser:
    """
    Register a parser for more C{[api:NAME]} keys (used by the modules of
    entrypoints, plans and filters).
    """
    _apiOptionParsers.append(parser)
    return parser
