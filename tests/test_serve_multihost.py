"""``jax-eplb serve`` across hosts, as two local processes of two emulated CPU devices each
(jax.distributed over loopback): process 0 answers HTTP, both step in lockstep.

Against one process of the same ep: the same greedy and seeded-sampling tokens for 16 concurrent
requests; SIGTERM to process 0 (after one to the follower, as Slurm sends to every task) ends both
with 0; a follower killed under load fails the requests
in flight (none hangs) and ends process 0 non-zero naming the lost process; a killed process 0
ends the follower.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_serve import free_port, wait_until_healthy  # noqa: E402

class TwoProcessServer:
    """``jax-eplb serve MODEL --ep_size 4`` as process 0 (HTTP) and process 1, 2 CPU devices each."""

    def __init__(self, folder, model, *flags):
        self.folder, self.port, coordinator = folder, free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # devices come from --emulate_devices
        self.logs = [open(folder / f"process_{i}.log", "w") for i in range(2)]
        self.processes = [subprocess.Popen(
            [sys.executable, "-m", "jax_eplb.cli", "serve", model, "--ep_size", "4", "--emulate_devices", "2",
             "--port", str(self.port), "--coordinator_address", f"127.0.0.1:{coordinator}", "--num_processes", "2",
             "--process_id", str(i), "--served_model_name", "m", *flags],
            stdout=self.logs[i], stderr=subprocess.STDOUT, env=env, cwd=folder) for i in range(2)]
        wait_until_healthy(self.url, self.processes, self.output, self.kill)

    def output(self) -> str:
        for log in self.logs:
            log.flush()
        return "\n".join(f"--- process {i}\n" + (self.folder / f"process_{i}.log").read_text()[-3000:]
                         for i in range(2))

    def wait(self, index: int, timeout: float) -> int | None:
        try:
            return self.processes[index].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


def ask(url, prompt, max_tokens, timeout=120, **extra):
    """(status, token ids or the error text)."""
    try:
        reply = httpx.post(url + "/v1/completions", timeout=timeout,
                           json={"model": "m", "prompt": prompt, "max_tokens": max_tokens, "return_token_ids": True,
                                 **extra})
    except httpx.HTTPError as err:
        return "transport", type(err).__name__
    if reply.status_code != 200:
        return reply.status_code, reply.text
    return 200, reply.json()["choices"][0]["token_ids"]


def concurrently(calls):
    results = [None] * len(calls)

    def run(i):
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def prompts_of(count, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, rng.integers(2, 12))] for _ in range(count)]


def test_two_processes_give_one_process_tokens_and_stop_together(tmp_path):
    from jax_eplb.model import SeededWeights, load_model_config
    from jax_eplb.serving import Request, ThroughputSettings, run_throughput

    from conftest import make_mesh

    server = TwoProcessServer(tmp_path, "tiny", "--max_batch_size", "8", "--max_seq_len", "40")
    try:
        prompts = prompts_of(16, 500)
        greedy = concurrently([lambda p=p: ask(server.url, p, 8, temperature=0) for p in prompts])
        sampled = concurrently([lambda p=p, i=i: ask(server.url, p, 8, temperature=0.8, top_p=0.9, seed=100 + i)
                                for i, p in enumerate(prompts[:4])])
        assert all(status == 200 for status, _ in greedy + sampled), greedy + sampled
        server.processes[1].send_signal(signal.SIGTERM)  # Slurm signals every task: process 0 decides
        time.sleep(1)
        assert server.processes[1].poll() is None
        server.processes[0].send_signal(signal.SIGTERM)
        codes = [server.wait(0, 90), server.wait(1, 90)]
        assert codes == [0, 0], server.output()
    finally:
        server.kill()
    config = load_model_config("tiny")
    requests = [Request(i, tuple(p), 8) for i, p in enumerate(prompts)]
    requests += [Request(16 + i, tuple(p), 8, 0.8, 0.9, 100 + i) for i, p in enumerate(prompts[:4])]
    one = run_throughput(dataclasses.replace(config, max_seq_len=40), SeededWeights(0), requests,
                         make_mesh(4), ThroughputSettings(max_batch_size=8, progress=False), log=lambda _: None)
    assert [tokens for _, tokens in greedy] == [one.tokens[i] for i in range(16)]
    assert [tokens for _, tokens in sampled] == [one.tokens[16 + i] for i in range(4)]


# CI runs both JAX lines at once on two cores: the fault cases (two more two-process servers each) run
# on the newest line only, the one GPU users install; the floor line runs the lockstep test above.
newest_line_only = pytest.mark.skipif(
    tuple(int(part) for part in __import__("jax").__version__.split(".")[:2]) < (0, 11),
    reason="CI time: the two-process fault cases run on the newest JAX line (>= 0.11) only")


@pytest.fixture
def small_model(tmp_path, small):
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small.RAW))
    return "small.yaml"


@newest_line_only
def test_a_lost_follower_fails_the_requests_and_ends_process_0(tmp_path, small_model):
    server = TwoProcessServer(tmp_path, small_model, "--max_batch_size", "4", "--max_seq_len", "40",
                              "--batch_wait_ms", "0")
    try:
        results = []
        clients = [threading.Thread(target=lambda p=p: results.append(ask(server.url, p, 20, timeout=150,
                                                                             temperature=0)))
                   for p in prompts_of(8, 60)]
        for client in clients:
            client.start()
        time.sleep(2)
        server.processes[1].kill()  # SIGKILL under load
        start = time.time()
        code = server.wait(0, 120)
        assert code not in (0, None), server.output()
        assert time.time() - start < 120
        for client in clients:
            client.join(timeout=30)
        assert not any(client.is_alive() for client in clients)  # no request left waiting
        assert len(results) == 8 and any(status != 200 for status, _ in results), results
        assert "process 1 was lost" in server.output()
    finally:
        server.kill()


@newest_line_only
def test_a_lost_process_0_ends_the_follower_and_leaves_a_whole_saved_state(tmp_path, small_model):
    """--online_state_interval saves the state while serving; SIGKILL of process 0 then ends the
    follower in bounded time and leaves the last saved state whole (a restart restores it)."""
    from jax_eplb.online import check_saved_state

    (tmp_path / "extra.yaml").write_text("moe_load_balancer:\n  num_slots: 24\n  layer_updates_per_iter: 1\n")
    server = TwoProcessServer(tmp_path, small_model, "--max_batch_size", "4", "--max_seq_len", "24",
                              "--extra_llm_api_options", "extra.yaml", "--online_state", "state",
                              "--online_state_interval", "1")
    try:
        deadline = time.time() + 60
        while not (tmp_path / "state").exists() and time.time() < deadline:
            results = concurrently([lambda p=p: ask(server.url, p, 6, temperature=0) for p in prompts_of(4, 60)])
            assert all(status == 200 for status, _ in results), results
        assert (tmp_path / "state").exists(), server.output()
        server.processes[0].kill()
        start = time.time()
        code = server.wait(1, 60)
        assert code not in (0, None), server.output()
        assert time.time() - start < 60
        # ours, or JAX's own abort when its error poll sees the coordinator gone first
        output = server.output()
        assert "process 0 was lost" in output or "JAX distributed service detected fatal errors" in output
    finally:
        server.kill()
    check_saved_state(tmp_path / "state", 2, 16, 24)  # whole: orbax reads its metadata for this geometry


@pytest.mark.parametrize("flags,match", [
    (["--online_state_interval", "5"], "needs --online_state"),
    (["--online_state", "s", "--online_state_interval", "0"], "positive number of seconds"),
    (["--process_timeout", "1"], "--process_timeout must be in [2, 60]"),
    (["--process_timeout", "100"], "--process_timeout must be in [2, 60]"),
])
def test_bad_multihost_and_state_flags_are_one_line(flags, match, capsys):
    from jax_eplb.cli import main

    assert main(["serve", "tiny", "--ep_size", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
