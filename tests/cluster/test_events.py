"""The typed messages between the actors and their versioned msgpack codec."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from entropyinfer.cluster.events import (
    VERSION,
    Accepted,
    Error,
    Final,
    Message,
    MessageError,
    Progress,
    Request,
    Token,
    decode,
    decode_event,
    encode,
)
from entropyinfer.errors import InvalidRequestError, PromptTooLongError, UnknownPolicyError
from entropyinfer.shard.sampling import SamplingParams

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Héllo 😀"}]
MESSAGES: list[Message] = [
    Request("r-1", "The capital of France is", SamplingParams(max_tokens=4)),
    Request(
        "r-2",
        CHAT,
        SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, top_k=40, seed=3, stop=["\n", "."]),
        policy="entropy",
        stream=True,
    ),
    Accepted(prompt_tokens=17),
    Progress(done=512, total=2048),
    Token(text=" Paris", token_id=7042),
    Token(text="", token_id=0),  # a character still incomplete
    Final("Paris.", "stop", 2, 17, {"policy": "dense", "density": 1.0, "prefill_ms": 3.5, "rigid": None}),
    Final("", "cancelled", 0, 17),
    Error("invalid_request", "temperature must be in [0, 2] (got 3)", "temperature"),
    Error("prompt_too_long", "the prompt has 9000 tokens"),
    Error("unknown_policy", "unknown policy 'magic'", "policy"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: f"{m.TAG}")
def test_every_message_round_trips(message: Message) -> None:
    data = encode(message)
    back = decode(data)
    assert back == message and type(back) is type(message)
    body = msgpack.unpackb(data)
    assert body["v"] == VERSION and body["tag"] == message.TAG
    assert set(body) == {"v", "tag"} | {f.name for f in dataclasses.fields(message)}


def test_the_request_carries_its_sampling_params_as_themselves() -> None:
    request = MESSAGES[1]
    assert isinstance(request, Request)
    back = decode(encode(request))
    assert isinstance(back, Request) and back.sampling == request.sampling
    assert back.sampling.stop == ["\n", "."] and back.sampling.to_dict() == request.sampling.to_dict()


def _raw(**body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (_raw(v=VERSION + 1, tag="token", text="x", token_id=1), "version 2"),
        (_raw(tag="token", text="x", token_id=1), "version None"),
        (_raw(v=VERSION, tag="tokens", text="x", token_id=1), "unknown message tag 'tokens'"),
        (_raw(v=VERSION, text="x", token_id=1), "unknown message tag None"),
        (_raw(v=VERSION, tag="token", text="x", token_id=1, logprobz=0.5), "unknown field(s) logprobz"),
        (_raw(v=VERSION, tag="token", text="x"), "token_id"),
        (_raw(v=VERSION, tag="token", text=5, token_id=1), "token.text"),
        (_raw(v=VERSION, tag="progress", done=True, total=3), "progress.done"),
        (_raw(v=VERSION, tag="error", type="oops", message="m", field=None), "error.type 'oops'"),
        (
            _raw(v=VERSION, tag="request", request_id="r", prompt="p", sampling={"temperature": 3}),
            "temperature",
        ),
        (
            _raw(v=VERSION, tag="request", request_id="r", prompt="p", sampling={"temprature": 1}),
            "temprature",
        ),
        (_raw(v=VERSION, tag="request", request_id="r", prompt=[{"role": 1}], sampling={}), "a prompt is"),
        (
            _raw(
                v=VERSION, tag="final", text="", finish_reason="stop", completion_tokens=0, stats={"a": [1]}
            ),
            "stats",
        ),
        (msgpack.packb([1, 2]), "a message is a map"),
        (b"\xc1", "not a msgpack message"),
    ],
)
def test_bytes_that_are_not_a_message_of_this_version_raise_message_error(data: bytes, words: str) -> None:
    with pytest.raises(MessageError) as e:
        decode(data)
    assert words in str(e.value)


def test_decode_event_refuses_a_request() -> None:
    assert decode_event(encode(Progress(1, 2))) == Progress(1, 2)
    with pytest.raises(MessageError, match="expected an event"):
        decode_event(encode(MESSAGES[0]))


def test_request_errors_become_error_events_and_failures_do_not() -> None:
    bad = Error.from_exception(InvalidRequestError("top_k must be >= 0", field="top_k"))
    assert bad == Error("invalid_request", "top_k must be >= 0", "top_k")
    assert Error.from_exception(PromptTooLongError("too long")) == Error("prompt_too_long", "too long")
    unknown = Error.from_exception(UnknownPolicyError("unknown policy 'x'"))
    assert unknown == Error("unknown_policy", "unknown policy 'x'", "policy")
    assert Error.from_exception(RuntimeError("a bug")) is None


def test_messages_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Progress(1, 2).done = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 1.0  # type: ignore[misc]
    assert Final("", "cancelled", 0).cancelled and not Final("x", "stop", 1).cancelled
    assert {type(m).TAG for m in MESSAGES} == {"request", "accepted", "progress", "token", "final", "error"}
