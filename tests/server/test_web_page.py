"""stream-serve's page (GET /, /static/*) and its data, /v1/stream-stats: the page is public
and has no outside references; the stats stream needs the API key, describes the units, and
its frames follow a streamed run (unit states, totals equal to the batcher's pass records);
with nobody watching the engine's hooks are off."""

import asyncio
import http.client
import json
import re
import threading
import time

import pytest

from stream_run.engine import Engine, EngineConfig
from stream_run.server.app import ServerConfig
from tests.server.harness import ServerThread
from tests.tiny_models import write_tiny_model

KEY = "page-key"
NAME = "tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("page")
    write_tiny_model(path, "llama", n_layers=6)
    probe = asyncio.run(Engine.open(str(path), EngineConfig(backend="numpy")))
    budget = max(probe.model_bytes // 2, 3 * probe.min_budget_bytes)  # layers stream
    probe.close()
    srv = ServerThread.for_model(path, ServerConfig(NAME, api_key=KEY, max_tokens_cap=64,
                                                    disk_ceiling_bytes_per_s=2e9),
                                 memory_budget_bytes=budget)
    engine = srv.wait_loaded()
    engine.reader.fault_hook = lambda *a: time.sleep(0.002)  # reads last long enough to see
    yield srv
    srv.close()


def _get(server, path, key=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


class Events:
    """A /v1/stream-stats reader: (event name, data) pairs, on a thread."""

    def __init__(self, server, query=""):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.conn.request("GET", "/v1/stream-stats" + query,
                          headers={"Authorization": f"Bearer {KEY}"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        assert self.resp.getheader("Content-Type").startswith("text/event-stream")
        self.events: list[tuple[str, dict]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        name = None
        try:
            for raw in self.resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    self.events.append((name, json.loads(line[6:])))
        except (OSError, ValueError, AttributeError):  # closed under it
            pass

    def wait(self, pred, timeout_s=30):
        deadline = time.monotonic() + timeout_s
        while not pred(self.events):
            assert time.monotonic() < deadline, f"no such event in {self.events[-3:]}"
            time.sleep(0.01)

    def close(self):
        self.conn.sock.close()
        self.conn.close()


def test_page_is_public_and_self_contained(server):
    status, ctype, body = _get(server, "/")
    assert status == 200 and ctype.startswith("text/html")
    html = body.decode()
    assert '<script src="/static/app.js">' in html and "/static/app.css" in html
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        status, ctype, body = _get(server, "/static/" + name)
        assert status == 200 and ctype.startswith(kind) and body
        # no CDN: nothing is fetched from another origin
        assert not re.search(rb"https?://", body), name
    assert not re.search(r"https?://", html)
    status, _, body = _get(server, "/static/nothing.js")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_stream_stats_needs_the_key_and_checks_its_query(server):
    status, _, body = _get(server, "/v1/stream-stats")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    status, _, body = _get(server, "/v1/stream-stats?interval=fast", key=KEY)
    err = json.loads(body)["error"]
    assert status == 400 and err["param"] == "interval" and "seconds" in err["message"]
    status, _, body = _get(server, "/v1/stream-stats?idle=0", key=KEY)
    assert status == 400 and json.loads(body)["error"]["param"] == "idle"


def _states_now(engine, keys):
    """What the letters must be with no pass running: the cache's own view."""
    tier, plan = engine.cache.compute, engine.cache.resident
    return "".join(("R" if k in plan else "s") if k in tier else
                   ("h" if k in engine.cache.host else "-") for k in keys)


def test_frames_follow_a_streamed_run(server):
    engine = server.engine
    server.wait_idle()
    assert engine.scheduler.observer is None and engine.batcher.on_pass is None
    ev = Events(server, "?interval=0.05&idle=0.5")
    try:
        ev.wait(lambda e: len(e) >= 2)
        name, info = ev.events[0]
        assert name == "model" and info["model"] == NAME
        keys = [u["key"] for u in info["units"]]
        assert keys == list(dict.fromkeys(k for u in engine.runner.model.units() for k in u))
        assert info["budget_bytes"] == engine.cache.compute.budget_bytes
        assert info["disk_ceiling_bytes_per_s"] == 2e9
        assert set(info["states"]) == set("crRsh-")
        idle = ev.events[1][1]
        assert idle["units"] == server.call(_snapshot(engine, keys))
        assert engine.scheduler.observer is not None

        passes_before = len(engine.batcher.passes)
        n = len(ev.events)
        status, body = server.request("POST", "/v1/chat/completions", {
            "model": NAME, "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        server.wait_idle()
        # a sequence's first token comes from its last prompt pass: 11 decode tokens
        ev.wait(lambda e: any(f["totals"]["decode_tokens"] >= 11 for _, f in e[n:]))
        frames = [f for name, f in ev.events[n:] if name == "frame"]
        # during the run the strip showed units being read or computed, not only at rest
        assert any(set(f["units"]) & set("rc") for f in frames)
        assert len({f["units"] for f in frames}) >= 2
        last = frames[-1]
        records = list(engine.batcher.passes)[passes_before:]
        # the totals are the batcher's own pass records, counted since the watch began
        assert last["totals"]["decode_tokens"] == sum(r.n_seqs - r.n_prefill for r in records)
        assert last["totals"]["decode_tokens"] == body["usage"]["completion_tokens"] - 1 == 11
        assert last["totals"]["bytes_read"] >= sum(r.bytes_read for r in records) > 0
        busy = [f["recent"] for f in frames if f["recent"]["decode_tokens"]]
        assert busy and all(r["tokens_per_s"] > 0 and r["bytes_per_token"] > 0 for r in busy)
        assert all(0 <= r["io_stall_share"] <= 1 and 0 <= r["disk_busy_share"] <= 1.0001
                   for r in busy)
        assert last["tiers"]["compute"]["hits"] + last["tiers"]["compute"]["misses"] > 0
        # idle again: a frame comes every idle interval with the cache's view
        ev.wait(lambda e: e[-1][1]["active"] == 0
                and e[-1][1]["units"] == _states_now(engine, keys), timeout_s=10)
    finally:
        ev.close()
    deadline = time.monotonic() + 10
    while engine.scheduler.observer is not None or engine.batcher.on_pass is not None:
        assert time.monotonic() < deadline, "the hooks stayed on after the watcher left"
        time.sleep(0.02)


async def _snapshot(engine, keys):
    return engine.scheduler.unit_states(keys)


def test_two_watchers_share_the_hooks(server):
    engine = server.engine
    a, b = Events(server), Events(server)
    try:
        a.wait(lambda e: e and e[0][0] == "model")
        b.wait(lambda e: e and e[0][0] == "model")
        a.close()
        time.sleep(0.3)
        assert engine.scheduler.observer is not None  # b still watches
    finally:
        b.close()
    deadline = time.monotonic() + 10
    while engine.scheduler.observer is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_the_page_ships_as_package_data():
    """Every file of server/static is matched by pyproject's package-data (so a wheel has it)."""
    import fnmatch
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data["package-data"]["stream_run.server"]
    files = [p.relative_to(root / "server").as_posix()
             for p in (root / "server" / "static").iterdir()]
    assert {"static/index.html", "static/app.js", "static/app.css"} <= set(files)
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_disk_ceiling_flag_errors(tmp_path, capsys, value):
    from stream_run.cli import serve

    write_tiny_model(tmp_path, "llama", n_layers=2)
    assert serve.main([str(tmp_path), "--port", "0", "--disk-ceiling", value]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("stream-serve: error:") and "--disk-ceiling must be" in last


def test_shutdown_ends_the_stats_stream_cleanly(tmp_path):
    """The server's shutdown ends each stats stream (a complete response), instead of leaving
    it to be cut when the shutdown timeout cancels its handler."""
    write_tiny_model(tmp_path, "llama", n_layers=2)
    srv = ServerThread.for_model(tmp_path, ServerConfig(NAME, api_key=KEY))
    srv.wait_loaded()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("GET", "/v1/stream-stats?idle=60", headers={"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"event: model")
    srv.close()
    rest = resp.read()  # raises IncompleteRead if the chunked body was cut
    assert rest.count(b"event: frame") <= 1 and resp.isclosed()
    assert srv.engine is None or srv.engine.scheduler.observer is None
    conn.close()


def test_an_moe_model_shows_each_expert_and_its_hit_rate(tmp_path):
    """Routed experts are units of their own (cells of the strip), and frames carry the expert
    hit rate of the recent passes (None for a dense model, as above)."""
    pytest.importorskip("transformers")
    from stream_run.engine import GenerationParams
    from tests.models.test_moe import write_moe

    write_moe(tmp_path, "mixtral")

    async def run():
        async with await Engine.open(str(tmp_path), EngineConfig(backend="numpy")) as engine:
            keys = engine.monitor.keys
            frames = []
            async with engine.monitor.watch(interval_s=0.02) as watch:
                gen = engine.submit([1, 2, 3, 4], GenerationParams(max_tokens=6, ignore_eos=True))
                async with gen:
                    async for _ in gen:
                        pass
                while not watch.queue.empty():
                    frames.append(watch.queue.get_nowait())
            frames.append(engine.monitor.frame())
            return engine, keys, frames

    engine, keys, frames = asyncio.run(run())
    experts = [k for k in engine.source.index.units if "expert" in k]
    assert experts and set(experts) <= set(keys)
    assert len(keys) == len(engine.source.index.units)
    rates = [f["recent"]["expert_hit_rate"] for f in frames if f["recent"]["passes"]]
    assert rates and all(r is not None and 0 <= r <= 1 for r in rates)
