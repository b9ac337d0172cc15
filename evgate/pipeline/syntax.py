"""
The step syntax of C{publish-steps} and C{deliver-steps} (docs/transforms.md):
one step per line of a multi-line value, words separated by spaces, blank
lines and lines starting with C{#} ignored::

    [api:orders-public]
    deliver-steps =
        content jmespath {id: id, total: total}
        header remove x-internal
        header set x-source orders
    publish-steps =
        key from content.orderId
        header copy claims.sub x-user

A mistake stops start-up with a L{ConfigError} naming the file, the
section, the key and the line of the step (1 for the first line of the
value).  Steps are compiled here, once per API, into the step objects of
L{evgate.pipeline.steps} and L{evgate.pipeline.cloudevents}.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Tuple

from jmespath.exceptions import JMESPathError

from evgate.ini import ApiContext, ConfigError, SectionReader, apiOptionParser
from evgate.pipeline import cloudevents as ce
from evgate.pipeline import steps

PUBLISH, DELIVER = "publish", "deliver"
KEYS = {PUBLISH: "publish-steps", DELIVER: "deliver-steps"}

# A header name as a step takes it: a token without spaces.
_MAX_LINE = 4096


class StepSyntaxError(ValueError):
    """
    One step line is not valid (turned into a L{ConfigError} by
    L{parseSteps}).
    """


def _words(text: str, count: int) -> List[str]:
    # The first count words, then the rest of the line as one (possibly
    # empty) string.
    parts = text.split(None, count)
    while len(parts) <= count:
        parts.append("")
    return parts


def _source(ref: str, side: str, maxBytes: int, allowHeader: bool = True) -> Callable[[Any, Any], Any]:
    kind, dot, path = ref.partition(".")
    if not dot or not path:
        raise StepSyntaxError(f"{ref!r} is not a source: use content.PATH, claims.NAME or header.NAME")
    if kind == "content":
        return steps.contentSource(path, maxBytes)
    if kind == "claims":
        if side != PUBLISH:
            raise StepSyntaxError("claims are known on publish only")
        return steps.claimSource(path)
    if kind == "header" and allowHeader:
        return steps.headerSource(path)
    raise StepSyntaxError(f"{ref!r} is not a source: use content.PATH, claims.NAME or header.NAME")


def _header(text: str, line: int, rest: str, side: str, maxBytes: int) -> Any:
    verb, name, value = _words(rest, 2)
    if verb == "set":
        if not name or not value:
            raise StepSyntaxError("use: header set NAME VALUE")
        return steps.HeaderSet(text, line, name, value)
    if verb == "remove":
        if not name or value:
            raise StepSyntaxError("use: header remove NAME")
        return steps.HeaderRemove(text, line, name)
    if verb == "rename":
        if not name or not value or len(value.split()) != 1:
            raise StepSyntaxError("use: header rename OLD NEW")
        return steps.HeaderRename(text, line, name, value)
    if verb == "copy":
        if not name or not value or len(value.split()) != 1:
            raise StepSyntaxError("use: header copy content.PATH NAME (or claims.NAME on publish)")
        return steps.HeaderCopy(text, line, _source(name, side, maxBytes, allowHeader=False), value)
    raise StepSyntaxError(f"unknown header step {verb!r} (known: set, remove, rename, copy)")


def _key(text: str, line: int, rest: str, side: str, maxBytes: int) -> Any:
    verb, ref, more = _words(rest, 2)
    if verb != "from" or not ref or more:
        raise StepSyntaxError("use: key from content.PATH (or header.NAME, or claims.NAME on publish)")
    return steps.KeyFrom(text, line, _source(ref, side, maxBytes))


def _content(text: str, line: int, rest: str, side: str, maxBytes: int) -> Any:
    verb, expression = _words(rest, 1)
    if verb != "jmespath":
        raise StepSyntaxError(f"unknown content step {verb!r} (known: jmespath)")
    if not expression:
        raise StepSyntaxError("use: content jmespath EXPRESSION")
    return steps.ContentJmespath(text, line, expression, maxBytes)


def _cloudevents(text: str, line: int, rest: str, side: str, maxBytes: int, binding: str) -> Any:
    return ce.parseStep(text, line, rest, side, maxBytes, binding)


_KINDS: Dict[str, Callable[..., Any]] = {"header": _header, "key": _key, "content": _content}


def parseStep(text: str, line: int, side: str, maxBytes: int = steps.DEFAULT_MAX_BYTES,
              binding: str = "kafka") -> Any:
    """
    The step of one line C{text} (stripped, not blank) for C{side}.

    @raise StepSyntaxError: if it is not a valid step.
    """
    if len(text) > _MAX_LINE:
        raise StepSyntaxError(f"the step is longer than {_MAX_LINE} characters")
    kind, rest = _words(text, 1)
    try:
        if kind == "cloudevents":
            return _cloudevents(text, line, rest, side, maxBytes, binding)
        parser = _KINDS.get(kind)
        if parser is None:
            raise StepSyntaxError(f"unknown step {kind!r} (known: content, header, key, cloudevents)")
        return parser(text, line, rest, side, maxBytes)
    except JMESPathError as e:
        raise StepSyntaxError(f"not a valid JMESPath expression: {' '.join(str(e).split())}") from None
    except (RecursionError, ValueError, TypeError, KeyError) as e:
        if isinstance(e, StepSyntaxError):
            raise
        # JMESPath's parser has a few failure modes outside its own error
        # class for odd input.
        raise StepSyntaxError(f"not a valid step: {type(e).__name__}") from None


def parseSteps(text: str, side: str, path: str = "<string>", section: str = "api:-",
               maxBytes: int = steps.DEFAULT_MAX_BYTES, binding: str = "kafka") -> Tuple[Any, ...]:
    """
    Every step of the value C{text} of C{publish-steps} or C{deliver-steps}.

    @raise ConfigError: naming the key and the line of the first mistake.
    """
    found = []
    for index, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            found.append(parseStep(line, index, side, maxBytes, binding))
        except StepSyntaxError as e:
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise ConfigError(path, section, KEYS[side], f"line {index} ({shown!r}): {e}") from None
    return tuple(found)


def bindingOf(context: ApiContext) -> str:
    """
    The CloudEvents protocol binding of the API's endpoint: how binary-mode
    attributes are carried in its message headers.
    """
    return "mqtt" if context.endpoint.type == "mqtt5" else "kafka"


@apiOptionParser
def parsePipelineKeys(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    C{publish-steps} and C{deliver-steps}: the API's transform steps.
    """
    options: Dict[str, Any] = {}
    maxBytes = context.gateway.maxMessageBytes
    binding = bindingOf(context)
    for side, key in KEYS.items():
        if section.has(key):
            # Stripped at its ends only: line 1 is the first step's.
            value = section.get(key)
            parsed = parseSteps(value, side, section.path, section.name, maxBytes, binding)
            if parsed:
                options[side + "Steps"] = parsed
    mode = section.get("webhook.cloudevents", None)
    if mode is not None:
        if mode not in ("binary", "structured"):
            raise section.error("webhook.cloudevents", f"must be binary or structured, got {mode!r}")
        if "webhook" not in context.entrypoints:
            raise section.error("webhook.cloudevents", "is only used by the webhook entrypoint, which this "
                                "API does not list")
        options["webhookCloudEvents"] = mode
    return options
