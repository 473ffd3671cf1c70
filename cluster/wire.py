"""Bodies on the wire: JSON or msgpack, chosen by Content-Type (requests) and Accept (responses).

msgpack is decoded with `raw=False` (strings are str, binary is bytes), `strict_map_key=True` (map keys
must be str or bytes) and an ext hook that rejects every extension type: decoding yields only plain
data (None, bool, int, float, str, bytes, list, dict) and never runs code. Nothing here uses pickle.

The server decodes with `Limits`: a msgpack body of empty arrays or maps would otherwise grow ~70x in
memory (one Python object per byte), so arrays, maps and the number of containers are bounded; strings
and binaries by the body itself. What stays is ~20-25x for bodies of tiny strings (JSON or msgpack):
the body size limit bounds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar

import msgpack

JSON_TYPE = "application/json"
MSGPACK_TYPE = "application/msgpack"
# Names clients use for msgpack in the wild; all mean the same format.
_MSGPACK_ALIASES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")

Format = Literal["json", "msgpack"]
T = TypeVar("T")


class WireError(ValueError):
    """The body cannot be decoded (malformed JSON or msgpack, or an unsupported content type)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Bounds on a decoded msgpack body (JSON is bounded by the body size alone)."""

    max_items: int = 4096  # elements in one array
    max_map_len: int = 1024  # keys in one map
    max_containers: int = 4 * 4096 + 64  # arrays and maps in the whole body


def format_of(content_type: str | None) -> Format:
    """The body format a Content-Type names; a missing Content-Type means JSON."""
    media = (content_type or JSON_TYPE).split(";", 1)[0].strip().lower()
    if media in _MSGPACK_ALIASES:
        return "msgpack"
    if media == JSON_TYPE or media.endswith("+json"):
        return "json"
    raise WireError(f"unsupported Content-Type {media!r}: send {JSON_TYPE} or {MSGPACK_TYPE}", status=415)


def response_format(accept: str | None) -> Format:
    """msgpack when the client's Accept header asks for it, JSON otherwise."""
    if accept and any(alias in accept.lower() for alias in _MSGPACK_ALIASES):
        return "msgpack"
    return "json"


def media_type(fmt: Format) -> str:
    return MSGPACK_TYPE if fmt == "msgpack" else JSON_TYPE


def decode(body: bytes, fmt: Format, limits: Limits | None = None) -> object:
    """Decode a request body (msgpack within `limits` when given); raises WireError with what is wrong."""
    if not body:
        raise WireError("the request body is empty")
    if fmt == "msgpack":
        return _unpack(body, limits)
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except WireError:
        raise
    except RecursionError:
        raise WireError("malformed JSON body: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise WireError(f"malformed JSON body: {e}") from None


def encode(obj: object, fmt: Format) -> bytes:
    """Encode a response (plain data only)."""
    if fmt == "msgpack":
        return msgpack.packb(obj, use_bin_type=True)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def pack(obj: object) -> bytes:
    """msgpack bytes for plain data (what the client SDK sends)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(body: bytes) -> object:
    """Decode msgpack bytes with the same safe settings the server uses."""
    return _unpack(body)


def _unpack(body: bytes, limits: Limits | None = None) -> object:
    bounds: dict[str, Any] = {}  # keyword arguments of msgpack.unpackb
    if limits is not None:
        containers = 0

        def count(obj: T) -> T:  # called once per decoded array and map
            nonlocal containers
            containers += 1
            if containers > limits.max_containers:
                raise WireError(f"msgpack body: more than {limits.max_containers} arrays and maps")
            return obj

        bounds = {
            "max_array_len": limits.max_items,
            "max_map_len": limits.max_map_len,
            "max_str_len": len(body),
            "max_bin_len": len(body),
            "list_hook": count,
            "object_hook": count,
        }
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            use_list=True,
            **bounds,
        )
    except WireError:
        raise
    except msgpack.ExtraData:
        raise WireError("malformed msgpack body: extra bytes after the first object") from None
    except Exception as e:  # msgpack raises ValueError, TypeError, StackError, FormatError, ...
        raise WireError(f"malformed msgpack body: {type(e).__name__}: {e}") from None


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise WireError(f"malformed msgpack body: extension type {code} is not accepted")


def _reject_constant(name: str) -> NoReturn:
    raise WireError(f"malformed JSON body: {name} is not a number JSON allows")
