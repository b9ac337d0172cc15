"""
Protobuf messages as JSON, and JSON as Protobuf messages, with descriptors
built at run time from a registry's (or a file's) schema.

Parsing .proto text: the C{protoc} compiler that C{grpcio-tools} ships as a
Python extension (C{grpc_tools.protoc}), asked for a FileDescriptorSet. It
is protobuf's own parser, so every construct, option and well-known import
(C{google/protobuf/timestamp.proto}, bundled with it) parses exactly as in
the producers' builds; the pure-Python .proto parsers on PyPI give an AST
that would still have to be turned into descriptors, and lag the language.
A schema that a registry hands out as a base64 FileDescriptorProto (what
Confluent's serializers register) is read directly, without protoc.

The JSON mapping is protobuf's canonical proto3 JSON mapping
(C{json_format}), with the field names as written in the .proto
(C{preserving_proto_field_name}) and fields without presence always
present (so a JSON client sees C{0}, C{""} and C{false} rather than a
missing key): int64 and uint64 are strings, bytes base64, enums their
names, the well-known types their JSON forms (Timestamp as RFC 3339, ...).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
import threading
from importlib import resources
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError as ProtobufDecodeError
from zope.interface import implementer

from evgate.interfaces import ISchemaCodec
from evgate.schemas.errors import DecodeError, EncodeError, SchemaError, pointerFor

_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")
# protoc writes its diagnostics to file descriptor 2; compiling is rare
# (once per schema), so it is done one at a time while fd 2 is captured.
_protocLock = threading.Lock()


def compileProto(text: str, imports: Mapping[str, str] = {}, name: str = "") -> descriptor_pb2.FileDescriptorSet:
    """
    The FileDescriptorSet (imports first) of the .proto C{text}, whose
    C{import}s are found in C{imports} (import path -> .proto text) or
    among the well-known types.

    @raise SchemaError: with protoc's diagnostics if it does not compile.
    """
    # grpc_tools (protoc as a Python extension) is imported when a .proto
    # text is first compiled: it is large, and registries that hand out
    # descriptors, and APIs without Protobuf, never need it.
    from grpc_tools import protoc

    wellKnown = str(resources.files("grpc_tools") / "_proto")
    name = name or "evgate-" + hashlib.sha256(text.encode()).hexdigest()[:16] + ".proto"
    with tempfile.TemporaryDirectory(prefix="evgate-proto-") as root:
        for path, source in [*imports.items(), (name, text)]:
            full = os.path.join(root, path)
            if not os.path.abspath(full).startswith(root + os.sep):
                raise SchemaError(f"import path {path!r} leaves the import root", reason="bad-schema")
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w", encoding="utf-8") as f:
                f.write(source)
        out = os.path.join(root, "out.pb")
        errors = os.path.join(root, "errors.txt")
        args = ["protoc", f"-I{root}", f"-I{wellKnown}", "--include_imports", f"--descriptor_set_out={out}", name]
        with _protocLock, open(errors, "w+b") as capture:
            saved = os.dup(2)
            try:
                os.dup2(capture.fileno(), 2)
                status = protoc.main(args)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            capture.seek(0)
            diagnostics = capture.read().decode("utf-8", "replace").replace(root + os.sep, "").strip()
        if status != 0 or not os.path.exists(out):
            raise SchemaError(f"not a valid .proto schema: {diagnostics or 'protoc failed'}", reason="bad-schema")
        with open(out, "rb") as f:
            return descriptor_pb2.FileDescriptorSet.FromString(f.read())


def _serializedDescriptor(text: str) -> Optional[descriptor_pb2.FileDescriptorProto]:
    """
    C{text} as a base64 FileDescriptorProto, if it is one.
    """
    if "{" in text or ";" in text or not _BASE64.match(text):
        return None
    try:
        proto = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(text, validate=False))
    except (binascii.Error, ValueError, ProtobufDecodeError):
        return None
    return proto if proto.message_type or proto.enum_type else None


@implementer(ISchemaCodec)
class ProtobufCodec:
    """
    One .proto schema, compiled once: payloads of any of its messages to
    JSON values, and JSON to payloads of one chosen message.

    @param text: the .proto text (or a base64 FileDescriptorProto).
    @param imports: the texts of the files it imports, by import path
        (registry references).
    @param messageName: the message that L{encode} writes (a full name, or
        a name relative to the file's package); the file's first message by
        default, as Confluent's serializers do for index C{[0]}.
    """

    schemaType = "PROTOBUF"

    def __init__(self, text: str, imports: Mapping[str, str] = {}, messageName: Optional[str] = None) -> None:
        self.pool = descriptor_pool.DescriptorPool()
        files: List[descriptor_pb2.FileDescriptorProto] = []
        main = _serializedDescriptor(text)
        if main is not None:
            wanted = set(main.dependency)
            for path, source in imports.items():
                dep = _serializedDescriptor(source)
                files.extend(dep and [dep] or compileProto(source, {}, path).file)
            known = {f.name for f in files}
            for path in wanted - known:
                files.extend(self._wellKnown(path))
            files.append(main)
        else:
            files.extend(compileProto(text, imports).file)
        added = set()
        try:
            for proto in files:
                if proto.name not in added:
                    self.pool.Add(proto)
                    added.add(proto.name)
            self.file = self.pool.FindFileByName(files[-1].name)
        except (TypeError, KeyError, ValueError) as e:
            raise SchemaError(f"not a usable .proto schema: {e}", reason="bad-schema") from None
        if not self.file.message_types_by_name:
            raise SchemaError("the .proto schema defines no message", reason="bad-schema")
        self._byIndexes: Dict[Tuple[int, ...], Any] = {}
        self.message = self._find(messageName) if messageName else self.file.message_types_by_name[
            next(iter(self.file.message_types_by_name))]
        self.indexes = self.indexesOf(self.message)

    @staticmethod
    def _wellKnown(path: str) -> List[descriptor_pb2.FileDescriptorProto]:
        try:
            found = descriptor_pool.Default().FindFileByName(path)
        except KeyError:
            # not loaded yet: importing the generated module adds it to the default pool
            module = "google.protobuf." + os.path.basename(path).replace(".proto", "_pb2")
            try:
                __import__(module)
                found = descriptor_pool.Default().FindFileByName(path)
            except (ImportError, KeyError):
                raise SchemaError(f"import {path!r} is neither a reference nor a well-known type",
                                  reason="bad-schema") from None
        proto = descriptor_pb2.FileDescriptorProto()
        found.CopyToProto(proto)
        return [proto]

    def _find(self, name: str) -> Any:
        package = self.file.package
        for candidate in (name, f"{package}.{name}" if package else name):
            try:
                found = self.pool.FindMessageTypeByName(candidate)
            except KeyError:
                continue
            if found.file is self.file:
                return found
        raise SchemaError(f"message {name!r} is not defined in the schema", reason="bad-schema")

    def indexesOf(self, descriptor: Any) -> List[int]:
        """
        The message-index array of C{descriptor} in this file.
        """
        path: List[int] = []
        current = descriptor
        while current.containing_type is not None:
            parent = current.containing_type
            path.insert(0, list(parent.nested_types).index(current))
            current = parent
        path.insert(0, list(self.file.message_types_by_name.values()).index(current))
        return path

    def messageAt(self, indexes: Sequence[int]) -> Any:
        """
        The message descriptor at C{indexes}.

        @raise DecodeError: if there is no such message.
        """
        key = tuple(indexes)
        found = self._byIndexes.get(key)
        if found is not None:
            return found
        try:
            current = list(self.file.message_types_by_name.values())[indexes[0]]
            for index in indexes[1:]:
                current = current.nested_types[index]
        except IndexError:
            raise DecodeError(f"message index {list(indexes)} names no message of the schema") from None
        self._byIndexes[key] = current
        return current

    # ------------------------------------------------------------ decoding

    def decode(self, payload: bytes, indexes: Sequence[int] = (0,)) -> Any:
        """
        The JSON value of C{payload}, a message at C{indexes} of the schema.

        @raise DecodeError: if it does not parse as that message.
        """
        descriptor = self.messageAt(indexes)
        message = message_factory.GetMessageClass(descriptor)()
        try:
            message.ParseFromString(payload)
        except Exception as e:  # protobuf raises DecodeError, and RuntimeError on deep nesting
            raise DecodeError(f"Protobuf payload is not a {descriptor.full_name}: {e}") from None
        return toJson(message)

    # ------------------------------------------------------------ encoding

    def encode(self, value: Any) -> bytes:
        """
        The payload of the JSON C{value} as this codec's message (whose
        message-index array is L{indexes}).

        @raise EncodeError: naming the field that does not fit.
        """
        if not isinstance(value, dict):
            raise EncodeError("", f"a {self.message.full_name} is a JSON object")
        message = message_factory.GetMessageClass(self.message)()
        try:
            json_format.ParseDict(value, message, ignore_unknown_fields=False)
        except json_format.ParseError as e:
            # json_format names the path in most of its errors, not all
            # (a wrong scalar type in a map or a string field): then the
            # culprit is found by parsing the value piece by piece.
            pointer = _pointerOf(str(e), self.message.name) or pointerFor(_locate(self.message, value, []))
            raise EncodeError(pointer, _cleanMessage(str(e))) from None
        except (TypeError, ValueError, RecursionError) as e:
            raise EncodeError("", f"does not fit {self.message.full_name}: {e}") from None
        return bytes(message.SerializeToString())


def _fails(descriptor: Any, value: Any) -> bool:
    try:
        json_format.ParseDict(value, message_factory.GetMessageClass(descriptor)())
    except Exception:
        return True
    return False


def _locate(descriptor: Any, value: Any, path: List[Any]) -> List[Any]:
    """
    The path, below C{path}, of the first piece of C{value} that does not
    parse as C{descriptor}.
    """
    if not isinstance(value, dict):
        return path
    for key, item in value.items():
        if not _fails(descriptor, {key: item}):
            continue
        field = descriptor.fields_by_name.get(key) or next(
            (f for f in descriptor.fields if f.json_name == key), None)
        if field is None:
            return path + [key]
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry and isinstance(item, dict):
            for mapKey, mapValue in item.items():
                if _fails(descriptor, {key: {mapKey: mapValue}}):
                    inner = entry.fields_by_name["value"].message_type
                    if inner is not None:
                        return _locate(inner, mapValue, path + [key, mapKey])
                    return path + [key, mapKey]
        elif _isRepeated(field) and isinstance(item, list):
            for index, element in enumerate(item):
                if _fails(descriptor, {key: [element]}):
                    if entry is not None:
                        return _locate(entry, element, path + [key, index])
                    return path + [key, index]
        elif entry is not None:
            return _locate(entry, item, path + [key])
        return path + [key]
    return path


def _isRepeated(field: Any) -> bool:
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return bool(field.label == field.LABEL_REPEATED)


def toJson(message: Any) -> Any:
    """
    A message in the JSON mapping described in the module docstring.
    """
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


# json_format's errors name the path of the field after " at ", e.g.
# "... at Order.items[0].price." or '... at "Order.items[0]".'
_AT = re.compile(r' at "?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[[^\]]*\])*)"?')
_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)"')


def _pointerOf(text: str, root: str) -> str:
    """
    The JSON Pointer of the field a json_format error names ("" if none).
    """
    first = text.splitlines()[0] if text else ""
    matches = _AT.findall(first)
    if not matches:
        return ""
    steps: List[Any] = []
    for name, index in re.findall(r"\.([A-Za-z_]\w*)|\[([^\]]*)\]", "." + matches[-1]):
        if name:
            steps.append(name)
        else:
            steps.append(int(index) if index.isdigit() else index.strip("'\""))
    if steps and steps[0] == root:
        steps = steps[1:]
    unknown = _UNKNOWN_FIELD.search(first)
    if unknown:
        steps.append(unknown.group(1))
    return pointerFor(steps)


def _cleanMessage(text: str) -> str:
    first = text.splitlines()[0] if text else "does not fit the message"
    first = _AT.sub("", first).rstrip(". ")
    while True:
        shorter = re.sub(r"^Failed to parse \w+ field: ", "", first)
        if shorter == first:
            return first
        first = shorter
