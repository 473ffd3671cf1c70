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


def test_an_integer_too_long_to_parse_is_a_wire_error() -> None:
    """json.loads raises a plain ValueError (not JSONDecodeError) past 4300 digits."""
    with pytest.raises(wire.WireError) as e:
        wire.decode(b'{"max_tokens": 1' + b"0" * 5000 + b"}", "json")
    assert e.value.status == 400


LIMITS = wire.Limits(max_items=4096, max_map_len=64, max_containers=1000)


def _array32(n: int, item: bytes) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big") + item * n


@pytest.mark.parametrize(
    "body",
    [
        _array32(200_000, b"\x90"),  # 200k empty arrays: ~13 MB of lists from 200 kB
        _array32(200_000, b"\x80"),  # 200k empty maps
        msgpack.packb([[[]] * 4000] * 10),  # each array within max_items, 40k containers in all
        msgpack.packb({f"k{i}": 0 for i in range(100)}),  # a map over max_map_len
    ],
    ids=["empty-arrays", "empty-maps", "nested-arrays", "wide-map"],
)
def test_msgpack_bombs_are_rejected_within_limits(body: bytes) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.decode(body, "msgpack", LIMITS)
    assert e.value.status == 400


def test_limits_let_real_bodies_through_and_the_client_decodes_without_them() -> None:
    job = {"documents": [{"text": "d" * 1000, "name": f"{i}.txt"} for i in range(256)], "question": "q?"}
    assert wire.decode(wire.pack(job), "msgpack", LIMITS) == job
    big = {"results": [{"i": i} for i in range(5000)]}  # a response: no server limits on the client
    assert wire.decode(wire.pack(big), "msgpack") == big
