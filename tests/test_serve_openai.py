"""kiln serve's OpenAI-compatible routes on a language-model run, driven by OpenAI's own Python client against a
server on 127.0.0.1 started by the test (no network): completions equal to kiln's own generate (greedy, seeded,
with stop strings), streaming as server-sent events, continuous batching that answers short requests while a
long one is written, a queue limit counted in tokens, a client that disconnects mid-stream, and 422s."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'kiln[serve]'")
openai = pytest.importorskip("openai", reason="needs the openai client (the dev extra)")

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from test_serve_support import free_port  # noqa: E402
from test_text import CORPUS  # noqa: E402

import kiln  # noqa: E402
from kiln.serve import create_app  # noqa: E402

CONTEXT = 192

pytestmark = pytest.mark.usefixtures("one_thread")  # Run.generate in the tests, on tiny models


def lm_config(path) -> dict:
    return {"name": "tiny_chat", "seed": 0,
            "data": {"dataset": "text", "path": str(path), "context": CONTEXT, "tokenizer": "char"},
            "model": {"blocks": [{"type": "token_embedding", "width": 48},
                                 {"type": "positional_encoding", "kind": "learned"},
                                 {"type": "transformer_decoder", "layers": 2, "heads": 2},
                                 {"type": "lm_head"}]},
            "train": {"steps": 40, "batch_size": 8, "eval_every": 40, "eval_batches": 1, "log_every": 40,
                      "threads": 1, "optimizer": {"name": "adamw", "lr": 0.01}}}


class LoopbackServer:
    """The app of a run served by uvicorn in a thread on 127.0.0.1 (the test can look at its engine)."""

    def __init__(self, run, **settings) -> None:
        self.app = create_app(run, threads=1, **settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.app.state.kiln["generation"]

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-openai")
    (root / "corpus.txt").write_text(CORPUS)
    kiln.train(lm_config(root / "corpus.txt"), out=root / "run", live=False)
    return kiln.Run.load(root / "run")


@pytest.fixture(scope="module")
def server(lm_run):
    with LoopbackServer(lm_run.path) as s:
        yield s


def complete(server, **kw):
    return server.client().completions.create(model="tiny_chat", **kw)


def test_greedy_completion_equals_kilns_own_generate_with_usage(lm_run, server):
    out = complete(server, prompt="First", max_tokens=40, temperature=0)
    assert out.object == "text_completion" and out.model == "tiny_chat" and out.id.startswith("cmpl-")
    assert out.choices[0].text == lm_run.generate("First", 40, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.choices[0].index == 0
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (5, 40, 45)
    both = complete(server, prompt=["All:\n", "You are"], max_tokens=12, temperature=0)
    assert [c.index for c in both.choices] == [0, 1] and both.usage.prompt_tokens == 5 + 7
    assert [c.text for c in both.choices] == [lm_run.generate(p, 12, temperature=0) for p in ("All:\n", "You are")]
    assert [m.id for m in server.client().models.list()] == ["tiny_chat"]
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    body = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "max_tokens", "stream", "stop", "seed"} <= set(body["properties"]) and "/v1/models" in spec["paths"]
    assert "$defs" not in str(spec)  # every schema it refers to is in the document


def test_seeded_sampling_is_reproducible_and_equals_generate(lm_run, server):
    a = complete(server, prompt="Speak", max_tokens=30, temperature=0.9, seed=11).choices[0].text
    b = complete(server, prompt="Speak", max_tokens=30, temperature=0.9, seed=11).choices[0].text
    nucleus = complete(server, prompt="Speak", max_tokens=30, temperature=0.9, top_p=0.8, seed=11).choices[0].text
    assert a == b == lm_run.generate("Speak", 30, temperature=0.9, seed=11)
    assert nucleus == lm_run.generate("Speak", 30, temperature=0.9, top_p=0.8, seed=11)
    others = {complete(server, prompt="Speak", max_tokens=30, temperature=0.9, seed=s).choices[0].text
              for s in range(4)}
    assert len(others) > 1  # seeds matter: not greedy in disguise


def test_concurrent_requests_decoded_together_give_each_its_own_text(lm_run, server):
    prompts = [("First", 0), ("All:\n", 1), ("You", 2), ("Before we", 3), ("Speak, sp", 4), ("rather", 5)] * 2

    def one(i):
        p, seed = prompts[i]
        return complete(server, prompt=p, max_tokens=12 + 3 * i, temperature=0.8, seed=seed).choices[0].text

    server.engine.most_rows = 0
    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(one, range(len(prompts))))
    assert server.engine.most_rows >= 2  # they were decoded together
    assert texts == [lm_run.generate(p, 12 + 3 * i, temperature=0.8, seed=s) for i, (p, s) in enumerate(prompts)]


def test_kilns_own_route_generates_on_the_same_engine_windowed_past_the_context(lm_run, server):
    instances = [{"prompt": "First", "max_new_tokens": CONTEXT, "temperature": 0.8, "top_k": 5, "seed": 2},
                 {"prompt": "You", "max_new_tokens": 10, "temperature": 0, "stop": ["e"]}]
    got = httpx.post(server.url + "/v1/predict", json={"instances": instances}, timeout=60).json()["predictions"]
    assert got == [{"text": lm_run.generate(**inst)} for inst in instances]
    assert len(got[0]["text"]) == CONTEXT  # 5 + 192 tokens: past the context, windowed as Run.generate does


def test_stop_strings_end_the_text_before_them_streamed_or_not(lm_run, server):
    greedy = lm_run.generate("First", 60, temperature=0)
    stop = greedy[20:22]  # two characters the greedy text reaches: a stop string longer than one token
    want = lm_run.generate("First", 60, temperature=0, stop=[stop])
    assert want == greedy[: greedy.find(stop)]
    out = complete(server, prompt="First", max_tokens=60, temperature=0, stop=[stop, "never there"])
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    chunks = list(complete(server, prompt="First", max_tokens=60, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_streaming_sends_openai_chunks_then_usage_then_done(lm_run, server):
    chunks = list(complete(server, prompt="All:\n", max_tokens=25, temperature=0, stream=True,
                           stream_options={"include_usage": True}))
    assert len(chunks) >= 10  # text arrives as it is written, not in one piece
    assert "".join(c.choices[0].text for c in chunks if c.choices) == lm_run.generate("All:\n", 25, temperature=0)
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 25
    raw = httpx.post(server.url + "/v1/completions", json={"model": "tiny_chat", "prompt": "All", "max_tokens": 3,
                                                           "stream": True}, timeout=30)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_a_long_request_does_not_starve_short_ones_and_the_queue_counts_tokens(lm_run):
    # The queue holds 240 tokens: the long request takes 3 + 189 = 192 of them while it is written.
    with LoopbackServer(lm_run.path, max_queue_tokens=240) as s:
        slow_down(s.engine, 0.005)  # the long request lasts about a second however fast the machine
        long_done = threading.Event()
        started = threading.Event()

        def long_request():
            for chunk in s.client().completions.create(model="tiny_chat", prompt="All", max_tokens=CONTEXT - 3,
                                                       temperature=0, stream=True):
                started.set()
                if chunk.choices[0].finish_reason:
                    long_done.set()

        def short(prompt):
            text = s.client().completions.create(model="tiny_chat", prompt=prompt, max_tokens=4,
                                                 temperature=0).choices[0].text
            return text, long_done.is_set()

        with ThreadPoolExecutor(4) as pool:
            holder = pool.submit(long_request)
            assert started.wait(30)
            answers = list(pool.map(short, ["First", "You", "Speak"]))  # 3 x (<= 5 + 4) tokens fit beside it
            with pytest.raises(openai.APIStatusError) as busy:  # 5 + 60 tokens do not
                s.client().completions.create(model="tiny_chat", prompt="First", max_tokens=60)
            holder.result(timeout=60)
        assert [t for t, _ in answers] == [lm_run.generate(p, 4, temperature=0) for p in ["First", "You", "Speak"]]
        assert not any(done for _, done in answers), "a short request waited for the long one to finish"
        assert busy.value.status_code == 503 and "tokens" in busy.value.body["message"]
        assert s.engine.queued_tokens == 0


def slow_down(engine, seconds: float):
    """Each decoding step of ``engine`` takes at least ``seconds`` more; gives back what to restore."""
    on_step = engine.on_step
    engine.on_step = lambda tokens, took: (on_step(tokens, took), time.sleep(seconds))
    return on_step


@pytest.fixture
def slow_steps(server):
    """Each decoding step takes at least 2 ms (a long generation then lasts > 0.3 s on any machine)."""
    on_step = slow_down(server.engine, 0.002)
    yield server.engine
    server.engine.on_step = on_step


def wait_cancelled(engine, cancelled: int) -> None:
    deadline = time.monotonic() + 30
    while engine.active or engine.cancelled == cancelled:
        assert time.monotonic() < deadline, "the generation went on after its client left"
        time.sleep(0.01)


@pytest.mark.parametrize("streamed", [True, False])
def test_a_client_that_disconnects_stops_its_generation(server, slow_steps, streamed):
    engine = slow_steps
    before, cancelled = engine.generated, engine.cancelled
    body = {"model": "tiny_chat", "prompt": "First", "max_tokens": CONTEXT - 5, "stream": streamed}
    if streamed:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30, json=body) as r:
            assert next(r.iter_lines()).startswith("data: ")  # generation has begun; now go away
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes the connection
            httpx.post(server.url + "/v1/completions", timeout=0.1, json=body)
    wait_cancelled(engine, cancelled)
    assert engine.cancelled == cancelled + 1 and engine.generated - before < CONTEXT - 5
    assert engine.queued_tokens == 0
    assert complete(server, prompt="First", max_tokens=3, temperature=0).choices[0].finish_reason == "length"


def test_the_openai_clients_api_key_is_the_servers_key(lm_run, monkeypatch):
    monkeypatch.setenv("KILN_TEST_OPENAI_KEY", "s3cret-key")
    with LoopbackServer(lm_run.path, api_key_env="KILN_TEST_OPENAI_KEY") as s:
        keyed = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret-key", max_retries=0)  # sent as a Bearer token
        assert keyed.completions.create(model="tiny_chat", prompt="All", max_tokens=2).usage.completion_tokens == 2
        assert [m.id for m in keyed.models.list()] == ["tiny_chat"]
        with pytest.raises(openai.AuthenticationError):
            s.client().completions.create(model="tiny_chat", prompt="All", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            s.client().models.list()


@pytest.mark.parametrize(("body", "status", "code", "names"), [
    ({"prompt": "First ✓ 日本"}, 422, "invalid_input", ["'✓'", "'日'", "'本'", "prompt"]),
    ({"prompt": ["First", "naïve"]}, 422, "invalid_input", ["'ï'", "prompt.1"]),
    ({"prompt": "First", "max_tokens": CONTEXT}, 422, "context_length_exceeded", [f"context of {CONTEXT}", "at most"]),
    ({"prompt": "First", "n": 2}, 422, "invalid_request", ["n"]),
    ({"prompt": "First", "logprobs": 3}, 422, "invalid_request", ["logprobs"]),
    ({"prompt": "First", "temperature": 3}, 422, "invalid_request", ["temperature"]),
    ({"prompt": "First", "stop": ["a", "b", "c", "d", "e"]}, 422, "invalid_request", ["stop"]),
    ({"prompt": [1, 2, 3]}, 422, "invalid_request", ["prompt"]),
    ({"prompt": "First", "model": "gpt-4"}, 404, "model_not_found", ["'gpt-4'", "'tiny_chat'"]),
])
def test_bad_requests_are_answered_with_a_status_naming_the_problem(server, body, status, code, names):
    resp = httpx.post(server.url + "/v1/completions", json={"model": "tiny_chat", **body}, timeout=30)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and all(n in err["message"] for n in names), err
    with pytest.raises(openai.APIStatusError) as e:  # what an OpenAI client user sees
        server.client().completions.create(**{"model": "tiny_chat", **body})
    assert e.value.status_code == status and names[0] in e.value.message


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rotary"])
def test_batch_decoder_rows_joining_and_leaving_decode_as_each_alone(position):
    import torch
    from test_text import gpt

    from kiln.nn.batch_decode import BatchDecoder, batchable
    from kiln.nn.generate import Sampling, generate_ids

    torch.manual_seed(0)
    model = gpt(position, vocab=13, context=24).eval()
    prompts = [torch.randint(0, 13, (n,)) for n in (3, 7, 1, 5, 2)]
    lengths = [10, 4, 12, 1, 8]
    alone = [list(generate_ids(model, p, Sampling(n, temperature=0))) for p, n in zip(prompts, lengths, strict=True)]
    assert batchable(model)
    decoder, rows, logits, outs = BatchDecoder(model), [], None, [[] for _ in prompts]
    pending = list(range(len(prompts)))
    while pending or rows:
        if pending:  # one joins every step, with rows of other lengths already decoding
            i = pending.pop(0)
            cache, last = decoder.prefill(prompts[i])
            decoder.add(cache, len(prompts[i]))
            rows, logits = rows + [i], last[None] if logits is None else torch.cat([logits, last[None]])
        tokens = logits.argmax(-1)
        for r, i in enumerate(rows):
            outs[i].append(int(tokens[r]))
        keep = [r for r, i in enumerate(rows) if len(outs[i]) < lengths[i]]
        decoder.keep(keep)
        rows = [rows[r] for r in keep]
        logits = decoder.step(tokens[keep]) if rows else None
        assert decoder.length <= 24
    assert outs == alone
