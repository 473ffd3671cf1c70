"""The SSE body of a streamed completion: the engine's events of one request as OpenAI chunks.

`sse_events` reads the engine replica's stream after its `Accepted` (the ingress awaited that before the
200 went out) and yields the `data:` lines: a chat stream's role chunk, one delta per `Token`, the finish
chunk, the usage chunk when the client asked for `stream_options.include_usage`, then `[DONE]`; an error
after the 200 is one error event, the 408 of a passed deadline (cluster/deadline.py) too. Leaving early
(the client disconnected, or the deadline passed) cancels the engine request, which aborts its sequence
in the engine core and frees its KV pages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentResponseGenerator

from entropyinfer.cluster.deadline import Deadline, within
from entropyinfer.cluster.events import Error, Event, Final, Token
from entropyinfer.cluster.http_errors import HTTPError, rejected, to_http_error
from entropyinfer.cluster.openai_format import DONE, Chunks


async def sse_events(
    gen: DeploymentResponseGenerator[Event],
    chunks: Chunks,
    prompt_tokens: int,
    include_usage: bool,
    prompt_field: str,
    deadline: Deadline | None = None,
) -> AsyncIterator[str]:
    finished = False
    try:
        if chunks.chat:
            yield chunks.role()
        while True:
            try:
                ev = await within(gen.__anext__(), deadline)
            except StopAsyncIteration:
                break
            if isinstance(ev, Token):
                yield chunks.delta(ev.text, logprob=ev.logprob)
            elif isinstance(ev, Final):
                finished = True
                yield chunks.delta(None, ev.finish_reason)
                if include_usage:
                    final = ev if ev.prompt_tokens else dataclasses.replace(ev, prompt_tokens=prompt_tokens)
                    yield chunks.usage(final)
            elif isinstance(ev, Error):
                finished = True
                yield chunks.error(rejected(ev, prompt_field).body())
                return
        yield DONE
    except HTTPError as e:  # the deadline passed
        yield chunks.error(e.body())
    except Exception as e:
        yield chunks.error(to_http_error(e, prompt_field).body())
    finally:
        if not finished:
            gen.cancel()
