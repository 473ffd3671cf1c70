"""Security of the HTTP API: keys on every route but /healthz, tenants kept apart, unguessable job ids,
the 127.0.0.1 bind, no pickle/eval on an input path, and each limit's 4xx naming the limit.

The key checks that need no server run in the fast loop; the rest against the session's Serve app.
"""

from __future__ import annotations

import ast
import hmac
import pickle
from pathlib import Path

import httpx
import pytest

from entropyinfer.cluster import wire
from entropyinfer.cluster.auth import KeyRing, owner_id
from entropyinfer.cluster.config import AuthConfig, load_serve_file
from entropyinfer.cluster.http_errors import HTTPError
from entropyinfer.cluster.launcher import EmbeddedServer

from .conftest import API_KEY, OTHER_KEY

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
FORBIDDEN_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    ring = KeyRing(("k1", "k2", "k3"))
    assert ring.owner("Bearer k1") == owner_id("k1")  # a match does not stop the comparisons
    assert len(calls) == 3
    for header in (None, "", "Bearer ", "bearer wrong", "Basic k1", "k1"):
        with pytest.raises(HTTPError) as e:
            ring.owner(header)
        assert e.value.status == 401
    assert KeyRing(()).owner(None) is None and KeyRing(()).open
    assert owner_id("k1") != owner_id("k2") and "k1" not in owner_id("k1")


def test_keys_from_config_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EI_TEST_KEYS", "a, b,,c")
    assert AuthConfig(api_key=None, api_key_env="EI_TEST_KEYS").keys() == ("a", "b", "c")
    assert AuthConfig(api_key="x", api_keys=("y",), api_key_env="EI_TEST_KEYS").keys() == ("x", "y")
    assert not AuthConfig(api_key_env=None).metrics_public


def test_the_server_binds_loopback_unless_configured() -> None:
    from entropyinfer.cluster.config import ServeAppConfig

    assert load_serve_file("serve").host == "127.0.0.1"
    assert EmbeddedServer(ServeAppConfig()).host == "127.0.0.1"


def _imports_and_calls(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text(), str(path))
    modules, calls = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            calls.add(node.func.id)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and (node.func.value.id, node.func.attr) == ("yaml", "load")
        ):
            calls.add("yaml.load")  # yaml.safe_load is the only YAML reader allowed
    return modules, calls


def test_no_pickle_or_eval_in_the_cluster_code() -> None:
    files = sorted(CLUSTER.glob("*.py"))
    assert len(files) > 20
    for f in files:
        modules, calls = _imports_and_calls(f)
        assert not modules & FORBIDDEN_MODULES, (f.name, modules & FORBIDDEN_MODULES)
        assert not calls & (FORBIDDEN_CALLS | {"yaml.load"}), (f.name, calls & FORBIDDEN_CALLS)


def test_the_decoders_refuse_pickles_and_extension_types() -> None:
    import msgpack

    for body in (pickle.dumps({"prompt": "x"}), pickle.dumps(object)):
        for fmt in ("json", "msgpack"):
            with pytest.raises(wire.WireError):
                wire.decode(body, fmt)  # type: ignore[arg-type]
    with pytest.raises(wire.WireError, match="extension type"):
        wire.decode(msgpack.packb(msgpack.ExtType(1, b"\x80\x04")), "msgpack")


# ---- against the server -------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}


@pytest.mark.serve
@pytest.mark.slow
def test_metrics_needs_a_key_and_healthz_does_not(server: EmbeddedServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.get("/metrics", headers=OTHER).status_code == 200
        assert http.get("/healthz").status_code == 200


@pytest.mark.serve
@pytest.mark.slow
def test_one_key_cannot_see_or_cancel_another_keys_jobs(server: EmbeddedServer) -> None:
    body = {"documents": ["Tenant A's private memo."], "question": "Whose?", "max_tokens": 1}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        mine = http.post("/v1/jobs", json={**body, "idempotency_key": "shared-key"}, headers=AUTH)
        assert mine.status_code == 201, mine.text
        job_id = mine.json()["id"]
        for method, path in (("GET", ""), ("GET", "/results"), ("DELETE", "")):
            seen = http.request(method, f"/v1/jobs/{job_id}{path}", headers=OTHER)
            assert seen.status_code == 404, (method, path, seen.text)
        # The same idempotency key under another API key is another job, not A's.
        theirs = http.post("/v1/jobs", json={**body, "idempotency_key": "shared-key"}, headers=OTHER)
        assert theirs.status_code == 201 and theirs.json()["id"] != job_id
        assert http.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["state"] != "cancelled"
        ids = {job_id, theirs.json()["id"]}
        for _ in range(3):
            ids.add(http.post("/v1/jobs", json=body, headers=AUTH).json()["id"])
    assert len(ids) == 5
    for i in ids:  # "job-" + 128 random bits
        assert len(i) == 36 and i.startswith("job-") and int(i[4:], 16) >= 0
    print(
        f"\nFIGURE tenants: 3 routes of another key's job answered 404; {len(ids)} job ids, 128 random bits"
    )


@pytest.mark.serve
@pytest.mark.slow
def test_each_limit_is_a_4xx_that_says_the_limit(server: EmbeddedServer) -> None:
    limits = server.config.limits
    with httpx.Client(base_url=server.url, timeout=60) as http:
        big = http.post(
            "/v1/jobs",
            content=b"x" * (limits.max_body_bytes + 1),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert big.status_code == 413 and str(limits.max_body_bytes) in big.json()["error"]["message"]
        docs = ["d"] * (limits.max_batch_documents + 1)
        many = http.post("/v1/jobs", json={"documents": docs, "question": "q"}, headers=AUTH)
        assert many.status_code == 400 and f"limit of {limits.max_batch_documents}" in many.text
        assert many.json()["error"]["field"] == "documents"
        long_doc = "word " * (2 * (limits.max_document_tokens or 0))
        tokens = http.post("/v1/jobs", json={"documents": ["ok", long_doc], "question": "q"}, headers=AUTH)
        assert tokens.status_code == 400, tokens.text
        err = tokens.json()["error"]
        assert err["field"] == "documents[1]" and f"limit of {limits.max_document_tokens}" in err["message"]
        asked = http.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": limits.max_tokens + 1}, headers=AUTH
        )
        assert asked.status_code == 400 and str(limits.max_tokens) in asked.text
    print(
        f"\nFIGURE limits: body > {limits.max_body_bytes} B -> 413, documents > {limits.max_batch_documents}"
        f" -> 400, document > {limits.max_document_tokens} tokens -> 400, max_tokens > {limits.max_tokens}"
        " -> 400"
    )


@pytest.mark.parametrize("public", [False, True])
def test_metrics_is_public_only_when_configured(monkeypatch: pytest.MonkeyPatch, public: bool) -> None:
    """The app-level key dependency itself, with the replica context stubbed (no Serve needed)."""
    import asyncio
    from types import SimpleNamespace

    from starlette.requests import Request

    from entropyinfer.cluster import ingress_base as ingress
    from entropyinfer.cluster.config import ServeAppConfig

    config = ServeAppConfig(auth=AuthConfig(api_key="k", api_key_env=None, metrics_public=public))
    fake = SimpleNamespace(config=config, keys=KeyRing(config.auth.keys()))
    monkeypatch.setattr(ingress.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=fake))

    def call(path: str, key: str | None = None) -> int:
        headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        scope = {"type": "http", "path": path, "headers": headers, "route": SimpleNamespace(path=path)}
        try:
            asyncio.run(ingress._require_api_key(Request(scope)))
        except HTTPError as e:
            return e.status
        return 200

    assert call("/healthz") == 200
    assert call("/metrics") == (200 if public else 401)
    assert call("/metrics", "k") == 200
    assert call("/v1/jobs") == 401 and call("/v1/jobs", "k") == 200
