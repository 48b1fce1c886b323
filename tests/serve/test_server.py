"""OpenAI-compatible server: a real uvicorn server in a thread, driven by the real `openai` client.

Greedy completions equal lorakit.load + model.generate for the same adapter; streaming chunks
concatenate to the non-streamed text; bad / unknown / corrupt adapters are 4xx and the server
keeps answering; a full queue is 429; API keys; metrics; graceful shutdown."""

import contextlib
import shutil
import socket
import threading
import time

import pytest
import torch

import lorakit
from lorakit.serve import AdapterPool, Engine

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from lorakit.serve.server import TextStream, build_app, create_app, render_chat  # noqa: E402
from tests.conftest import randomize  # noqa: E402

BASE = "tiny-base"
PROMPT = "The quick brown fox"


def load(model_dir):
    from lorakit.models import load_model

    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def adapter_root(tiny_model_dir, tmp_path_factory):
    """alpha (r4, all linears), beta (r2, q/v) and broken (alpha with a truncated weights file)."""
    root = tmp_path_factory.mktemp("serve-adapters")
    cfgs = {"alpha": lorakit.LoraConfig(r=4, alpha=8.0), "beta": lorakit.LoraConfig(r=2, alpha=4.0,
                                                                                    target=["q_proj", "v_proj"])}
    for i, (name, cfg) in enumerate(cfgs.items()):
        m, _ = load(tiny_model_dir)
        lorakit.inject(m, cfg)
        randomize(m, seed=10 + i, std=0.3)
        lorakit.save(m, root / name)
    shutil.copytree(root / "alpha", root / "broken")
    w = root / "broken" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    return root


class TestEngine(Engine):
    """An engine whose steps can be held (gate), slowed (delay) or made to raise once (fail_next)."""

    __test__ = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0
        self.fail_next = False

    def step(self):
        self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return super().step()


def make_app(model_dir, root, max_batch=4, **kw):
    model, tok = load(model_dir)
    pool = AdapterPool(root)
    return create_app(TestEngine(model, tok, pool, max_batch=max_batch), pool, BASE, **kw)


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a background thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server, thread
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def client(url, key="none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_root):
    app = make_app(tiny_model_dir, adapter_root)
    with running(app) as (url, _, _):
        yield url, app


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_root):
    """Greedy tokens + text of lorakit.load + model.generate, one request at a time."""
    models = {}

    def run(adapter, prompt_ids, max_new):
        if adapter not in models:
            m, tok = load(tiny_model_dir)
            if adapter is not None:
                lorakit.load(m, adapter_root / adapter)
            models[adapter] = (m, tok)
        m, tok = models[adapter]
        out = m.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False)
        toks = out[0, len(prompt_ids):].tolist()
        return toks, tok.decode(toks, skip_special_tokens=True)

    return run


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load(tiny_model_dir)[1]


def test_completions_equal_lorakit_generate(server, reference, tok):
    url, _ = server
    c = client(url)
    ids = tok(PROMPT)["input_ids"]
    seen = set()
    for adapter in [None, "alpha", "beta"]:
        res = c.completions.create(model=adapter or BASE, prompt=PROMPT, max_tokens=8, temperature=0)
        toks, text = reference(adapter, ids, 8)
        assert res.choices[0].text == text, adapter
        assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == len(toks)
        assert res.choices[0].finish_reason == ("stop" if toks[-1] == tok.eos_token_id else "length")
        assert res.model == (adapter or BASE) and res.object == "text_completion"
        seen.add(tuple(toks))
    assert len(seen) == 3  # each adapter really changes the output
    res = c.completions.create(model="alpha", prompt=ids, max_tokens=8, temperature=0)  # token-id prompt
    assert res.choices[0].text == reference("alpha", ids, 8)[1]


def test_chat_equals_generate_on_the_rendered_prompt(server, reference, tok):
    url, _ = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Moni, muli bwanji?"}]
    prompt, special = render_chat(tok, messages)
    ids = tok(prompt, add_special_tokens=not special)["input_ids"]
    res = client(url).chat.completions.create(model="beta", messages=messages, max_tokens=6, temperature=0)
    toks, text = reference("beta", ids, 6)
    assert res.choices[0].message.role == "assistant" and res.choices[0].message.content == text
    assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == len(toks)
    assert res.object == "chat.completion"


def test_streaming_concatenates_to_the_non_streamed_text(server):
    url, _ = server
    c = client(url)
    full = c.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(c.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    msgs = [{"role": "user", "content": "Pack my box"}]
    full = c.chat.completions.create(model=BASE, messages=msgs, max_tokens=10, temperature=0)
    chunks = list(c.chat.completions.create(model=BASE, messages=msgs, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_stop_strings(server):
    url, _ = server
    c = client(url)
    full = c.completions.create(model=BASE, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert len(full) >= 6
    stop = full[3:5]
    want = full[: full.find(stop)]
    res = c.completions.create(model=BASE, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "\x00never"])
    assert res.choices[0].text == want and res.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=BASE, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server):
    c = client(server[0])
    kw = {"model": "alpha", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.5, "top_p": 0.95}
    a, b = (c.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    assert a == b


def test_models_lists_base_then_adapters(server):
    models = client(server[0]).models.list()
    assert [m.id for m in models.data] == [BASE, "alpha", "beta", "broken"]


def test_unknown_adapter_is_404(server):
    url, _ = server
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(url).completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "model_not_found" and err["type"] and "nope" in err["message"]


@pytest.mark.parametrize("name", ["../etc", "/etc/passwd", "a/b", "..", "a.b", ""])
def test_unsafe_adapter_names_are_400(server, name):
    r = httpx.post(f"{server[0]}/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter_name"


def test_corrupt_adapter_is_400_and_the_server_keeps_serving(server):
    url, _ = server
    c = client(url)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="broken"):
            c.completions.create(model="broken", prompt=PROMPT, max_tokens=2, stream=stream)
    r = httpx.post(f"{url}/v1/adapters/load", json={"name": "broken"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_load_failed"
    assert c.completions.create(model="alpha", prompt=PROMPT, max_tokens=2).choices[0].text is not None
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_load_and_unload_adapters(server):
    url, app = server
    pool = app.state.pool
    r = httpx.post(f"{url}/v1/adapters/load", json={"name": "beta"})
    assert r.status_code == 200 and r.json()["pinned"] and r.json()["rank"] == 2
    assert "beta" in pool.stats.pinned and "beta" in httpx.get(f"{url}/v1/adapters").json()["pinned"]
    r = httpx.post(f"{url}/v1/adapters/unload", json={"name": "beta"})
    assert r.status_code == 200 and r.json()["unloaded"] is True
    assert "beta" not in pool.stats.adapters and "beta" not in pool.stats.pinned
    assert httpx.post(f"{url}/v1/adapters/load", json={"name": "zzz"}).status_code == 404
    assert httpx.post(f"{url}/v1/adapters/load", json={"name": "../x"}).status_code == 400
    assert httpx.post(f"{url}/v1/adapters/load", json={"name": BASE}).status_code == 400
    assert httpx.post(f"{url}/v1/adapters/load", json={}).status_code == 400


def test_bad_parameters_are_400(server):
    url, _ = server
    c = client(url)
    for kw, match in [({"n": 2}, "n=1"), ({"logprobs": 2}, "logprobs"), ({"max_tokens": 500}, "context length"),
                      ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature")]:
        with pytest.raises(openai.BadRequestError, match=match):
            c.completions.create(model=BASE, prompt=PROMPT, **{"max_tokens": 2, **kw})
    with pytest.raises(openai.BadRequestError, match="one prompt"):
        c.completions.create(model=BASE, prompt=["a", "b"], max_tokens=2)
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": BASE})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": BASE, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]


def test_concurrent_requests_match_sequential_ones(server):
    url, _ = server
    c = client(url)
    jobs = [(a, f"{PROMPT} {i}") for i, a in enumerate([BASE, "alpha", "beta", "alpha", BASE, "beta"])]
    want = [c.completions.create(model=a, prompt=p, max_tokens=6, temperature=0).choices[0].text for a, p in jobs]
    got = [None] * len(jobs)

    def go(i):
        a, p = jobs[i]
        got[i] = c.completions.create(model=a, prompt=p, max_tokens=6, temperature=0).choices[0].text

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == want


def test_health_and_metrics(server):
    url, _ = server
    client(url).completions.create(model="alpha", prompt=PROMPT, max_tokens=4)
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["model"] == BASE and h["in_flight"] == 0
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {line.split()[0]: float(line.split()[1]) for line in r.text.splitlines() if not line.startswith("#")}
    assert values["lorakit_queue_length"] == 0 and values["lorakit_requests_in_flight"] == 0
    assert values["lorakit_generated_tokens_total"] >= 4 and values["lorakit_tokens_per_second"] > 0
    assert values["lorakit_adapter_cache_hits_total"] >= 1 and values["lorakit_adapter_load_failures_total"] >= 1
    assert values['lorakit_http_responses_total{route="/v1/completions",code="200"}'] >= 1


def test_api_key(tiny_model_dir, adapter_root):
    with running(make_app(tiny_model_dir, adapter_root, api_key="sekrit")) as (url, _, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").completions.create(model=BASE, prompt=PROMPT, max_tokens=2)
        r = httpx.get(f"{url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client(url, "sekrit").completions.create(model="alpha", prompt=PROMPT, max_tokens=2).usage
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200


def test_full_queue_is_429_and_shutdown_finishes_in_flight_requests(tiny_model_dir, adapter_root):
    app = make_app(tiny_model_dir, adapter_root, max_batch=1, max_queue=0)
    engine, bridge = app.state.engine, app.state.bridge
    with running(app) as (url, server, thread):
        engine.gate.clear()  # the engine holds every step until the gate opens
        first = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(
            f"{url}/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 3}, timeout=30)))
        t.start()
        while bridge.counts()[0] < 1:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            client(url).completions.create(model=BASE, prompt=PROMPT, max_tokens=2)
        server.should_exit = True  # shut down while the first request is in flight
        time.sleep(0.3)
        assert t.is_alive() and thread.is_alive()
        engine.gate.set()
        t.join(10)
        thread.join(10)
        assert first["r"].status_code == 200 and first["r"].json()["usage"]["completion_tokens"] == 3
        assert not thread.is_alive() and not bridge.alive
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")


def test_engine_error_is_500_and_the_server_recovers(tiny_model_dir, adapter_root):
    app = make_app(tiny_model_dir, adapter_root)
    with running(app) as (url, _, _):
        c = client(url)
        app.state.engine.fail_next = True
        with pytest.raises(openai.InternalServerError, match="boom"):
            c.completions.create(model=BASE, prompt=PROMPT, max_tokens=3)
        assert c.completions.create(model="alpha", prompt=PROMPT, max_tokens=3).usage.completion_tokens >= 1
        assert app.state.bridge.counts() == (0, 0)


def test_a_closed_stream_cancels_its_request(tiny_model_dir, adapter_root):
    app = make_app(tiny_model_dir, adapter_root)
    app.state.engine.delay = 0.01
    app.state.engine.eos_ids = frozenset()  # no early eos: only the cancel can end it before 100 tokens
    with running(app) as (url, _, _):
        stream = client(url).completions.create(model="alpha", prompt=PROMPT, max_tokens=100, stream=True,
                                                temperature=0)
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 5
        while app.state.bridge.counts()[0] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.state.bridge.counts()[0] == 0
        assert app.state.engine.stats["decode_tokens"] < 60


def test_text_stream_deltas_and_stops(tok):
    ids = tok("The quick brown fox jumps over the lazy dog.")["input_ids"]
    text = TextStream(tok)
    assert "".join([text.push(i) for i in ids] + [text.finish()]) == tok.decode(ids, skip_special_tokens=True)
    text = TextStream(tok, ["brown", "zzz"])
    out = []
    for i in ids:
        out.append(text.push(i))
        if text.stopped:
            break
    assert "".join(out) == "The quick " and text.stopped
    assert all("b" not in d for d in out)  # the start of a possible stop is held back until it is decided


def test_render_chat_uses_the_tokenizer_template(tok):
    import copy

    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat(tok, msgs) == ("User: hi\nAssistant:", False)  # no template: the plain fallback
    templated = copy.deepcopy(tok)
    templated.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    assert render_chat(templated, msgs) == ("<s>user: hi\nassistant:", True)


def test_create_app_validation(tiny_model_dir, adapter_root):
    from lorakit.errors import ConfigError

    model, tok = load(tiny_model_dir)
    engine = Engine(model, tok, AdapterPool(adapter_root))
    for kw, msg in [({"max_queue": -1}, "max_queue"), ({"pool": AdapterPool(adapter_root)}, "engine's AdapterPool"),
                    ({"base_model_name": ""}, "base_model_name")]:
        with pytest.raises(ConfigError, match=msg):
            create_app(engine, **{"pool": None, "base_model_name": BASE, **kw})
    assert create_app(engine, None, BASE).state.pool is engine.pool


def test_build_app_loads_model_and_pool(tiny_model_dir, adapter_root):
    app = build_app(str(tiny_model_dir), adapter_root, max_batch=2, budget_mb=1, api_key="k")
    assert app.state.base_model_name == str(tiny_model_dir)
    assert app.state.engine.max_batch == 2 and app.state.pool.budget_bytes == 1 << 20


def test_main_serve_runs_uvicorn_with_the_env_api_key(tiny_model_dir, adapter_root, monkeypatch):
    from fastapi.testclient import TestClient

    from lorakit.serve.server import main_serve

    got = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: got.update(app=app, **kw))
    monkeypatch.setenv("LORAKIT_API_KEY", "env-key")
    assert main_serve(str(tiny_model_dir), str(adapter_root), "127.0.0.1", 8123, None, 3, 64) == 0
    assert got["host"] == "127.0.0.1" and got["port"] == 8123 and got["app"].state.engine.max_batch == 3
    tc = TestClient(got["app"])
    assert tc.get("/v1/models").status_code == 401
    ids = [m["id"] for m in tc.get("/v1/models", headers={"Authorization": "Bearer env-key"}).json()["data"]]
    assert ids == [str(tiny_model_dir), "alpha", "beta", "broken"]
