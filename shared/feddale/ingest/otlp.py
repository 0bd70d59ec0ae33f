"""OpenTelemetry logs in (OTLP/HTTP, ``POST /v1/logs``): both encodings to plain records.

The protocol defines two bodies for one message, ``ExportLogsServiceRequest``: protobuf
(``application/x-protobuf``, what the Collector's ``otlphttp`` exporter and Fluent Bit's
``opentelemetry`` output send by default) and JSON (``resourceLogs[].scopeLogs[].logRecords[]``,
lowerCamelCase names, values wrapped as ``{"stringValue": ...}``). Both become the same
:class:`Record` list here: the record's body is the log line, and its attributes, over the
resource's, carry the fields (``feddale.source`` names the source).

Unknown JSON fields are ignored, as the OTLP specification asks of receivers. The protobuf
messages come from the ``opentelemetry-proto`` package, imported only when a protobuf body
arrives, so the core library does not need it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SOURCE_ATTRIBUTE = "feddale.source"


class OtlpError(ValueError):
    """A body that is not an OTLP logs export (the receiver answers 400)."""


class BodyTooLarge(ValueError):
    """A compressed body that inflates past the limit (the receiver answers 413)."""


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AnyValue(_Lenient):
    """OTLP ``AnyValue``; only strings are log lines here (and attribute values we read)."""

    stringValue: str | None = None


class KeyValue(_Lenient):
    key: str
    value: AnyValue | None = None


class LogRecord(_Lenient):
    body: AnyValue | None = None
    attributes: list[KeyValue] = Field(default_factory=list)


class ScopeLogs(_Lenient):
    logRecords: list[LogRecord] = Field(default_factory=list)


class Resource(_Lenient):
    attributes: list[KeyValue] = Field(default_factory=list)


class ResourceLogs(_Lenient):
    resource: Resource | None = None
    scopeLogs: list[ScopeLogs] = Field(default_factory=list)


class ExportLogsRequest(_Lenient):
    """The JSON encoding of ``ExportLogsServiceRequest``."""

    resourceLogs: list[ResourceLogs] = Field(default_factory=list)


class PartialSuccess(BaseModel):
    rejectedLogRecords: int = 0
    errorMessage: str = ""


class ExportLogsResponse(BaseModel):
    """The JSON encoding of ``ExportLogsServiceResponse`` (no partialSuccess: all taken)."""

    partialSuccess: PartialSuccess | None = None


@dataclass(frozen=True)
class Record:
    """One log record: its line (None when the body is not a string) and its attributes."""

    line: str | None
    attributes: dict[str, str]


def _strings(pairs: list[KeyValue]) -> dict[str, str]:
    return {p.key: p.value.stringValue for p in pairs if p.value is not None and p.value.stringValue is not None}


def records_from_json(body: bytes) -> list[Record]:
    """The records of a JSON export; OtlpError when the body is not one."""
    try:
        request = ExportLogsRequest.model_validate_json(body)
    except ValidationError as error:
        raise OtlpError(f"not an OTLP/JSON logs export: {error.errors()[0]['msg']}") from None
    records = []
    for resource_logs in request.resourceLogs:
        shared = _strings(resource_logs.resource.attributes) if resource_logs.resource else {}
        for scope in resource_logs.scopeLogs:
            for record in scope.logRecords:
                line = record.body.stringValue if record.body is not None else None
                records.append(Record(line, {**shared, **_strings(record.attributes)}))
    return records


def records_from_protobuf(body: bytes) -> list[Record]:
    """The records of a protobuf export; OtlpError when the bytes do not decode as one."""
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    request = ExportLogsServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise OtlpError(f"not an OTLP/protobuf logs export ({error})") from None

    def strings(pairs) -> dict[str, str]:  # type: ignore[no-untyped-def]
        return {p.key: p.value.string_value for p in pairs if p.value.WhichOneof("value") == "string_value"}

    records = []
    for resource_logs in request.resource_logs:
        shared = strings(resource_logs.resource.attributes)
        for scope in resource_logs.scope_logs:
            for record in scope.log_records:
                line = record.body.string_value if record.body.WhichOneof("value") == "string_value" else None
                records.append(Record(line, {**shared, **strings(record.attributes)}))
    return records


def response_protobuf(rejected: int, message: str) -> bytes:
    """``ExportLogsServiceResponse`` as protobuf (partial success when something was rejected)."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse

    response = ExportLogsServiceResponse()
    if rejected:
        response.partial_success.rejected_log_records = rejected
        response.partial_success.error_message = message
    return response.SerializeToString()


def gunzip(body: bytes, limit: int) -> bytes:
    """A gzip body (``Content-Encoding: gzip``, the ``otlphttp`` exporter's default), inflated to at
    most ``limit`` bytes; OtlpError when it is not gzip, BodyTooLarge past the limit (a small
    body can inflate to gigabytes)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise OtlpError(f"Content-Encoding gzip, but the body is not gzip ({error})") from None
    if len(data) > limit:
        raise BodyTooLarge(f"the inflated body exceeds the {limit}-byte limit")
    return data
