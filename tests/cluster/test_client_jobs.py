"""The client SDK takes what it gives: `status`, `wait`, `results` and `cancel` accept the `JobStatus`
that `submit` returned as well as its id (sync and async), against the real local app (SmolLM2 on CPU);
a wrong type is a TypeError that says what to pass, before anything is sent."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from entropyinfer.cluster.client import AsyncClient, Client, JobStatus
from entropyinfer.cluster.launcher import EmbeddedServer

from .conftest import API_KEY

DOC = "The Eiffel Tower is in Paris."


def _never_called(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"a request was sent: {request.method} {request.url}")


@pytest.mark.parametrize("bad", [42, None, {"id": "job-1"}, b"job-1"])
def test_a_wrong_job_argument_is_a_type_error_saying_what_to_pass(bad: Any) -> None:
    with Client("http://x", transport=httpx.MockTransport(_never_called)) as c:
        for call in (c.status, c.results, c.cancel, c.wait):
            with pytest.raises(TypeError, match=r"job id \(str\) or the JobStatus that submit\(\) returned"):
                call(bad)

    async def scenario() -> None:
        async with AsyncClient("http://x", transport=httpx.MockTransport(_never_called)) as c:
            for call in (c.status, c.results, c.cancel, c.wait):
                with pytest.raises(TypeError, match="JobStatus that submit"):
                    await call(bad)

    asyncio.run(scenario())


@pytest.mark.serve
def test_sync_client_takes_the_job_status_submit_returned(server: EmbeddedServer) -> None:
    with Client(server.url, api_key=API_KEY, retries=2, backoff_s=0.2) as client:
        job = client.submit([DOC], "Where is it?", max_tokens=2)
        assert isinstance(job, JobStatus)
        done = client.wait(job, poll_s=0.1, timeout=300, progress=False)  # keywords kept
        assert done.id == job.id and done.state == "succeeded"
        assert client.status(job) == client.status(job.id)
        by_status, by_id = client.results(done), client.results(job.id)
        assert by_status == by_id and len(by_status) == 1 and by_status[0].text
        assert client.cancel(done).state == "succeeded"  # cancelling a finished job changes nothing


@pytest.mark.serve
def test_async_client_takes_the_job_status_submit_returned(server: EmbeddedServer) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.url, api_key=API_KEY, retries=2, backoff_s=0.2) as client:
            job = await client.submit([DOC], "Where is it?", max_tokens=2)
            done = await client.wait(job, poll_s=0.1, timeout=300, progress=False)
            assert done.id == job.id and done.state == "succeeded"
            assert (await client.status(job)).state == "succeeded"
            assert await client.results(job) == await client.results(job.id)
            assert (await client.cancel(job)).id == job.id

    asyncio.run(scenario())
