"""Hostile input, property-based (hypothesis): the msgpack and JSON decoders, the typed actor messages
and the request schemas without a server (fast loop), then every route of the ingress over HTTP against
the session's Serve app: deep nesting, huge payloads, invalid UTF-8 and lone surrogates, wrong types,
NaN/inf, huge integers, oversized batches, path-like and very long job ids, wrong content types and
methods. The figures: inputs tried, 5xx seen (target 0), crashes (an exception other than the decoder's
own error; target 0).
"""

from __future__ import annotations

import contextlib
import json
import math
import urllib.parse
from collections import Counter
from typing import Any

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from entropyinfer.cluster import events, wire
from entropyinfer.cluster.schemas import ChatCompletionRequest, CompletionRequest, JobRequest

from .conftest import API_KEY

LIMITS = wire.Limits(max_items=4096, max_containers=4 * 4096 + 64)
FIELDS = [
    "prompt", "messages", "documents", "question", "questions", "max_tokens", "temperature", "top_p",
    "top_k", "seed", "stop", "stream", "policy", "model", "n", "idempotency_key", "stream_options",
    "ignore_eos", "role", "content", "text", "name", "echo", "logprobs", "v", "tag", "sampling",
]  # fmt: skip
HOSTILE_NUMBERS = [math.nan, math.inf, -math.inf, 10**400, -(2**63) - 1, 2**64, 1e308, -0.0, 2**31]
HOSTILE_TEXT = ["\ud800", "\udfff", "a\x00b", "../../etc/passwd", "%2e%2e%2f", "\u202e", "x" * 100_000]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(), st.sampled_from(HOSTILE_NUMBERS), st.sampled_from(HOSTILE_TEXT), st.binary(max_size=64),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), inner, max_size=6),
    ),
    max_leaves=24,
)
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8)
TRIED: Counter[str] = Counter()  # inputs per target, for the figure
CRASHES: list[str] = []


def _deep(n: int, json_text: bool) -> bytes:
    return (b"[" * n + b"]" * n) if json_text else b"\x91" * n + b"\xc0"


def _json_bytes(obj: object) -> bytes:
    """JSON text of anything (NaN/Infinity and lone surrogates as Python writes them)."""
    return json.dumps(obj, default=repr).encode("utf-8", "surrogatepass")


def _msgpack_bytes(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=repr, unicode_errors="surrogatepass")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=512), values.map(_json_bytes), values.map(_msgpack_bytes)))
def test_the_wire_decoders_raise_only_wire_errors(body: bytes) -> None:
    for fmt in ("json", "msgpack"):
        TRIED["wire"] += 1
        try:
            wire.decode(body, fmt, LIMITS if fmt == "msgpack" else None)  # type: ignore[arg-type]
        except wire.WireError:
            pass
        except Exception as e:
            CRASHES.append(f"wire.decode({fmt}): {type(e).__name__}: {e}")
            raise


def test_deep_nesting_and_huge_numbers_are_refused() -> None:
    for n in (10_000, 200_000):
        with pytest.raises(wire.WireError):
            wire.decode(_deep(n, True), "json")
        with pytest.raises(wire.WireError):
            wire.decode(_deep(n, False), "msgpack", LIMITS)
    for text in (b"NaN", b"[Infinity]", b'{"a": -Infinity}', b"1" * 5000, b'"\xff\xfe"', b"\xed\xa0\x80"):
        with pytest.raises(wire.WireError):
            wire.decode(text, "json")
    with pytest.raises(wire.WireError):
        wire.decode(msgpack.packb([[]] * 5000), "msgpack", LIMITS)
    TRIED["wire"] += 14


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=256), bodies.map(_msgpack_bytes), values.map(_msgpack_bytes)))
def test_actor_messages_decode_or_raise_message_error(data: bytes) -> None:
    TRIED["events"] += 1
    try:
        events.decode(data)
    except events.MessageError:
        pass
    except Exception as e:
        CRASHES.append(f"events.decode: {type(e).__name__}: {e}")
        raise


@settings(max_examples=150, deadline=None)
@given(bodies, st.sampled_from(["request", "token", "final", "error", "accepted", "progress"]))
def test_tagged_messages_with_hostile_fields(fields: dict[str, Any], tag: str) -> None:
    TRIED["events"] += 1
    data = _msgpack_bytes({"v": events.VERSION, "tag": tag, **fields})
    with contextlib.suppress(events.MessageError):
        events.decode(data)


@settings(max_examples=150, deadline=None)
@given(bodies)
def test_schemas_validate_or_raise_validation_errors(body: dict[str, Any]) -> None:
    for model in (CompletionRequest, ChatCompletionRequest, JobRequest):
        TRIED["schemas"] += 1
        with contextlib.suppress(ValidationError):
            model.model_validate(body)


# ---- over HTTP ----------------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}
POSTS = ["/v1/completions", "/v1/chat/completions", "/v1/jobs"]
CONTENT_TYPES = [
    "application/json", "application/msgpack", "application/x-msgpack", "text/plain", "",
    "application/json; charset=latin-1", "multipart/form-data; boundary=x", "application/json;;; q=\"x",
]  # fmt: skip
JOB_IDS = st.one_of(
    st.text(min_size=1, max_size=40),
    st.sampled_from(
        ["..", "../../etc/passwd", "%2e%2e", "job-" + "0" * 32, "a/b", "x" * 5000, "\u0000", "'; --"]
    ),
)


def _send(http: httpx.Client, method: str, path: str, **kw: Any) -> int:
    TRIED["http"] += 1
    resp = http.request(method, path, **kw)
    if resp.status_code >= 500:
        CRASHES.append(f"{method} {path[:80]} -> {resp.status_code}: {resp.text[:200]}")
    return resp.status_code


@pytest.fixture(scope="module")
def http(server: Any) -> Any:
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        yield c


def _bounded(body: dict[str, Any]) -> dict[str, Any]:
    """A generated body that happens to be valid still runs only a token (keeps the test short)."""
    return {**body, "max_tokens": 1} if "max_tokens" not in body else body


@pytest.mark.serve
@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(POSTS), bodies, st.sampled_from(CONTENT_TYPES), st.booleans())
def test_post_routes_never_answer_5xx(
    http: httpx.Client, path: str, body: dict[str, Any], ctype: str, mp: bool
) -> None:
    content = _msgpack_bytes(_bounded(body)) if mp else _json_bytes(_bounded(body))
    status = _send(http, "POST", path, content=content, headers={"Content-Type": ctype} if ctype else {})
    assert status < 500 or status == 503, status


@pytest.mark.serve
@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(JOB_IDS, st.sampled_from(["", "/results"]), st.sampled_from(["GET", "DELETE", "PUT", "PATCH", "POST"]))
def test_job_routes_with_hostile_ids_and_methods(
    http: httpx.Client, job_id: str, tail: str, method: str
) -> None:
    quoted = urllib.parse.quote(job_id.encode("utf-8", "surrogatepass"), safe="/.%")  # path-like stays
    path = "/v1/jobs/" + quoted + tail
    assert _send(http, method, path) < 500


@pytest.mark.serve
@pytest.mark.slow
def test_raw_hostile_bodies_and_wrong_methods(http: httpx.Client) -> None:
    raw = [
        b"",
        b"\xff\xfe\xfd",
        b'{"prompt": "\\ud800", "max_tokens": 1}',
        b'{"prompt": NaN}',
        _deep(100_000, True),
        _deep(100_000, False),
        b'{"prompt": ' + b"9" * 10_000 + b"}",
        b"[" + b"1," * 200_000 + b"1]",
        _msgpack_bytes({"documents": [""] * 5000, "question": "q"}),
        b'{"documents": "x", "question": 1}',
    ]
    for path in POSTS:
        for body in raw:
            for ctype in ("application/json", "application/msgpack"):
                assert _send(http, "POST", path, content=body, headers={"Content-Type": ctype}) < 500
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        for path in POSTS:
            assert _send(http, method, path) < 500
    for path in ("/healthz", "/metrics", "/v1/models"):
        assert _send(http, "POST", path, content=b"{}") < 500
    print(
        f"\nFIGURE fuzz: inputs tried {dict(TRIED)} (total {sum(TRIED.values())}), "
        f"5xx/crashes {len(CRASHES)}: {CRASHES[:5]}"
    )
    assert not CRASHES
