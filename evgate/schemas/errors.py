"""
The errors of the schema layer.

A L{DecodeError} is what a delivery path turns into an error marker on the
message (the raw bytes still go out); an L{EncodeError} is what a publish
path turns into a 400 naming the offending field. Neither is ever a reason
to drop a message silently.
"""

from __future__ import annotations

from typing import Optional


class SchemaError(Exception):
    """
    Anything the schema layer refuses.

    @ivar reason: a short, stable word for machines (an error marker's code).
    @ivar message: one line for people.
    """

    reason = "schema"

    def __init__(self, message: str, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class DecodeError(SchemaError):
    """
    Bytes that cannot be turned into a JSON value: wrong magic byte, a
    truncated header, an unknown schema id, a payload that does not match
    its schema, or a registry that cannot be asked.

    Reasons: C{wire-format}, C{unknown-schema}, C{registry-unavailable},
    C{corrupt}, C{unsupported}.

    @ivar schemaId: the schema id read from the header, when it got that far.
    """

    reason = "corrupt"

    def __init__(self, message: str, reason: Optional[str] = None, schemaId: Optional[int] = None) -> None:
        super().__init__(message, reason)
        self.schemaId = schemaId


class EncodeError(SchemaError):
    """
    A JSON value that does not fit the schema it must be written with.

    @ivar pointer: an RFC 6901 JSON Pointer to the offending value (C{""}
        for the whole document), e.g. C{/items/0/price}.
    """

    reason = "does-not-match-schema"

    def __init__(self, pointer: str, message: str, reason: Optional[str] = None) -> None:
        super().__init__(f"{pointer or '/'}: {message}", reason)
        self.pointer = pointer
        self.detail = message


class RegistryError(SchemaError):
    """
    The schema registry did not give what was asked: it could not be
    reached, it answered with an error, or its answer was not usable.

    @ivar status: the HTTP status when there was an answer.
    @ivar code: the registry's own C{error_code} when it gave one (40403 is
        "schema not found", 40401 "subject not found", 40402 "version not found").
    """

    reason = "registry-unavailable"

    def __init__(self, message: str, status: Optional[int] = None, code: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def notFound(self) -> bool:
        """
        Whether the registry said that the schema, subject or version does not exist.
        """
        return self.status == 404


def pointerFor(path: "list[object] | tuple[object, ...]") -> str:
    """
    The JSON Pointer (RFC 6901) of a path of keys and indexes.
    """
    return "".join("/" + str(step).replace("~", "~0").replace("/", "~1") for step in path)
