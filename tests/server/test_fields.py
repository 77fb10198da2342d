"""Every request field is honoured or refused: the sampling fields act (logit_bias, min_p,
repetition_penalty, min_tokens, top_logprobs, n, max_completion_tokens), unknown and
unimplemented fields are 400s naming them (the flag relaxes unknown ones), max_tokens past the
context is OpenAI's context-overflow 400, and the small endpoints answer."""

from __future__ import annotations

import importlib.metadata
import math

import httpx
import openai
import pytest

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
PROMPT = "the cat the cat the cat the cat the cat"  # its tokens repeat
MESSAGES = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def eos(engine) -> int:
    (token,) = engine.info.eos_token_ids
    return token


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


# -- logit_bias ---------------------------------------------------------------------------------


def test_logit_bias_forces_and_bans_a_token(oai, model_name, tokenizer, offline):
    plain = offline(PROMPT, 4)
    forced = 1000
    r = oai.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={forced: 100}
    )
    assert r.choices[0].text == tokenizer.decode([forced] * 4)
    assert plain.token_ids[0] != forced  # it was the bias
    banned = str(plain.token_ids[0])
    r = oai.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={banned: -100}
    )
    assert r.choices[0].text != tokenizer.decode([plain.token_ids[0]])
    # chat, and sampled rather than greedy
    r = oai.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=3, temperature=1.0, seed=7,
        logit_bias={forced: 100},
    )  # fmt: skip
    assert r.choices[0].message.content == tokenizer.decode([forced] * 3)


@pytest.mark.parametrize(
    ("bias", "what"),
    [({"99999": 1}, "out of the vocabulary"), ({"x": 1}, "not an id"), ({"5": 101}, "over 100")],
)
def test_bad_logit_bias_is_400(http, error_body, bias, what):
    r = http.post(CMPL, json={"prompt": "hi", "max_tokens": 1, "logit_bias": bias})
    error = error_body(r, 400, "invalid_request_error")
    assert error["param"].startswith("logit_bias"), (what, error)  # logit_bias.5: the entry


# -- min_p ----------------------------------------------------------------------------------------


def test_min_p_drops_tokens_below_its_share_of_the_top_one(oai, model_name):
    """At temperature 1 min_p filters the model's own distribution: every sampled token's
    logprob is within log(min_p) of the most likely one's. Without it, on this flat
    distribution, tokens far below are drawn."""

    def worst_gap(**extra) -> float:
        r = oai.completions.create(
            model=model_name, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=3, logprobs=1,
            extra_body={"ignore_eos": True, **extra},
        )  # fmt: skip
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == 24
        return max(
            max(top.values()) - got
            for got, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True)
        )

    assert worst_gap() > -math.log(0.5)
    assert worst_gap(min_p=0.5) <= -math.log(0.5) + 1e-4


# -- repetition_penalty ---------------------------------------------------------------------------


def test_repetition_penalty_acts_on_prompt_and_output_tokens(oai, model_name, tokenizer, offline):
    prompt_ids = _ids(tokenizer, PROMPT)
    repeated = prompt_ids[-1]  # in the prompt; the bias makes greedy repeat it
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    bias = {str(repeated): 20}
    r = oai.completions.create(**body, logit_bias=bias)
    assert r.choices[0].text == tokenizer.decode([repeated] * 6)
    r = oai.completions.create(**body, logit_bias=bias, extra_body={"repetition_penalty": 100.0})
    out = tokenizer(r.choices[0].text, add_special_tokens=False).input_ids
    assert repeated not in out
    # Below 1 it favours what was seen: greedy turns to the prompt's own tokens.
    plain = offline(PROMPT, 6)
    r = oai.completions.create(**body, extra_body={"repetition_penalty": 0.05})
    favoured = tokenizer(r.choices[0].text, add_special_tokens=False).input_ids
    assert r.choices[0].text != plain.text
    assert favoured[0] in prompt_ids


@pytest.mark.parametrize("penalty", [1e308, 1e39, 0.001, 0])
def test_a_repetition_penalty_that_would_overflow_the_logits_is_refused(http, penalty):
    """Past [0.01, 100] a penalty overflows float32 logits to +-inf (a grammar's allowed
    tokens could all end at -inf): refused with a 400 naming the field."""
    body = {"prompt": "Hi", "max_tokens": 2, "repetition_penalty": penalty}
    r = http.post(CMPL, json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "repetition_penalty"


# -- min_tokens -----------------------------------------------------------------------------------


def test_min_tokens_holds_eos_back(http, eos):
    """EOS forced by logit_bias ends the request at once, unless min_tokens holds it back."""
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "logit_bias": {str(eos): 100}}
    r = http.post(CMPL, json=body).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == 1
    r = http.post(CMPL, json={**body, "min_tokens": 5}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == 6  # 5 held back, then the EOS
    r = http.post(CMPL, json={**body, "max_tokens": 5, "min_tokens": 5}).json()
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 5


def test_min_tokens_holds_stop_strings_back(http, offline):
    plain = offline(PROMPT, 16, ignore_eos=True)
    stop = plain.text[4:8]  # met within the first few tokens
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    early = http.post(CMPL, json={**body, "stop": stop}).json()
    assert early["choices"][0]["finish_reason"] == "stop"
    late = http.post(CMPL, json={**body, "stop": stop, "min_tokens": 12}).json()
    assert late["usage"]["completion_tokens"] >= 12
    assert late["choices"][0]["text"].startswith(early["choices"][0]["text"] + stop)


def test_min_tokens_over_max_tokens_is_400(http, error_body):
    r = http.post(CMPL, json={"prompt": "hi", "max_tokens": 2, "min_tokens": 3})
    assert "min_tokens" in error_body(r, 400, "invalid_request_error")["message"]


# -- top_logprobs, n, max_completion_tokens -------------------------------------------------------


def test_top_logprobs_20(oai, model_name):
    r = oai.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=2, logprobs=True, top_logprobs=20
    )
    assert all(len(e.top_logprobs) == 20 for e in r.choices[0].logprobs.content)


def test_top_logprobs_without_logprobs_is_400(http, error_body):
    body = {"messages": MESSAGES, "max_tokens": 1, "top_logprobs": 3}
    assert error_body(http.post(CHAT, json=body), 400)["param"] == "top_logprobs"


def test_n_up_to_128(oai, model_name, http, error_body):
    r = oai.completions.create(
        model=model_name, prompt="hi", max_tokens=1, n=128, temperature=1.0, seed=1
    )
    assert sorted(c.index for c in r.choices) == list(range(128))
    error = error_body(http.post(CMPL, json={"prompt": "hi", "max_tokens": 1, "n": 129}), 400)
    assert error["param"] == "n"


def test_max_completion_tokens(oai, model_name, http, error_body):
    r = oai.chat.completions.create(
        model=model_name, messages=MESSAGES, max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    same = {"messages": MESSAGES, "max_tokens": 2, "max_completion_tokens": 2, "ignore_eos": True}
    assert http.post(CHAT, json=same).json()["usage"]["completion_tokens"] == 2
    error = error_body(http.post(CHAT, json={**same, "max_tokens": 3}), 400)
    assert error["param"] == "max_completion_tokens"


# -- refused fields -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CMPL, CHAT])
def test_unknown_field_is_400_naming_it(oai, model_name, path):
    with pytest.raises(openai.BadRequestError) as caught:
        if path == CMPL:
            oai.completions.create(
                model=model_name, prompt="hi", max_tokens=1, extra_body={"frobnicate": 1}
            )
        else:
            oai.chat.completions.create(
                model=model_name, messages=MESSAGES, max_tokens=1, extra_body={"frobnicate": 1}
            )
    assert caught.value.param == "frobnicate"
    assert caught.value.code == "unknown_parameter"
    assert "frobnicate" in caught.value.message


@pytest.mark.parametrize(
    ("path", "field", "value", "harmless"),
    [
        (CMPL, "best_of", 2, 1),
        (CMPL, "suffix", "the end", None),
        (CHAT, "audio", {"voice": "alloy", "format": "wav"}, None),
        (CHAT, "modalities", ["text", "audio"], ["text"]),
        (CHAT, "prediction", {"type": "content", "content": "x"}, None),
    ],
)
def test_unimplemented_openai_field_is_400_naming_it(
    http, error_body, path, field, value, harmless
):
    base = {"prompt": "hi"} if path == CMPL else {"messages": MESSAGES}
    body = {**base, "max_tokens": 1}
    error = error_body(http.post(path, json={**body, field: value}), 400, "invalid_request_error")
    assert error["param"] == field and error["code"] == "unsupported_parameter", error
    assert http.post(path, json={**body, field: harmless}).status_code == 200


def test_what_the_sdk_sends_by_default_passes(oai, model_name):
    """The SDK's usual extras: stream_options, user, seed, stop, n, penalties."""
    stream = oai.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=2, stream=True, user="u1", seed=1,
        stream_options={"include_usage": True}, stop=["\n"], n=2, presence_penalty=0.1,
        frequency_penalty=0.1, temperature=0.5, top_p=0.9,
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage is not None


def test_allow_unknown_fields_ignores_them_and_logs_each_name_once(launch_server, error_body):
    server = launch_server("--allow-unknown-fields")
    body = {"prompt": "hi", "max_tokens": 1, "frobnicate": 1, "wibble": [1]}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for _ in range(3):
            assert client.post(CMPL, json=body).status_code == 200
        # Fields known and not implemented are refused still.
        error = error_body(client.post(CMPL, json={**body, "best_of": 3}), 400)
        assert error["param"] == "best_of"
    log = server.log_path.read_text()
    assert log.count("unknown request field ignored") == 2
    assert "frobnicate" in log and "wibble" in log
    server.stop(timeout=10)


# -- context overflow -----------------------------------------------------------------------------


def test_max_tokens_past_the_context_is_openais_overflow_400(http, error_body, oai, model_name):
    r = http.post(CMPL, json={"prompt": [7] * 100, "max_tokens": 5000})
    error = error_body(r, 400, "invalid_request_error")
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert error["message"] == (
        "This model's maximum context length is 2048 tokens. However, you requested 5100 "
        "tokens (100 in the prompt, 5000 in the completion). Please reduce the length of the "
        "prompt or completion."
    )
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=5000)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"
    # LiteLLM's ContextWindowExceededError matches this phrase.
    assert "this model's maximum context length is" in caught.value.message.lower()
    assert "in the messages, 5000 in the completion" in caught.value.message


def test_prompt_past_the_context_has_the_same_wording(http, error_body):
    error = error_body(http.post(CMPL, json={"prompt": [7] * 3000}), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith(
        "This model's maximum context length is 2048 tokens. However, your prompt resulted "
        "in 3000 tokens."
    )


def test_unsent_max_tokens_is_capped_not_refused(http, chat_ids):
    """A default is not a request: completions' 16 and chat's "the context left" fit
    whatever room the prompt leaves."""
    r = http.post(CMPL, json={"prompt": [7] * 2040, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    words = "word " * 2000
    messages = [{"role": "user", "content": words}]
    room = 2048 - len(chat_ids(messages))
    assert 0 < room < 64, room
    r = http.post(CHAT, json={"messages": messages, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == room


# -- small endpoints ------------------------------------------------------------------------------


def test_model_card_by_id(oai, model_name, http, error_body):
    card = oai.models.retrieve(model_name)
    assert card.id == model_name and card.object == "model"
    assert http.get(f"/v1/models/{model_name}").json() == http.get("/v1/models").json()["data"][0]
    error = error_body(http.get("/v1/models/gpt-4"), 404, "invalid_request_error")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("some/other-model")


def test_version(http):
    r = http.get("/version")
    assert r.status_code == 200
    assert r.json() == {"version": importlib.metadata.version("packserve")}
