"""
The configuration keys of the schema layer (docs/schemas.md).

Endpoint keys, read by the Kafka endpoint's option parser through
L{registryOptions}:

    schema-registry                 URL of a Confluent-compatible registry
    schema-registry-username        basic auth user
    schema-registry-password-file   file holding the basic auth password
    schema-registry-ca-file         PEM certificates to trust for https

API keys, registered with L{apiOptionParser}, for the value and (C{key-})
the key of the messages:

    value-format            registry | json | raw (default raw)
    value-subject           registry subject (default TOPIC-value)
    value-subject-version   latest (default) or a version number
    value-schema            file:PATH, a local .avsc, .proto or .json schema
    value-schema-id         the id to write in the wire-format header with
                            a local schema (without it: bare encoding)
    value-message           the Protobuf message to write (default: the
                            schema's first)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

from evgate.ini import ApiContext, SectionReader, apiOptionParser
from evgate.schemas.codecs import readLocalSchema
from evgate.schemas.errors import SchemaError
from evgate.webhook.client import readCertificates

FORMATS = ("raw", "json", "registry")


@dataclass(frozen=True)
class RegistrySettings:
    """
    How to reach an endpoint's schema registry.
    """

    url: str
    username: Optional[str] = None
    password: Optional[str] = None
    caFile: Optional[str] = None
    caCertificates: Tuple[bytes, ...] = ()


@dataclass(frozen=True)
class FormatSettings:
    """
    How a message's value (or key) is written: C{raw} bytes as they are,
    C{json} text checked to be JSON, or C{registry} schema-encoded.
    """

    format: str = "raw"
    subject: Optional[str] = None
    version: Union[int, str] = "latest"
    schemaFile: Optional[str] = None
    schemaId: Optional[int] = None
    messageName: Optional[str] = None
    local: Any = None  # an evgate.schemas.codecs.LocalSchema, read at parse time


@dataclass(frozen=True)
class SchemaSettings:
    """
    The C{value-*} and C{key-*} settings of an API.
    """

    value: FormatSettings = FormatSettings()
    key: FormatSettings = FormatSettings()


def _relative(section: SectionReader, path: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isabs(path) and section.path[:1] != "<":
        path = os.path.join(os.path.dirname(os.path.abspath(section.path)), path)
    return path


def registryOptions(section: SectionReader) -> Optional[RegistrySettings]:
    """
    The C{schema-registry*} keys of an endpoint section, or L{None} when it
    names no registry.

    @raise ConfigError: naming the key at fault.
    """
    url = section.get("schema-registry", None)
    username = section.get("schema-registry-username", None)
    passwordFile = section.get("schema-registry-password-file", None)
    caFile = section.get("schema-registry-ca-file", None)
    if url is None:
        for key, value in (("schema-registry-username", username), ("schema-registry-password-file", passwordFile),
                           ("schema-registry-ca-file", caFile)):
            if value is not None:
                raise section.error(key, "needs schema-registry")
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise section.error("schema-registry", f"{url!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise section.error("schema-registry", "put credentials in schema-registry-username and "
                                               "schema-registry-password-file, not in the URL")
    password = None
    if passwordFile is not None:
        if username is None:
            raise section.error("schema-registry-password-file", "needs schema-registry-username")
        path = _relative(section, passwordFile)
        try:
            with open(path, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise section.error("schema-registry-password-file",
                                f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    certificates: Tuple[bytes, ...] = ()
    if caFile is not None:
        if parts.scheme != "https":
            raise section.error("schema-registry-ca-file", "is for an https:// schema-registry")
        path = _relative(section, caFile)
        try:
            with open(path, "rb") as f:
                certificates = readCertificates(f.read())
        except OSError as e:
            raise section.error("schema-registry-ca-file", f"cannot read {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise section.error("schema-registry-ca-file", f"{path} {e}") from None
        caFile = path
    return RegistrySettings(url=url.rstrip("/"), username=username, password=password, caFile=caFile,
                            caCertificates=certificates)


def _formatSettings(section: SectionReader, context: ApiContext, which: str) -> FormatSettings:
    def key(name: str) -> str:
        return f"{which}-{name}"

    fmt = section.getChoice(key("format"), FORMATS, "raw")
    subject = section.get(key("subject"), None)
    rawVersion = section.get(key("subject-version"), None)
    schemaFile = section.get(key("schema"), None)
    schemaId = section.getInt(key("schema-id"), None, minimum=0, maximum=2**31 - 1)
    messageName = section.get(key("message"), None)
    if fmt != "registry":
        for name, value in (("subject", subject), ("subject-version", rawVersion), ("schema", schemaFile),
                            ("schema-id", schemaId), ("message", messageName)):
            if value is not None:
                raise section.error(key(name), f"needs {key('format')} = registry")
        return FormatSettings(format=fmt)
    if which == "key" and context.endpoint.type != "kafka":
        # Only Kafka records carry binary keys; other endpoints' keys are text.
        raise section.error(key("format"), f"registry is for Kafka record keys; [endpoint:{context.endpoint.name}] "
                                           f"is {context.endpoint.type}")
    version: Union[int, str] = "latest"
    if rawVersion is not None and rawVersion != "latest":
        version = section.getInt(key("subject-version"), minimum=1)
    local = None
    if schemaFile is not None:
        if not schemaFile.startswith("file:"):
            raise section.error(key("schema"), f"{schemaFile!r}: write file:PATH (a .avsc, .proto or .json file)")
        if subject is not None or rawVersion is not None:
            raise section.error(key("schema"), f"a local schema replaces {key('subject')}: set one of them")
        path = _relative(section, schemaFile[5:])
        try:
            local = readLocalSchema(path, schemaId, messageName)
        except SchemaError as e:
            raise section.error(key("schema"), e.message) from None
        return FormatSettings(format=fmt, schemaFile=path, schemaId=schemaId, messageName=messageName, local=local)
    if schemaId is not None:
        raise section.error(key("schema-id"), f"is for a local {key('schema')}; with a registry the subject's "
                                              "schema gives the id")
    registry = context.endpoint.options.get("schema-registry")
    if registry is None:
        raise section.error(key("format"), f"registry needs schema-registry in [endpoint:{context.endpoint.name}] "
                                           f"or a local {key('schema')} = file:...")
    if subject is None:
        subject = f"{section.get('topic')}-{which}"
    return FormatSettings(format=fmt, subject=subject, version=version, messageName=messageName)


@apiOptionParser
def parseSchemaKeys(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    The C{value-*} and C{key-*} keys of an API, as L{SchemaSettings} under
    C{options["schemas"]}.
    """
    return {"schemas": SchemaSettings(value=_formatSettings(section, context, "value"),
                                      key=_formatSettings(section, context, "key"))}
