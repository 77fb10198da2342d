"""LoRA adapters over HTTP: --lora-modules, /v1/models, a request picking an adapter with
`model`, vLLM's load/unload routes (gated by --allow-runtime-lora, behind the API key, OpenAI
error JSON on bad input), and the LoRA metrics."""

from __future__ import annotations

import threading

import httpx
import pytest

from packserve.scheduler import SamplingParams

API_KEY = "sekret"
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, make_lora) -> dict[str, str]:
    return {
        "alpha": str(make_lora(tiny_model_dir, 8, seed=21)),
        "beta": str(make_lora(tiny_model_dir, 32, seed=22, targets=("q_proj", "down_proj"))),
    }


@pytest.fixture(scope="module")
def lora_server(launch_server, adapters):
    modules = [f"{name}={path}" for name, path in adapters.items()]
    return launch_server("--lora-modules", *modules, "--max-lora-rank", "32", "--max-loras", "1")


@pytest.fixture(scope="module")
def runtime_server(launch_server):
    return launch_server("--allow-runtime-lora", "--api-key", API_KEY)


def test_models_lists_the_base_and_every_adapter(lora_server, adapters, model_name, error_body):
    url = lora_server.url
    data = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in data] == [model_name, "alpha", "beta"]
    assert data[0]["parent"] is None
    for card in data[1:]:
        assert card["parent"] == model_name and card["root"] == adapters[card["id"]]
    assert httpx.get(url + "/v1/models/beta", timeout=30).json() == data[2]
    error = error_body(httpx.get(url + "/v1/models/gamma", timeout=30), 404)
    assert error["code"] == "model_not_found"


def test_a_request_picks_its_adapter_with_model(
    lora_server, make_engine, adapters, model_name, error_body
):
    """Each adapter's greedy completion is the offline engine's with that adapter (swapping
    through one slot), and differs from the base's; an unknown model stays a 404."""
    engine = make_engine(
        lora_modules=tuple(f"{n}={p}" for n, p in adapters.items()), max_lora_rank=32
    )
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    texts = {}
    for name in (None, "alpha", "beta", "alpha"):
        body = {
            "model": name or model_name,
            "prompt": PROMPT,
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
        }
        r = httpx.post(lora_server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == body["model"]
        rid = engine.add_request(PROMPT, params, adapter=name)
        expected = []
        while engine.has_unfinished:
            expected += [t for d in engine.step() if d.request_id == rid for t in d.token_ids]
        got = r.json()["choices"][0]["text"]
        assert got == engine.tokenizer.decode(expected)
        texts[name] = got
    assert len({texts[None], texts["alpha"], texts["beta"]}) == 3
    body = {"model": "gamma", "prompt": PROMPT, "max_tokens": 2}
    r = httpx.post(lora_server.url + "/v1/completions", json=body, timeout=60)
    assert error_body(r, 404)["code"] == "model_not_found"


def test_lora_metrics(lora_server, metrics, metric, model_name):
    """vLLM's lora_requests_info (max_lora label) and the pool's load and eviction counters:
    the test above swapped alpha and beta through one slot."""
    snap = metrics(lora_server.url)
    info = [labels for (name, labels) in snap if name == "packserve:lora_requests_info"]
    assert len(info) == 1
    assert dict(info[0])["max_lora"] == "1"
    assert metric(snap, "packserve:lora_loads_total") >= 3
    assert metric(snap, "packserve:lora_evictions_total") >= 2


def test_runtime_loading_is_off_without_the_flag(lora_server, adapters, error_body):
    body = {"lora_name": "gamma", "lora_path": adapters["alpha"]}
    r = httpx.post(lora_server.url + "/v1/load_lora_adapter", json=body, timeout=30)
    assert "--allow-runtime-lora" in error_body(r, 403)["message"]
    r = httpx.post(lora_server.url + "/v1/unload_lora_adapter", json={"lora_name": "alpha"})
    error_body(r, 403)


def test_load_and_unload_at_run_time(runtime_server, adapters, error_body, tmp_path):
    url = runtime_server.url
    key = {"Authorization": f"Bearer {API_KEY}"}
    client = httpx.Client(base_url=url, headers=key, timeout=60)
    body = {"lora_name": "gamma", "lora_path": adapters["alpha"]}
    error_body(httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=30), 401)
    # Bad bodies and folders: 400 with OpenAI's error object.
    error_body(client.post("/v1/load_lora_adapter", json={"lora_name": "gamma"}), 400)
    error_body(client.post("/v1/load_lora_adapter", json={**body, "extra": 1}), 400)
    bad = client.post("/v1/load_lora_adapter", json={**body, "lora_path": str(tmp_path)})
    assert "adapter_config.json" in error_body(bad, 400)["message"]
    big = client.post("/v1/load_lora_adapter", json={**body, "lora_path": adapters["beta"]})
    assert "--max-lora-rank 16" in error_body(big, 400)["message"]  # rank 32
    r = client.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == 200, r.text
    assert "gamma" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "already" in error_body(client.post("/v1/load_lora_adapter", json=body), 400)["message"]
    done = client.post(
        "/v1/completions", json={"model": "gamma", "prompt": PROMPT, "max_tokens": 3}
    )
    assert done.status_code == 200, done.text
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
    assert r.status_code == 200, r.text
    error_body(client.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"}), 404)
    gone = client.post(
        "/v1/completions", json={"model": "gamma", "prompt": PROMPT, "max_tokens": 3}
    )
    error_body(gone, 404)
    assert [m["id"] for m in client.get("/v1/models").json()["data"]][1:] == []


def test_unloading_ends_a_running_stream_with_an_error(runtime_server, adapters, parse_sse):
    """A stream whose adapter is unloaded while it runs ends with an error event and [DONE]:
    no 500, no hang."""
    client = httpx.Client(
        base_url=runtime_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    )
    body = {"lora_name": "delta", "lora_path": adapters["alpha"]}
    assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
    request = {
        "model": "delta",
        "prompt": PROMPT,
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    started = threading.Event()
    lines: list[str] = []

    def read() -> None:
        with client.stream("POST", "/v1/completions", json=request) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(60)
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "delta"}).status_code == 200
    reader.join(60)
    assert not reader.is_alive()
    events = parse_sse(lines)
    assert events[-1] == "[DONE]"
    assert any("unloaded" in str(e.get("error", "")) for e in events[:-1]), events[-3:]
