"""``kvpipe serve`` with the real model, through the official ``openai`` client: models, completions and chat
(streaming and not), prefix hits reported as cached tokens, concurrent requests that never mix, seeded sampling,
OpenAI-style 400/404 errors, tokenize, health and Prometheus metrics."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from serve_proc import running_serve

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.model

MODEL_ID = "smol-e2e"


@pytest.fixture(scope="module")
def serve_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A ``kvpipe serve`` subprocess on a free loopback port (CPU + disk tier under a tmp dir)."""
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tmp / "kvpipe.yaml"
    cfg.write_text(yaml.safe_dump({"chunk_size": 256, "max_local_cpu_size": 0.3, "local_disk": str(tmp / "disk")}))
    with running_serve(["--config", str(cfg), "--served-model-name", MODEL_ID], tmp / "serve.log") as base:
        yield base, tmp / "serve.log"


@pytest.fixture(scope="module")
def server(serve_proc: tuple[str, Path]) -> str:
    return serve_proc[0]


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ID]


def test_chat_completion_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 8 and full.usage.prompt_tokens > 10

    stream = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_long_prompt_is_served_from_the_cache_the_second_time(client: openai.OpenAI) -> None:
    from kvpipe.integrations.context import sample_text

    prompt = sample_text()[:2600] + "\n\nQuestion: how many turbines are there?\nAnswer:"
    first = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=6, temperature=0)
    second = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=6, temperature=0)
    n = first.usage.prompt_tokens
    assert n > 512
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == n - n % 256
    assert second.choices[0].text == first.choices[0].text

    stream = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == first.choices[0].text


def test_concurrent_requests_queue_and_never_mix(client: openai.OpenAI) -> None:
    prompts = ["The capital of Italy is", "Water boils at a temperature of", "The largest planet is"]

    def ask(p: str) -> str:
        r = client.completions.create(model=MODEL_ID, prompt=p, max_tokens=6, temperature=0)
        return str(r.choices[0].text)

    solo = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts) * 2) as pool:
        together = list(pool.map(ask, prompts * 2))
    assert together == solo * 2


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    kw = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9}
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    assert a == b


def test_stop_sequences_end_the_completion(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_ID, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[","])
    assert "," not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 3.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 2}, "n"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [99999999]}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1] * 9000}, "prompt"),
    ({"max_tokens": 9000}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_completion_requests_get_openai_400s(client: openai.OpenAI, kwargs: dict[str, object],
                                                 param: str) -> None:
    args: dict[str, object] = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**args)  # type: ignore[call-overload]
    err = info.value.body
    assert isinstance(err, dict) and err["type"] == "invalid_request_error"
    assert err["param"] == param or str(err["param"]).startswith(param)
    assert err["message"]


def test_bad_chat_requests_and_unknown_models(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "wizard", "content": "x"}], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    # The server is still fine afterwards.
    ok = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_tokenize_health_and_metrics(server: str, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server}/health", timeout=30).json() == {"status": "ok"}
    tok = httpx.post(f"{server}/tokenize", json={"prompt": "hello world"}, timeout=30).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    chat = httpx.post(f"{server}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert chat.status_code == 200 and chat.json()["count"] > tok["count"]
    assert httpx.post(f"{server}/tokenize", json={}, timeout=30).status_code == 400

    client.completions.create(model=MODEL_ID, prompt="Metrics please", max_tokens=2, temperature=0)
    text = httpx.get(f"{server}/metrics", timeout=30).text
    for name in ("kvpipe_requests_total", "kvpipe_prompt_tokens_total", "kvpipe_hit_tokens_total",
                 "kvpipe_ttft_seconds_bucket", "kvpipe_ttft_seconds_count", 'kvpipe_tier_bytes{tier="cpu"}',
                 'kvpipe_tier_bytes{tier="disk"}'):
        assert name in text
    assert 'status="ok"' in text
    stats = httpx.get(f"{server}/kvpipe/stats", timeout=30).json()
    assert "cpu" in stats["tiers"]


def test_serve_logs_the_per_request_lines(serve_proc: tuple[str, Path], client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL_ID, prompt="Log line check", max_tokens=1, temperature=0)
    log = serve_proc[1].read_text()
    assert "kvpipe hit tokens:" in log and "Total tokens" in log
    assert "TTFT" in log


def test_a_port_in_use_is_one_line_before_the_model_loads() -> None:
    """The port is bound first: a busy one is one line and exit 2 at once (it used to be a uvicorn log line after
    the model had loaded, and an exit status of 1)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "kvpipe.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == f"kvpipe: error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_a_bad_config_value_is_one_line_before_the_model_loads() -> None:
    """A bad cache setting is reported (one line, exit 2) before the model is loaded, not after."""
    import os
    import socket

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # free again once closed: serve binds it first, then reads the config
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KVPIPE_LOCAL_CPU_TRANSPARENT_HUGEPAGES": "maybe"}
    r = subprocess.run([sys.executable, "-m", "kvpipe.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                       capture_output=True, text=True, timeout=120, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == "kvpipe: error: local_cpu_transparent_hugepages: got 'maybe', expected true or false"
    assert "loading the model" not in r.stdout
