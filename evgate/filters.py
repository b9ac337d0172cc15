"""
Filter expressions: which messages a subscriber receives.

An API may set an I{operator filter} (the C{filter} key of its section) and
every subscription may add a I{client filter} (the C{filter} query
parameter of GET, SSE and WebSocket).  A message reaches a subscriber when
the operator filter and then the client filter say C{true}.  Both are
expressions of the Common Expression Language (CEL), evaluated by
cel-python over five names::

    key       the record key (a string, or null)
    headers   the message headers, a map of string to string
    content   the content parsed as JSON when it is JSON, else its text
              (or its bytes when it is not UTF-8)
    metadata  topic, partition, offset, timestamp and endpoint extras
    claims    what the caller's credentials say (Consumer.claims)

for example C{key == "eu" && content.amount > 100} or
C{headers.tenant == claims.tenant}.

Safety and cost
===============

An expression is parsed into a tree and walked by cel-python's interpreter:
no Python is generated or evaluated from it.  Its cost is bounded before it
ever runs: at most L{MAX_LENGTH} characters, a tree at most L{MAX_DEPTH}
deep (deeper trees would exhaust the interpreter's recursion), at most
L{MAX_CONCATENATIONS} C{+} operators (string concatenation copies the
content), and none of the functions whose cost grows without bound: the
comprehension macros (C{all}, C{exists}, C{exists_one}, C{map},
C{filter}) and C{matches} (Python's regular expressions backtrack).  So
an evaluation costs at most a constant times the size of one message.

An evaluation that fails (a missing header, a field of a non-object, a
type mismatch) or yields anything but a boolean counts as I{not matching};
it never ends the stream.

Work done once
==============

An expression is compiled once (and compiled programs are shared by every
subscription with the same text).  The per-message values it reads are
built once per message and kept on the hub's L{Event}, each only if some
expression reads it (content is parsed only for expressions that read
C{content}).  The I{result} is kept there too,
keyed by the program and (only for expressions that read C{claims}) the
caller's claims: a thousand subscribers with the same filter cost one
evaluation per message, not a thousand.  See docs/filters.md for measured
costs.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, FrozenSet, Mapping, Optional, Tuple

import celpy
import lark
from celpy import celtypes
from twisted.logger import Logger

from evgate import jsonlimits
from evgate.errors import BadFilter
from evgate.ini import ApiContext, SectionReader, apiOptionParser

MAX_LENGTH = 1024
MAX_DEPTH = 200
MAX_CONCATENATIONS = 8

NAMES = frozenset({"key", "headers", "content", "metadata", "claims"})

# Type names CEL lets an expression mention as values (`type(x) == string`).
_TYPE_NAMES = frozenset({"int", "uint", "double", "bool", "string", "bytes", "list", "map",
                         "null_type", "type"})
_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_UNBOUNDED = frozenset({"matches"})


class FilterSyntaxError(ValueError):
    """
    An expression that cannot be a filter, located by line and column
    (1-based) in its text.
    """

    def __init__(self, line: int, column: int, reason: str) -> None:
        self.line = line
        self.column = column
        self.reason = reason
        super().__init__(f"line {line}, column {column}: {reason}")


class _Runner(celpy.InterpretedRunner):
    """
    cel-python's tree-walking interpreter, with the base activation (the
    well-known type annotations it loads for every evaluation) built once
    per program.  Sharing it is safe: an evaluation binds its values into a
    clone (C{Evaluator.set_activation}), never into the base.
    """

    _base: Any = None

    def new_activation(self) -> Any:
        if self._base is None:
            self._base = super().new_activation()
        return self._base


def _environment() -> Any:
    global _ENV
    if _ENV is None:
        _ENV = celpy.Environment(runner_class=_Runner)
    return _ENV


_ENV: Any = None
_ALLOWED_FUNCTIONS: Optional[FrozenSet[str]] = None


def _allowedFunctions() -> FrozenSet[str]:
    global _ALLOWED_FUNCTIONS
    if _ALLOWED_FUNCTIONS is None:
        names = {name for name in celpy.base_functions if name[:1].isalpha()}
        _ALLOWED_FUNCTIONS = frozenset((names | {"has"}) - _UNBOUNDED - _MACROS)
    return _ALLOWED_FUNCTIONS


def _syntaxError(text: str, error: Exception) -> FilterSyntaxError:
    line = getattr(error, "line", None) or 1
    column = getattr(error, "column", None) or 1
    cause = error.__context__
    if isinstance(cause, lark.exceptions.UnexpectedToken):
        token = cause.token
        if token.type == "$END":
            reason = "the expression ends too early"
            # lark reports the end one past the text; point at its last
            # character, which is where a reader looks.
            lines = text.rstrip().splitlines() or [""]
            line, column = len(lines), max(1, len(lines[-1]))
        else:
            reason = f"unexpected {str(token)!r}"
    elif isinstance(cause, lark.exceptions.UnexpectedCharacters):
        reason = f"unexpected character {cause.char!r}"
    else:
        reason = "syntax error"
    return FilterSyntaxError(line, column, reason)


def _position(node: Any) -> Tuple[int, int]:
    if isinstance(node, lark.Token):
        return node.line or 1, node.column or 1
    meta = getattr(node, "meta", None)
    if meta is not None and not getattr(meta, "empty", True):
        return meta.line, meta.column
    return 1, 1


def _check(tree: Any) -> FrozenSet[str]:
    """
    Refuse what a filter may not do; return the top-level names the
    expression reads.
    """
    allowed = _allowedFunctions()
    names = set()
    concatenations = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, lark.Tree):
            continue
        if depth > MAX_DEPTH:
            raise FilterSyntaxError(*_position(node), "the expression is nested too deeply")
        kind = node.data
        if kind in ("ident", "dot_ident"):
            token = node.children[0]
            name = str(token)
            if name not in NAMES and name not in _TYPE_NAMES:
                raise FilterSyntaxError(*_position(token), f"unknown name {name!r}: a filter reads "
                                        "key, headers, content, metadata and claims")
            names.add(name)
        elif kind in ("ident_arg", "dot_ident_arg", "member_dot_arg"):
            token = node.children[1] if kind == "member_dot_arg" else node.children[0]
            name = str(token)
            if name in _MACROS:
                raise FilterSyntaxError(*_position(token), f"{name}() is not available in filters: "
                                        "its cost grows with the size of a message")
            if name in _UNBOUNDED:
                raise FilterSyntaxError(*_position(token), f"{name}() is not available in filters: "
                                        "regular expressions can take unbounded time; use "
                                        "startsWith, endsWith or contains")
            if name not in allowed:
                raise FilterSyntaxError(*_position(token), f"unknown function {name!r}")
        elif kind == "member_object":
            raise FilterSyntaxError(*_position(node), "object construction is not available in filters")
        elif kind == "addition_add":
            concatenations += 1
            if concatenations > MAX_CONCATENATIONS:
                raise FilterSyntaxError(*_position(node), f"more than {MAX_CONCATENATIONS} '+' operators")
        stack.extend((child, depth + 1) for child in node.children)
    return frozenset(names)


class FilterProgram:
    """
    One compiled expression.

    @ivar text: the expression as written.
    @ivar names: the top-level names it reads (a subset of L{NAMES} and type
        names).
    """

    def __init__(self, text: str, names: FrozenSet[str], runner: Any) -> None:
        self.text = text
        self.names = names
        self.runner = runner
        self.messageNames = tuple(sorted(names & set(_BUILDERS)))
        self.readsClaims = "claims" in names

    def __repr__(self) -> str:
        return f"<FilterProgram {self.text!r}>"

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        """
        The raw CEL value of this expression over C{context}; may raise.
        """
        return self.runner.evaluate(context)


_compiled: "OrderedDict[str, FilterProgram]" = OrderedDict()
_COMPILED_KEPT = 256


def compileFilter(text: str) -> FilterProgram:
    """
    Compile C{text}, or return the program compiled before for the same
    text.

    @raise FilterSyntaxError: when the text does not parse or asks for
        something a filter may not do.
    """
    program = _compiled.get(text)
    if program is not None:
        _compiled.move_to_end(text)
        return program
    if len(text) > MAX_LENGTH:
        raise FilterSyntaxError(1, MAX_LENGTH + 1, f"the expression is longer than {MAX_LENGTH} characters")
    if not text.strip():
        raise FilterSyntaxError(1, 1, "the expression is empty")
    env = _environment()
    try:
        tree = env.compile(text)
    except celpy.CELParseError as e:
        raise _syntaxError(text, e) from None
    except RecursionError:
        raise FilterSyntaxError(1, 1, "the expression is nested too deeply") from None
    names = _check(tree)
    program = FilterProgram(text, names, env.program(tree))
    _compiled[text] = program
    while len(_compiled) > _COMPILED_KEPT:
        _compiled.popitem(last=False)
    return program


def _celValue(value: Any) -> Any:
    try:
        return celpy.json_to_cel(value)
    except (ValueError, TypeError, RecursionError):
        return celtypes.StringType(str(value))


def _contentValue(content: bytes) -> Any:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return celtypes.BytesType(content)
    try:
        return celpy.json_to_cel(jsonlimits.loads(text))
    except (ValueError, TypeError, RecursionError):
        # Not JSON (or JSON cel-python cannot represent, such as integers
        # beyond 64 bits): the text itself.
        return celtypes.StringType(text)


def _key(message: Any) -> Any:
    return None if message.key is None else celtypes.StringType(message.key)


def _headers(message: Any) -> Any:
    return celtypes.MapType({celtypes.StringType(k): celtypes.StringType(v) for k, v in message.headers})


def _metadata(message: Any) -> Any:
    return _celValue(message.metadata())


def _content(message: Any) -> Any:
    return _contentValue(message.content)


# How each name's value is built from a message.
_BUILDERS = {"key": _key, "headers": _headers, "metadata": _metadata, "content": _content}


def messageValue(event: Any, name: str) -> Any:
    """
    The CEL value of C{name} (key, headers, metadata or content) for the
    message of C{event}, built on first use and kept on the event for every
    other subscriber of every API on the stream.
    """
    frames = event.frames
    cacheKey = ("cel", name)
    try:
        return frames[cacheKey]
    except KeyError:
        value = frames[cacheKey] = _BUILDERS[name](event.message)
        return value


class SubscriptionFilter:
    """
    The filter of one subscription: the API's operator filter, then the
    client's, over the caller's claims.  Called by the hub with each
    L{evgate.hub.Event}.
    """

    log = Logger()

    def __init__(self, operator: Optional[FilterProgram], client: Optional[FilterProgram],
                 claims: Mapping[str, Any]) -> None:
        self.programs = tuple(p for p in (operator, client) if p is not None)
        self.claims = _celValue(dict(claims)) if any(p.readsClaims for p in self.programs) else None
        # Results are shared between subscriptions whose claims are equal;
        # the claims are only part of the key when the program reads them.
        self._claimsKey = (json.dumps(dict(claims), sort_keys=True, default=str)
                           if self.claims is not None else None)
        self.errors = 0

    def __call__(self, event: Any) -> bool:
        for program in self.programs:
            if not self._matches(program, event):
                return False
        return True

    def _matches(self, program: FilterProgram, event: Any) -> bool:
        cacheKey = ("filter", program, self._claimsKey if program.readsClaims else None)
        frames = event.frames
        result = frames.get(cacheKey)
        if result is None:
            result = frames[cacheKey] = self._evaluate(program, event)
        return result  # type: ignore[no-any-return]

    def _evaluate(self, program: FilterProgram, event: Any) -> bool:
        context = {name: messageValue(event, name) for name in program.messageNames}
        if program.readsClaims:
            context["claims"] = self.claims
        try:
            value = program.evaluate(context)
        except Exception as e:
            # A message the expression cannot judge is not a match; the
            # first such error per subscription is logged, not every one.
            self.errors += 1
            if self.errors == 1:
                self.log.info("filter {text!r} failed on {topic}@{offset}: {error} (counted as no match)",
                              text=program.text, topic=event.message.topic,
                              offset=event.message.offset, error=str(e)[:200])
            return False
        return isinstance(value, celtypes.BoolType) and bool(value)


def clientFilterText(request: Any) -> Optional[str]:
    """
    The text of the C{filter} query parameter of C{request}, or L{None}.

    @raise BadFilter: if it is not UTF-8.
    """
    values = request.args.get(b"filter")
    if not values or not values[0].strip():
        return None
    try:
        return values[0].decode("utf-8")  # type: ignore[no-any-return]
    except UnicodeDecodeError:
        raise BadFilter("the filter query parameter is not UTF-8") from None


def filterFor(request: Any, call: Any) -> Optional[SubscriptionFilter]:
    """
    The filter of a subscribing request: the API's operator filter and the
    client's C{filter} query parameter, over the caller's claims; L{None}
    when neither is set.

    @raise BadFilter: if the client's expression is not a valid filter; the
        problem says where (C{line} and C{column}).
    """
    operator = call.api.config.options.get("filter")
    text = clientFilterText(request)
    client = None
    if text is not None:
        try:
            client = compileFilter(text)
        except FilterSyntaxError as e:
            raise BadFilter(f"the filter query parameter is not a valid filter: {e}",
                            extra={"line": e.line, "column": e.column}) from None
    if operator is None and client is None:
        return None
    return SubscriptionFilter(operator, client, call.consumer.claims)


@apiOptionParser
def parseFilterOption(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    The C{filter} key of an API: an operator filter compiled at start, so
    that a mistake stops start-up with its file, section, key and position.
    """
    text = section.get("filter", "")
    if not text:
        return {"filter": None}
    try:
        return {"filter": compileFilter(text)}
    except FilterSyntaxError as e:
        raise section.error("filter", f"not a valid filter expression: {e}") from None
