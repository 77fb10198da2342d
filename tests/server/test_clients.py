"""Clients no one here wrote, against the real server on the tiny model: LiteLLM maps our
context-overflow 400 to its ContextWindowExceededError (what its context-window fallbacks catch),
and LangChain's `with_structured_output` gets a validated pydantic object back."""

from __future__ import annotations

from typing import Annotated, Literal

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field


class Ticket(BaseModel):
    """A bounded schema, so that the random model's constrained output always ends."""

    model_config = ConfigDict(extra="forbid")

    title: Annotated[str, Field(max_length=10, description="a short title")]
    priority: Literal["low", "medium", "high"]
    urgent: bool


@pytest.fixture(scope="module")
def max_model_len(base_url: str) -> int:
    r = httpx.get(base_url + "/v1/models", timeout=30)
    (card,) = r.json()["data"]
    return int(card["max_model_len"])


@pytest.fixture
def litellm(monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import
    import litellm

    return litellm


def _litellm_chat(litellm, base_url: str, model_name: str, content: str, max_tokens: int):
    return litellm.completion(
        model=f"openai/{model_name}",
        api_base=base_url + "/v1",
        api_key="x",
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        num_retries=0,
    )


def test_litellm_max_tokens_past_the_context_is_context_window_exceeded(
    litellm, base_url, model_name, max_model_len
):
    with pytest.raises(litellm.ContextWindowExceededError):
        _litellm_chat(litellm, base_url, model_name, "Hello", max_model_len + 10)
    # a request that fits is answered: the exception is about the window, not the route
    fits = _litellm_chat(litellm, base_url, model_name, "Hello", 2)
    assert fits.choices[0].message.role == "assistant"


def test_litellm_prompt_past_the_context_is_context_window_exceeded(
    litellm, base_url, model_name, max_model_len
):
    with pytest.raises(litellm.ContextWindowExceededError):
        _litellm_chat(litellm, base_url, model_name, "hello " * (max_model_len + 50), 1)


@pytest.mark.parametrize("method", ["json_schema", "function_calling", None])
def test_langchain_with_structured_output_returns_the_model(base_url, model_name, method):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=base_url + "/v1",
        api_key="x",  # type: ignore[arg-type]
        model=model_name,
        temperature=0,
        max_tokens=200,  # type: ignore[call-arg]
        max_retries=0,
    )
    structured = (
        llm.with_structured_output(Ticket)
        if method is None
        else llm.with_structured_output(Ticket, method=method)
    )
    ticket = structured.invoke("File a ticket about the broken printer.")
    assert isinstance(ticket, Ticket)
    assert len(ticket.title) <= 10 and ticket.priority in ("low", "medium", "high")
