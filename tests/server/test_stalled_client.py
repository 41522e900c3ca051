"""A client that stalls (stops reading a streamed answer, or never finishes sending its body)
is dropped after ServerConfig.stall_timeout_s, its generation cancelled, while other clients
are served meanwhile."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest

from stream_run.server.app import ServerConfig, make_app
from tests.server import harness
from tests.server.harness import ServerThread
from tests.tiny_models import write_tiny_model

# every SSE chunk carries the model id: at ~1.2 KB a token, a client that stops reading fills
# its socket buffers and aiohttp's 64 KB write window within ~100 tokens of the tiny model
NAME = "tiny-" + "x" * 1000
STALL_S = 1.0


async def _small_buffers(request, response) -> None:
    """Shrink the server side's buffers, so that a stall shows within seconds."""
    request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                          4096)
    request.transport.set_write_buffer_limits(high=4096)


@pytest.fixture
def server(tmp_path, monkeypatch):
    write_tiny_model(tmp_path, "llama", n_layers=2)

    def app_with_small_buffers(config, open_engine):
        app = make_app(config, open_engine)
        app.on_response_prepare.append(_small_buffers)
        return app

    monkeypatch.setattr(harness, "make_app", app_with_small_buffers)
    srv = ServerThread.for_model(tmp_path, ServerConfig(NAME, max_tokens_cap=200,
                                                        stall_timeout_s=STALL_S))
    srv.wait_loaded()
    yield srv
    srv.close()


def _raw_request(port: int, body: bytes, length: int | None = None) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: the window
    sock.connect(("127.0.0.1", port))
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode()
    sock.sendall(head + body)
    return sock


def _read(sock: socket.socket, timeout_s: float) -> tuple[bytes, bool]:
    """What arrives within timeout_s, and whether the server closed the connection."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:  # an abort discards what the server had buffered
        pass
    except TimeoutError:
        return data, False
    return data, True


def test_a_client_that_stops_reading_is_dropped_while_others_are_served(server, caplog):
    caplog.set_level(logging.WARNING, logger="stream_run.server.app")
    body = {"model": NAME, "prompt": "hello", "max_tokens": 200, "temperature": 0}
    status, reply = server.request("POST", "/v1/completions", body)
    assert status == 200 and reply["usage"]["completion_tokens"] == 200  # a long answer
    stalled = _raw_request(server.port, json.dumps({**body, "stream": True}).encode())
    try:
        deadline = time.monotonic() + 60
        while "dropping it" not in caplog.text:  # others are served while it stalls
            status, reply = server.request("POST", "/v1/completions", {**body, "max_tokens": 3})
            assert status == 200 and reply["usage"]["completion_tokens"] == 3
            assert time.monotonic() < deadline, "the stalled client was never dropped"
        server.wait_idle(timeout_s=10)  # its generation was cancelled and its slot freed
        assert server.engine.batcher.kv_bytes == 0
        data, closed = _read(stalled, timeout_s=10)
        assert closed and b"data: [DONE]" not in data
    finally:
        stalled.close()


def test_a_client_that_never_finishes_its_body_gets_a_408(server):
    sock = _raw_request(server.port, b'{"model": ', length=200)
    try:
        t0 = time.monotonic()
        status, _ = server.request("GET", "/health")  # others are served meanwhile
        assert status == 200
        sock.settimeout(10)
        data = sock.recv(1 << 16)
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        while b"request_timeout" not in data:  # the body, if it came apart
            chunk = sock.recv(1 << 16)
            assert chunk, data
            data += chunk
        assert b"did not arrive within 1 s" in data
        assert time.monotonic() - t0 < 5
    finally:
        sock.close()
