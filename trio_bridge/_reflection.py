"""gRPC server reflection, ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``: how grpcurl, evans,
Postman and the like learn the server's services and messages without the .proto.

Both versions are the same service and messages in two packages; both answer from one private
descriptor pool (never protobuf's default pool) holding:

* the descriptor set that ``proto/generate.py`` writes beside the generated code
  (``proto/unified_bridge.binpb``: unified_bridge.proto, the files it imports, and the well-known types
  values are packed as). The service's messages are betterproto2 classes, which carry no protobuf
  descriptors; a test fails when the descriptor set is stale;
* the health service's file, from grpclib's protobuf-generated health module (what it serves);
* reflection's own two files, built here (:func:`_reflection_file`), and the reflection messages are
  classes made from them. grpclib's reflection service is not used: its protobuf-generated modules
  put into protobuf's default pool the symbols that grpcio-reflection's put there under another file
  name, and the pool refuses whichever comes second, so a grpcio reflection client could not be
  imported in a process that runs a server (nor a server started in one that has the client).

A file is answered together with every file it imports, as the protocol asks. On a server that checks
tokens (``--token-file``), a reflection call needs a valid one, checked as every UnifiedBridge call is
(:meth:`Tokens.principal_for`): UNAUTHENTICATED otherwise. Without tokens reflection is open, like the
rest of the server. Connection limits apply as to any call.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import grpclib.const

# protobuf ships no type stubs (types-protobuf is not a dependency): its types are Any here.
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # type: ignore[import-untyped]
from google.protobuf.descriptor import FileDescriptor  # type: ignore[import-untyped]
from google.protobuf.descriptor_pb2 import FieldDescriptorProto  # type: ignore[import-untyped]
from grpclib.const import Status
from grpclib.health.v1 import health_pb2
from grpclib.server import Stream

from ._errors import Unauthenticated
from ._security import Tokens
from ._status import status_of

if TYPE_CHECKING:
    from grpclib._typing import IServable

#: The serialized FileDescriptorSet that ``proto/generate.py`` writes into ``trio_bridge/proto``.
DESCRIPTOR_SET = "unified_bridge.binpb"
VERSIONS = ("grpc.reflection.v1", "grpc.reflection.v1alpha")

#: reflection.proto's messages, the same in both versions: their fields as (name, number, type: a
#: scalar or a message of the file, and "repeated", the name of the oneof it belongs to, or "").
_MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {
    "ServerReflectionRequest": [
        ("host", 1, "string", ""),
        ("file_by_filename", 3, "string", "message_request"),
        ("file_containing_symbol", 4, "string", "message_request"),
        ("file_containing_extension", 5, "ExtensionRequest", "message_request"),
        ("all_extension_numbers_of_type", 6, "string", "message_request"),
        ("list_services", 7, "string", "message_request"),
    ],
    "ExtensionRequest": [("containing_type", 1, "string", ""), ("extension_number", 2, "int32", "")],
    "ServerReflectionResponse": [
        ("valid_host", 1, "string", ""),
        ("original_request", 2, "ServerReflectionRequest", ""),
        ("file_descriptor_response", 4, "FileDescriptorResponse", "message_response"),
        ("all_extension_numbers_response", 5, "ExtensionNumberResponse", "message_response"),
        ("list_services_response", 6, "ListServiceResponse", "message_response"),
        ("error_response", 7, "ErrorResponse", "message_response"),
    ],
    "FileDescriptorResponse": [("file_descriptor_proto", 1, "bytes", "repeated")],
    "ExtensionNumberResponse": [
        ("base_type_name", 1, "string", ""),
        ("extension_number", 2, "int32", "repeated"),
    ],
    "ListServiceResponse": [("service", 1, "ServiceResponse", "repeated")],
    "ServiceResponse": [("name", 1, "string", "")],
    "ErrorResponse": [("error_code", 1, "int32", ""), ("error_message", 2, "string", "")],
}
_SCALARS = {
    "string": FieldDescriptorProto.TYPE_STRING,
    "bytes": FieldDescriptorProto.TYPE_BYTES,
    "int32": FieldDescriptorProto.TYPE_INT32,
}


def with_reflection(services: Collection[IServable], tokens: Tokens | None) -> list[IServable]:
    """``services`` followed by the two reflection services, which list and describe them and
    themselves; with ``tokens``, reflection answers only a call that carries a valid one.

    Raises ``LookupError`` naming a service that the descriptors do not describe.
    """
    names = [*(_service_name(service) for service in services), *(f"{v}.ServerReflection" for v in VERSIONS)]
    pool = server_descriptors()
    for name in names:
        try:
            pool.FindServiceByName(name)
        except KeyError:
            raise LookupError(f"server reflection has no descriptor for the service {name!r}") from None
    return [*services, *(ServerReflection(version, pool, names, tokens) for version in VERSIONS)]


def _service_name(service: IServable) -> str:
    """The full name of the gRPC service ``service`` serves (from its first method's path)."""
    return next(iter(service.__mapping__())).split("/")[1]


def server_descriptors() -> descriptor_pool.DescriptorPool:
    """A new descriptor pool holding every file the server's services are described by."""
    pool = descriptor_pool.DescriptorPool()
    described = resources.files("trio_bridge.proto").joinpath(DESCRIPTOR_SET).read_bytes()
    for file in descriptor_pb2.FileDescriptorSet.FromString(described).file:
        pool.AddSerializedFile(file.SerializeToString())  # protoc writes imports before their importers
    pool.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    for version in VERSIONS:
        pool.AddSerializedFile(_reflection_file(version).SerializeToString())
    return pool


def _reflection_file(package: str) -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/<version>/reflection.proto, of the reflection ``package`` (one of ``VERSIONS``)."""
    file = descriptor_pb2.FileDescriptorProto(
        name=f"grpc/reflection/{package.rsplit('.', 1)[1]}/reflection.proto", package=package, syntax="proto3"
    )
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        oneofs: list[str] = []
        for field_name, number, kind, where in fields:
            field = message.field.add(
                name=field_name, number=number, label=FieldDescriptorProto.LABEL_OPTIONAL
            )
            if kind in _SCALARS:
                field.type = _SCALARS[kind]
            else:
                field.type, field.type_name = FieldDescriptorProto.TYPE_MESSAGE, f".{package}.{kind}"
            if where == "repeated":
                field.label = FieldDescriptorProto.LABEL_REPEATED
            elif where:
                if where not in oneofs:
                    oneofs.append(where)
                    message.oneof_decl.add(name=where)
                field.oneof_index = oneofs.index(where)
    file.service.add(name="ServerReflection").method.add(
        name="ServerReflectionInfo",
        input_type=f".{package}.ServerReflectionRequest",
        output_type=f".{package}.ServerReflectionResponse",
        client_streaming=True,
        server_streaming=True,
    )
    return file


class ServerReflection:
    """The reflection service of one ``package`` (``grpc.reflection.v1`` or ``v1alpha``): it answers
    each request of a stream in turn, from ``pool``, and lists ``service_names``."""

    def __init__(
        self,
        package: str,
        pool: descriptor_pool.DescriptorPool,
        service_names: Sequence[str],
        tokens: Tokens | None = None,
    ) -> None:
        self._package = package
        self._pool = pool
        self._service_names = list(service_names)
        self._tokens = tokens
        self._request = message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{package}.ServerReflectionRequest")
        )
        self._response = message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{package}.ServerReflectionResponse")
        )

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            f"/{self._package}.ServerReflection/ServerReflectionInfo": grpclib.const.Handler(
                self._server_reflection_info,
                grpclib.const.Cardinality.STREAM_STREAM,
                self._request,
                self._response,
            )
        }

    async def _server_reflection_info(self, stream: Stream[Any, Any]) -> None:
        if self._tokens is not None:  # before anything of the request is read
            try:
                self._tokens.principal_of(stream.metadata)
            except Unauthenticated as exc:
                await stream.send_trailing_metadata(status=status_of(exc), status_message=exc.message)
                return
        async for request in stream:
            await stream.send_message(self.answer(request))

    def answer(self, request: Any) -> Any:
        """The ServerReflectionResponse to ``request``. A request for something not described gets
        an ``error_response`` NOT_FOUND, as the protocol says (the stream goes on)."""
        response = self._response(original_request=request)
        asked = request.WhichOneof("message_request")
        pool = self._pool
        try:
            if asked == "list_services":
                for name in self._service_names:
                    response.list_services_response.service.add(name=name)
            elif asked == "file_by_filename":
                self._add_files(response, pool.FindFileByName(request.file_by_filename))
            elif asked == "file_containing_symbol":
                self._add_files(response, self._file_containing(request.file_containing_symbol))
            elif asked == "file_containing_extension":
                wanted = request.file_containing_extension
                extended = pool.FindMessageTypeByName(wanted.containing_type)
                extension = pool.FindExtensionByNumber(extended, wanted.extension_number)
                self._add_files(response, extension.file)
            elif asked == "all_extension_numbers_of_type":
                extended = pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = response.all_extension_numbers_response
                numbers.base_type_name = extended.full_name
                numbers.extension_number.extend(sorted(e.number for e in pool.FindAllExtensions(extended)))
            else:
                return self._error(request, Status.INVALID_ARGUMENT, "the request asks for nothing known")
        except KeyError:
            return self._error(request, Status.NOT_FOUND, f"not found: {_asked_for(request, asked)}")
        return response

    def _file_containing(self, symbol: str) -> FileDescriptor:
        """The file that defines ``symbol``: protobuf's pool finds types, fields and services, and a
        method here (grpcurl describes one by its full name)."""
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            found = self._pool.FindServiceByName(service)  # KeyError if it is none
            if method not in found.methods_by_name:
                raise
            return found.file

    @staticmethod
    def _add_files(response: Any, file: FileDescriptor) -> None:
        """Answer ``file``, then every file it imports, directly or not."""
        found = response.file_descriptor_response.file_descriptor_proto
        found.extend(described.serialized_pb for described in _with_imports(file))

    def _error(self, request: Any, status: Status, message: str) -> Any:
        response = self._response(original_request=request)
        response.error_response.error_code = status.value
        response.error_response.error_message = message
        return response


def _asked_for(request: Any, asked: str) -> str:
    """What a request asks for, in words: ``file_by_filename 'x.proto'``."""
    if asked == "file_containing_extension":
        wanted = request.file_containing_extension
        return f"extension {wanted.extension_number} of {wanted.containing_type!r}"
    return f"{asked} {getattr(request, asked)!r}"


def _with_imports(file: FileDescriptor) -> Iterator[FileDescriptor]:
    """``file``, then every file it imports, directly or not, each once, nearest first."""
    seen: set[str] = set()
    pending = [file]
    while pending:
        found = pending.pop(0)
        if found.name not in seen:
            seen.add(found.name)
            yield found
            pending.extend(found.dependencies)
