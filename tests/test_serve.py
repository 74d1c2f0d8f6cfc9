"""``jax-eplb serve`` as a user meets it: a real server process on loopback, the ``openai`` client,
Prometheus' parser, headless Chromium for the live page, SIGTERM at the end.

Two servers: the small model (16 experts, 4 emulated ranks) with online EPLB, statistics recording
and a saved online state; and the tiny Qwen3-MoE checkpoint transformers wrote, with its tokenizer
and chat template, a 2-row batch and a 2-request queue.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "qwen3_moe"
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url, processes, output, stop) -> None:
    """Until ``url``'s /health answers 200; a process that exits, or no answer in ``START_TIMEOUT_S``, fails
    the test with the server's ``output()`` (after ``stop()``)."""
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if any(p.poll() is not None for p in processes):
            pytest.fail(f"the server exited with {[p.poll() for p in processes]}: {output()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop()
    pytest.fail(f"the server did not start in {START_TIMEOUT_S} s: {output()}")


class Server:
    """``jax-eplb serve ...`` in a subprocess, ready once ``/health`` answers 200."""

    def __init__(self, args, env=None, cwd=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(cwd or ".") / f"serve_{self.port}.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "jax_eplb.cli", "serve", *args, "--port",
                                         str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})}, cwd=cwd)
        wait_until_healthy(self.url, [self.process], self.output, self.stop)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def metrics(self) -> dict:
        """{(name, labels as a sorted tuple): value} of every sample."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self, sig=signal.SIGTERM, timeout=120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


def completion(server, prompt, max_tokens, **kw):
    return server.client.completions.create(model=kw.pop("model", "small"), prompt=prompt, max_tokens=max_tokens,
                                            extra_body={"return_token_ids": True, **kw.pop("extra", {})}, **kw)


def token_ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def metric(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def prompts_of(count, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 64, rng.integers(2, 12))] for _ in range(count)]


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, small):
    folder = tmp_path_factory.mktemp("serve_small")
    (folder / "small.yaml").write_text(yaml.safe_dump(small.RAW))
    (folder / "extra.yaml").write_text("moe_load_balancer:\n  num_slots: 24\n  layer_updates_per_iter: 1\n")
    server = Server(["small.yaml", "--ep_size", "4", "--emulate_devices", "4", "--max_batch_size", "8",
                     "--max_seq_len", "40", "--prefill_chunk", "8", "--extra_llm_api_options", "extra.yaml",
                     "--online_state", "state", "--grace_period", "60"],
                    env={"EXPERT_STATISTIC_ITER_RANGE": "0-1000000", "EXPERT_STATISTIC_PATH": "stats"}, cwd=folder)
    server.folder = folder
    yield server
    server.stop()


def test_greedy_tokens_equal_the_benchmark_while_online_balancing_rewrites_slots(small_server, small):
    """12 concurrent greedy requests: the same tokens as ``bench throughput`` (no plan) on the same
    requests, while the online balancer rewrites slots under them."""
    from jax_eplb.model import SeededWeights
    from jax_eplb.serving import Request, ThroughputSettings, run_throughput

    from conftest import make_mesh

    prompts = prompts_of(12)
    before = small_server.metrics()
    results = [None] * len(prompts)

    def ask(i):
        results[i] = token_ids(completion(small_server, prompts[i], 12, temperature=0).choices[0])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bench = run_throughput(small.config(max_seq_len=40), SeededWeights(0),
                           [Request(i, tuple(p), 12) for i, p in enumerate(prompts)], make_mesh(4),
                           ThroughputSettings(max_batch_size=8, progress=False), log=lambda _: None)
    assert results == [bench.tokens[i] for i in range(len(prompts))]
    after = small_server.metrics()
    layers = small.config().moe_layer_ids
    moved = sum(metric(after, "jax_eplb_moe_slots_moved_total", layer=str(l))
                - metric(before, "jax_eplb_moe_slots_moved_total", layer=str(l)) for l in layers)
    rebalances = sum(metric(after, "jax_eplb_moe_rebalances_total", layer=str(l)) for l in layers)
    assert rebalances > 0 and moved > 0
    state = httpx.get(small_server.url + "/eplb").json()
    assert state["load_balancer"]["mode"] == "online" and state["num_slots"] == 24
    assert any(state["last_update"][str(l)] for l in layers)


def test_streaming_gives_the_same_tokens_as_a_whole_answer(small_server):
    prompt = prompts_of(1, seed=5)[0]
    whole = completion(small_server, prompt, 10, temperature=0).choices[0]
    chunks = list(completion(small_server, prompt, 10, temperature=0, stream=True,
                             stream_options={"include_usage": True}))
    streamed = [t for c in chunks for choice in c.choices for t in choice.model_extra["token_ids"]]
    assert streamed == token_ids(whole) and len(streamed) == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length" == whole.finish_reason
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == len(prompt)


def test_32_concurrent_clients_lose_nothing_and_seeds_repeat(small_server):
    """32 clients at once (greedy and sampled, streaming and not, 1-9 tokens): each gets exactly its
    tokens; a seeded request gives the same tokens again alone; a tiny top_p is greedy."""
    rng = np.random.default_rng(3)
    prompts, sizes = prompts_of(32, seed=9), rng.integers(1, 10, 32).tolist()
    before = small_server.metrics()
    results, errors = [None] * 32, []

    def ask(i):
        try:
            sampling = {"temperature": 0.9, "seed": 1000 + i} if i % 2 else {"temperature": 0}
            if i % 3 == 0:
                chunks = completion(small_server, prompts[i], sizes[i], stream=True, **sampling)
                results[i] = [t for c in chunks for ch in c.choices for t in ch.model_extra["token_ids"]]
            else:
                results[i] = token_ids(completion(small_server, prompts[i], sizes[i], **sampling).choices[0])
        except Exception as err:  # noqa: BLE001 - every failure is reported below
            errors.append(f"{i}: {err!r}")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [len(r) for r in results] == sizes
    after = small_server.metrics()
    assert metric(after, "jax_eplb_requests_total", finish_reason="length") \
        - metric(before, "jax_eplb_requests_total", finish_reason="length") == 32
    assert metric(after, "jax_eplb_generation_tokens_total") - metric(before, "jax_eplb_generation_tokens_total") \
        == sum(sizes)
    for i in (1, 3):  # sampled under a full batch, then alone: the same draw
        again = token_ids(completion(small_server, prompts[i], sizes[i], temperature=0.9, seed=1000 + i).choices[0])
        assert again == results[i]
    greedy = token_ids(completion(small_server, prompts[0], 6, temperature=0).choices[0])
    assert token_ids(completion(small_server, prompts[0], 6, temperature=1.5, top_p=1e-6).choices[0]) == greedy


def test_bad_requests_get_400_and_do_not_disturb_others(small_server):
    post = lambda body, **kw: httpx.post(small_server.url + "/v1/completions", timeout=60, **kw)  # noqa: E731
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault(
        "good", token_ids(completion(small_server, [1, 2, 3], 20, temperature=0).choices[0])))
    thread.start()
    cases = [({"content": b"{not json"}, "not JSON"),
             ({"json": {"model": "small", "prompt": list(range(1, 46))}}, "leaves no room"),
             ({"json": {"model": "other", "prompt": [1]}}, "model 'other' is not served here"),
             ({"json": {"model": "small", "prompt": [1], "n": 2}}, "'n' must be 1"),
             ({"json": {"model": "small", "prompt": [1], "max_tokens": -3}}, "positive integer"),
             ({"json": {"model": "small", "prompt": "text"}}, "no tokenizer"),
             ({"json": [1, 2]}, "must be a JSON object")]
    for kwargs, message in cases:
        response = post(None, **kwargs)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert message in error["message"] and "\n" not in error["message"]
    chat = httpx.post(small_server.url + "/v1/chat/completions", json={"model": "small", "messages": [
        {"role": "user", "content": "hi"}]}, timeout=60)
    assert chat.status_code == 400 and "no chat template" in chat.json()["error"]["message"]
    thread.join()
    alone = token_ids(completion(small_server, [1, 2, 3], 20, temperature=0).choices[0])
    assert results["good"] == alone and len(alone) == 20


def test_a_client_that_goes_away_frees_its_row(small_server):
    before = small_server.metrics()
    with httpx.stream("POST", small_server.url + "/v1/completions", timeout=60,
                      json={"model": "small", "prompt": [4, 5, 6], "max_tokens": 30, "stream": True,
                            "temperature": 0}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.time() + 30
    while time.time() < deadline:
        after = small_server.metrics()
        if metric(after, "jax_eplb_requests_total", finish_reason="abort") > \
                metric(before, "jax_eplb_requests_total", finish_reason="abort"):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the abandoned request was not aborted")
    assert metric(after, "jax_eplb_running_requests") == 0
    assert metric(after, "jax_eplb_generation_tokens_total") - metric(before, "jax_eplb_generation_tokens_total") < 30


def test_metrics_models_version_and_balance_state(small_server, small):
    before = small_server.metrics()
    completion(small_server, [9, 8, 7], 3, temperature=0)
    samples = small_server.metrics()
    gained = lambda name, **labels: metric(samples, name, **labels) - metric(before, name, **labels)  # noqa: E731
    # 3 tokens: one time to first token, two gaps - each a real decode step, none measured as 0 (the last
    # token's gap was once timed from itself, after the request was forgotten)
    assert gained("jax_eplb_time_to_first_token_seconds_count") == 1
    assert gained("jax_eplb_inter_token_latency_seconds_count") == 2
    assert gained("jax_eplb_inter_token_latency_seconds_bucket", le="0.001") == 0
    layers = [str(l) for l in small.config().moe_layer_ids]
    for name in ("jax_eplb_moe_rank_imbalance", "jax_eplb_moe_rebalances_total", "jax_eplb_moe_slots_moved_total",
                 "jax_eplb_moe_bytes_moved_total", "jax_eplb_moe_planner_seconds_total",
                 "jax_eplb_moe_rewrite_seconds_total"):
        assert sorted(dict(labels)["layer"] for (n, labels) in samples if n == name) == sorted(layers), name
    for name in ("jax_eplb_time_to_first_token_seconds_count", "jax_eplb_inter_token_latency_seconds_count",
                 "jax_eplb_prompt_tokens_total"):
        assert metric(samples, name) > 0, name
    assert metric(samples, "jax_eplb_batch_rows") == 8 and "jax_eplb_queue_depth" in {n for n, _ in samples}
    models = small_server.client.models.list()
    assert [m.id for m in models.data] == ["small"]
    assert httpx.get(small_server.url + "/version").json()["version"]
    state = httpx.get(small_server.url + "/eplb").json()
    assert state["layers"] == [int(l) for l in layers] and state["num_experts"] == 16 and state["ep_size"] == 4
    for layer in layers:
        placement = state["placement"][layer]
        assert len(placement) == 24 and set(placement) == set(range(16))  # every expert served
        assert len(state["expert_load"][layer]) == 16
    assert sum(sum(v) for v in state["expert_load"].values()) > 0 and state["history"]


def test_live_page_draws_the_heatmap_in_chromium(small_server, tmp_path, small):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium not installed (.ci/run installs Debian's chromium)")
    completion(small_server, [3, 1, 4, 1, 5], 4, temperature=0)
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          small_server.url + "/"], capture_output=True, text=True, timeout=120).stdout
    import re

    heatmap = re.search(r'<canvas id="heatmap"[^>]*>', dom).group(0)
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', heatmap))
    assert attrs["layers"] == str(small.config().num_moe_layers) and attrs["experts"] == "16"
    assert int(attrs["painted"]) > 0  # cells with load were drawn
    assert '<div id="error"></div>' in dom and "small: 16 experts in 24 slots on ep=4" in dom


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_chat")
    server = Server(["Qwen/Qwen3-tiny", "--model_path", str(FIXTURE), "--ep_size", "2", "--emulate_devices", "2",
                     "--max_batch_size", "2", "--max_queue_size", "2", "--max_seq_len", "64", "--prefill_chunk",
                     "16"], cwd=folder)
    yield server
    server.stop()


def test_chat_and_text_prompts_with_the_checkpoints_tokenizer(chat_server):
    from jax_eplb.server import TextCodec

    codec = TextCodec.from_directory(FIXTURE)
    messages = [{"role": "system", "content": "every rank gets the same work"},
                {"role": "user", "content": "route tokens to experts"}]
    chat = chat_server.client.chat.completions.create(model="Qwen/Qwen3-tiny", messages=messages, max_tokens=8,
                                                      temperature=0, extra_body={"return_token_ids": True})
    ids = codec.chat_ids(messages)
    assert chat.usage.prompt_tokens == len(ids)
    same = chat_server.client.completions.create(model="Qwen/Qwen3-tiny", prompt=ids, max_tokens=8, temperature=0,
                                                 extra_body={"return_token_ids": True}).choices[0]
    generated = chat.choices[0].model_extra["token_ids"]
    assert generated == token_ids(same)
    assert chat.choices[0].message.content == codec.decode(generated) == same.text
    stopped_at_eos = codec.eos_id in generated
    assert chat.choices[0].finish_reason == ("stop" if stopped_at_eos else "length")
    streamed = chat_server.client.chat.completions.create(model="Qwen/Qwen3-tiny", messages=messages, max_tokens=8,
                                                          temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    text = chat_server.client.completions.create(model="Qwen/Qwen3-tiny", prompt="the lazy dog jumps over",
                                                 max_tokens=12, temperature=0, extra_body={"ignore_eos": True,
                                                                                           "return_token_ids": True})
    words = text.choices[0].text.split()
    assert text.usage.prompt_tokens == len(codec.encode("the lazy dog jumps over"))
    assert text.choices[0].text == codec.decode(token_ids(text.choices[0]))
    if len(words) >= 3:  # a stop string ends the text before it
        stop = words[2]
        cut = chat_server.client.completions.create(model="Qwen/Qwen3-tiny", prompt="the lazy dog jumps over",
                                                    max_tokens=12, temperature=0, stop=[stop],
                                                    extra_body={"ignore_eos": True})
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
        assert text.choices[0].text.startswith(cut.choices[0].text)


def test_a_full_queue_answers_503_with_retry_after(chat_server):
    """2 rows and 2 waiting places: of 10 simultaneous long requests some are refused at once, the
    others complete."""
    statuses, headers = [], []

    def ask():
        response = httpx.post(chat_server.url + "/v1/completions", timeout=120, json={
            "model": "Qwen/Qwen3-tiny", "prompt": [1, 2, 3], "max_tokens": 48, "ignore_eos": True})
        statuses.append(response.status_code)
        headers.append(response.headers.get("retry-after"))

    threads = [threading.Thread(target=ask) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(503) >= 1 and statuses.count(200) >= 4 and set(statuses) <= {200, 503}
    assert all(h == "1" for s, h in zip(statuses, headers) if s == 503)


def test_sigterm_finishes_requests_saves_state_and_writes_the_dump(small_server, small):
    """Last test of the module: SIGTERM while a request streams; it finishes, the server exits 0, the
    online state and the statistics dump are written whole."""
    from jax_eplb import load_trtllm_dump

    streamed, ready = [], threading.Event()

    def ask():
        for chunk in completion(small_server, [2, 7, 1, 8], 24, temperature=0, stream=True):
            ready.set()
            streamed.extend(t for c in chunk.choices for t in c.model_extra["token_ids"])

    thread = threading.Thread(target=ask)
    thread.start()
    assert ready.wait(60)
    assert small_server.stop(signal.SIGTERM) == 0, small_server.output()
    thread.join(30)
    assert len(streamed) == 24  # the request in flight finished within the grace period
    output = small_server.output()
    assert "online balancer state saved" in output and "partial" not in output
    assert (small_server.folder / "state").is_dir()
    stats = load_trtllm_dump(small_server.folder / "stats")
    assert stats.num_experts == 24 and stats.num_iters > 0  # slot statistics, as TensorRT-LLM with a balancer
    meta = json.loads((small_server.folder / "stats" / "meta_info.json").read_text())
    assert not meta.get("partial")
