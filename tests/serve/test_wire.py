"""The wire codec: JSON and msgpack in, plain data out; nothing executes code."""

from __future__ import annotations

import pickle

import msgpack
import pytest

from entropyinfer.cluster import wire


def test_roundtrip_both_formats() -> None:
    obj = {"documents": ["a", "ü"], "n": 3, "x": 0.5, "ok": True, "none": None}
    for fmt in ("json", "msgpack"):
        assert wire.decode(wire.encode(obj, fmt), fmt) == obj  # type: ignore[arg-type]


def test_msgpack_keeps_bytes_and_str_apart() -> None:
    assert wire.unpack(wire.pack({"t": "s", "b": b"\xff\x00"})) == {"t": "s", "b": b"\xff\x00"}


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb(msgpack.ExtType(5, b"payload")),
        msgpack.packb({1: "int key"}),
        b"\x92\x01",  # array of 2 with one element
        msgpack.packb({"a": 1}) + b"\x00",  # trailing bytes
        b"\x91" * 100_000 + b"\x00",  # nested too deeply
        pickle.dumps({"a": 1}),  # a pickle is not msgpack and is never unpickled
    ],
)
def test_bad_msgpack_is_rejected(body: bytes) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.decode(body, "msgpack")
    assert e.value.status == 400


@pytest.mark.parametrize("body", [b"{", b'{"a": NaN}', b"\xff\xfe", b"", b"[" * 100_000])
def test_bad_json_is_rejected(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(body, "json")


def test_content_types() -> None:
    assert wire.format_of(None) == "json"
    assert wire.format_of("application/json; charset=utf-8") == "json"
    assert wire.format_of("application/x-msgpack") == "msgpack"
    with pytest.raises(wire.WireError) as e:
        wire.format_of("text/plain")
    assert e.value.status == 415
    assert wire.response_format("application/msgpack, */*") == "msgpack"
    assert wire.response_format("*/*") == "json"
