"""Bodies on the wire: JSON or msgpack, chosen by Content-Type (requests) and Accept (responses).

msgpack is decoded with `raw=False` (strings are str, binary is bytes), `strict_map_key=True` (map keys
must be str or bytes) and an ext hook that rejects every extension type: decoding yields only plain
data (None, bool, int, float, str, bytes, list, dict) and never runs code. Nothing here uses pickle.
"""

from __future__ import annotations

import json
from typing import Any, Literal, NoReturn

import msgpack

JSON_TYPE = "application/json"
MSGPACK_TYPE = "application/msgpack"
# Names clients use for msgpack in the wild; all mean the same format.
_MSGPACK_ALIASES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")

Format = Literal["json", "msgpack"]


class WireError(ValueError):
    """The body cannot be decoded (malformed JSON or msgpack, or an unsupported content type)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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


def decode(body: bytes, fmt: Format) -> Any:
    """Decode a request body; raises WireError with what is wrong."""
    if not body:
        raise WireError("the request body is empty")
    if fmt == "msgpack":
        return _unpack(body)
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except WireError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"malformed JSON body: {e}") from None
    except RecursionError:
        raise WireError("malformed JSON body: nested too deeply") from None


def encode(obj: Any, fmt: Format) -> bytes:
    """Encode a response (plain data only)."""
    if fmt == "msgpack":
        return msgpack.packb(obj, use_bin_type=True)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def pack(obj: Any) -> bytes:
    """msgpack bytes for plain data (what the client SDK sends)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(body: bytes) -> Any:
    """Decode msgpack bytes with the same safe settings the server uses."""
    return _unpack(body)


def _unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            use_list=True,
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
