"""Request validation at the HTTP edge: every bad input names its field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from entropyinfer.cluster.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    JobRequest,
    first_error,
)
from entropyinfer.errors import InvalidRequestError
from entropyinfer.shard.sampling import LIMITS, SamplingParams


def _field(model: type[BaseModel], body: dict[str, Any]) -> str | None:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    field, message = first_error(e.value)
    assert message
    return field


def test_valid_job_normalises_documents() -> None:
    job = JobRequest.model_validate(
        {"documents": ["a", b"b", {"text": b"c", "name": "c.txt"}], "questions": ["q1", "q2"]}
    )
    assert [(d.text, d.name) for d in job.documents] == [("a", None), ("b", None), ("c", "c.txt")]
    assert job.question_list == ["q1", "q2"]
    assert job.temperature == 0.0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"question": "q"}, "documents"),
        ({"documents": [], "question": "q"}, "documents"),
        ({"documents": ["ok", "  "], "question": "q"}, "documents[1]"),
        ({"documents": ["ok", b"\xff"], "question": "q"}, "documents[1]"),
        ({"documents": [7], "question": "q"}, "documents[0]"),
        ({"documents": ["d"]}, "question"),
        ({"documents": ["d"], "question": "q", "questions": ["q"]}, "question"),
        ({"documents": ["d"], "questions": ["q", ""]}, "questions[1]"),
        ({"documents": ["d"], "question": "q", "max_tokens": "10"}, "max_tokens"),
        ({"documents": ["d"], "question": "q", "max_tokens": 0}, "max_tokens"),
        ({"documents": ["d"], "question": "q", "max_tokens": True}, "max_tokens"),
        ({"documents": ["d"], "question": "q", "temperature": -0.5}, "temperature"),
        ({"documents": ["d"], "question": "q", "temperature": 1e9}, "temperature"),
        ({"documents": ["d"], "question": "q", "temperature": float("nan")}, "temperature"),
        ({"documents": ["d"], "question": "q", "top_p": 0}, "top_p"),
        ({"documents": ["d"], "question": "q", "top_k": -1}, "top_k"),
        ({"documents": ["d"], "question": "q", "seed": -1}, "seed"),
        ({"documents": ["d"], "question": "q", "stop": [""]}, "stop"),
        ({"documents": ["d"], "question": "q", "polcy": "dense"}, "polcy"),
    ],
)
def test_bad_job_bodies_name_the_field(body: dict[str, Any], field: str) -> None:
    assert _field(JobRequest, body) == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": ["a", "b"], "stream": True}, "prompt"),
        ({"prompt": "p", "n": 17}, "n"),  # over shard/sampling.py: MAX_N
        ({"prompt": "p", "stream": "yes"}, "stream"),
        ({"prompt": "p", "logprobs": 21}, "logprobs"),  # over MAX_LOGPROBS
    ],
)
def test_bad_completion_bodies(body: dict[str, Any], field: str) -> None:
    assert _field(CompletionRequest, body) == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "system", "content": "only a system message"}]}, "messages"),
    ],
)
def test_bad_chat_bodies(body: dict[str, Any], field: str) -> None:
    assert _field(ChatCompletionRequest, body) == field


def test_chat_accepts_openai_shapes() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 5,
            "presence_penalty": 0,  # unknown OpenAI fields are ignored
        }
    )
    assert req.max_tokens == 5
    assert req.chat() == [{"role": "user", "content": "hi"}]


LONE = "\ud800"  # what JSON "\ud800" decodes to: a str no UTF-8 encoder accepts


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (JobRequest, {"documents": [LONE], "question": "q"}, "documents[0]"),
        (JobRequest, {"documents": ["ok", {"text": "a" + LONE}], "question": "q"}, "documents[1]"),
        (JobRequest, {"documents": [{"text": "ok", "name": LONE}], "question": "q"}, "documents[0].name"),
        (JobRequest, {"documents": ["ok"], "question": LONE}, "question"),
        (JobRequest, {"documents": ["ok"], "questions": ["fine", LONE]}, "questions[1]"),
        (JobRequest, {"documents": ["ok"], "question": "q", "idempotency_key": LONE}, "idempotency_key"),
        (JobRequest, {"documents": ["ok"], "question": "q", "stop": [LONE]}, "stop[0]"),
        (JobRequest, {"documents": ["ok"], "question": "q", "policy": LONE}, "policy"),
        (CompletionRequest, {"prompt": LONE}, "prompt"),
        (CompletionRequest, {"prompt": ["fine", "x\udfffy"]}, "prompt[1]"),
        (CompletionRequest, {"prompt": "p", "model": LONE}, "model"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
            "messages[0].content[0].text",
        ),
    ],
)
def test_text_that_is_not_unicode_names_its_field(
    model: type[BaseModel], body: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    got, message = first_error(e.value)
    assert got == field and "not valid Unicode" in message, message


def test_valid_unicode_text_passes() -> None:
    job = JobRequest.model_validate({"documents": ["東京 😀 é"], "question": "¿qué?", "stop": ["😀"]})
    assert job.documents[0].text.encode("utf-8")


def test_each_body_builds_its_sampling_params_with_its_default_max_tokens() -> None:
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "stop": "."}
    )
    assert chat.sampling_params == SamplingParams(max_tokens=256, temperature=1.0, stop=["."])
    completion = CompletionRequest.model_validate({"prompt": "p", "top_p": 0.5, "seed": 7})
    assert completion.sampling_params == SamplingParams(max_tokens=16, temperature=1.0, top_p=0.5, seed=7)
    job = JobRequest.model_validate({"documents": ["d"], "question": "q", "max_tokens": 3, "top_k": 2})
    assert job.sampling_params == SamplingParams(max_tokens=3, temperature=0.0, top_k=2)


@pytest.mark.parametrize(
    ("name", "ok", "bad"),
    [
        ("temperature", 2.0, 2.5),  # OpenAI's cap, in the HTTP bodies and in the engine alike
        ("temperature", 0.0, -0.1),
        ("top_p", 1.0, 0.0),
        ("max_tokens", 1, 0),
        ("top_k", 0, -1),
        ("seed", 0, -1),
    ],
)
def test_one_table_of_limits_for_the_http_edge_and_the_engine(name: str, ok: float, bad: float) -> None:
    assert ok in LIMITS[name] and bad not in LIMITS[name]
    body = {"documents": ["d"], "question": "q", name: ok}
    assert getattr(JobRequest.model_validate(body).sampling_params, name) == ok
    with pytest.raises(InvalidRequestError) as engine:
        SamplingParams(**{name: bad})
    with pytest.raises(ValidationError) as edge:
        JobRequest.model_validate({**body, name: bad})
    field, message = first_error(edge.value)
    assert field == engine.value.field == name
    assert message == f"{name}: " + str(engine.value).removeprefix(f"{name} ")
    assert str(LIMITS[name]) in message


def test_chat_max_completion_tokens_is_its_max_tokens() -> None:
    messages = [{"role": "user", "content": "hi"}]
    newer = ChatCompletionRequest.model_validate({"messages": messages, "max_completion_tokens": 7})
    assert newer.sampling_params.max_tokens == 7
    both = {"messages": messages, "max_tokens": 3, "max_completion_tokens": 7}
    assert ChatCompletionRequest.model_validate(both).sampling_params.max_tokens == 3
    assert _field(ChatCompletionRequest, {"messages": messages, "max_completion_tokens": 0}) == "max_tokens"
