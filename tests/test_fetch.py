"""modiff.fetch against a real local HTTP server, local paths and a simulated offline host."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from modiff import fetch as fetch_module
from modiff.fetch import ChecksumError, FetchError, OfflineError, fetch, file_digest

BODY = os.urandom(2 * (1 << 20) + 12_345)  # several 1 MiB chunks plus a partial one
SHA256 = hashlib.sha256(BODY).hexdigest()
MD5 = hashlib.md5(BODY).hexdigest()

Route = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Server:
    base: str
    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(base="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits[self.path] += 1
            route = state.routes.get(self.path)
            if route is None:
                self.send_error(404)
            else:
                route(self)

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        state.release.set()  # wake any handler still hanging
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_module, "RETRY_BACKOFF_S", 0.01)


def serve(body: bytes) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return route


def truncated(body: bytes) -> Route:
    """Promise the whole body, send half of it, then close the connection."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[: len(body) // 2])
        handler.close_connection = True

    return route


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_http_fetch_verifies_and_skips_when_up_to_date(
    server: Server, tmp_path: Path, algorithm: str
) -> None:
    server.routes["/model.ckpt"] = serve(BODY)
    dest = tmp_path / "out" / "model.ckpt"
    digest = {"md5": MD5, "sha256": SHA256}[algorithm]

    result = fetch(server.url("/model.ckpt"), dest, **{algorithm: digest}, progress=False)

    assert result == dest
    assert dest.read_bytes() == BODY
    assert file_digest(dest, algorithm) == digest
    assert leftovers(dest.parent) == ["model.ckpt"]
    # An existing, verified file is returned without touching the server.
    assert fetch(server.url("/model.ckpt"), dest, **{algorithm: digest}) == dest
    assert server.hits["/model.ckpt"] == 1


def test_existing_file_with_wrong_digest_is_fetched_again(server: Server, tmp_path: Path) -> None:
    server.routes["/model.ckpt"] = serve(BODY)
    dest = tmp_path / "model.ckpt"
    dest.write_bytes(b"stale")

    fetch(server.url("/model.ckpt"), dest, md5=MD5, sha256=SHA256, progress=False)

    assert dest.read_bytes() == BODY
    assert server.hits["/model.ckpt"] == 1


def test_corrupted_content_raises_checksum_error(server: Server, tmp_path: Path) -> None:
    corrupted = BODY[:-1] + bytes([BODY[-1] ^ 0xFF])
    server.routes["/model.ckpt"] = serve(corrupted)
    dest = tmp_path / "out" / "model.ckpt"

    with pytest.raises(ChecksumError) as info:
        fetch(server.url("/model.ckpt"), dest, sha256=SHA256, progress=False)

    message = str(info.value)
    assert SHA256 in message
    assert hashlib.sha256(corrupted).hexdigest() in message
    assert "sha256" in message and server.url("/model.ckpt") in message
    assert not dest.exists()
    assert leftovers(dest.parent) == []
    assert server.hits["/model.ckpt"] == 1  # a wrong digest is not retried


def test_truncated_transfer_is_retried_then_fails(server: Server, tmp_path: Path) -> None:
    server.routes["/model.ckpt"] = truncated(BODY)
    dest = tmp_path / "out" / "model.ckpt"

    with pytest.raises(FetchError, match="truncated") as info:
        fetch(server.url("/model.ckpt"), dest, sha256=SHA256, retries=3, progress=False)

    assert not isinstance(info.value, ChecksumError)
    assert "3 attempt" in str(info.value)
    assert server.hits["/model.ckpt"] == 3
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_server_error_is_retried_until_success(server: Server, tmp_path: Path) -> None:
    good = serve(BODY)

    def flaky(handler: BaseHTTPRequestHandler) -> None:
        if server.hits["/model.ckpt"] < 3:
            handler.send_error(503)
        else:
            good(handler)

    server.routes["/model.ckpt"] = flaky
    dest = tmp_path / "model.ckpt"

    fetch(server.url("/model.ckpt"), dest, sha256=SHA256, retries=3, progress=False)

    assert dest.read_bytes() == BODY
    assert server.hits["/model.ckpt"] == 3


def test_not_found_fails_at_once(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "missing.ckpt"

    with pytest.raises(FetchError) as info:
        fetch(server.url("/missing.ckpt"), dest, sha256=SHA256, retries=3, progress=False)

    assert type(info.value) is FetchError
    assert "404" in str(info.value) and server.url("/missing.ckpt") in str(info.value)
    assert server.hits["/missing.ckpt"] == 1
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_unresponsive_server_times_out(server: Server, tmp_path: Path) -> None:
    server.routes["/slow.ckpt"] = lambda handler: server.release.wait(10)
    dest = tmp_path / "out" / "slow.ckpt"

    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out") as info:
        fetch(server.url("/slow.ckpt"), dest, sha256=SHA256, timeout=0.5, retries=2)
    elapsed = time.monotonic() - start

    assert "timeout" in str(info.value)
    assert elapsed < 5
    assert server.hits["/slow.ckpt"] == 2
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_file_url_and_plain_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.ckpt"
    src.write_bytes(BODY)

    by_url = fetch(src.as_uri(), tmp_path / "a" / "model.ckpt", sha256=SHA256, progress=False)
    by_abs = fetch(str(src), tmp_path / "b" / "model.ckpt", md5=MD5, progress=False)
    monkeypatch.chdir(tmp_path)
    by_rel = fetch("src.ckpt", "c/model.ckpt", sha256=SHA256, progress=False)

    for path in (by_url, by_abs, tmp_path / by_rel):
        assert path.read_bytes() == BODY
        assert leftovers(path.parent) == ["model.ckpt"]


def test_local_source_with_wrong_digest(tmp_path: Path) -> None:
    src = tmp_path / "src.ckpt"
    src.write_bytes(b"not the model")
    dest = tmp_path / "out" / "model.ckpt"

    with pytest.raises(ChecksumError, match=SHA256):
        fetch(str(src), dest, sha256=SHA256, progress=False)

    assert leftovers(dest.parent) == []


@pytest.mark.parametrize("as_url", [False, True])
def test_missing_local_source(tmp_path: Path, as_url: bool) -> None:
    missing = tmp_path / "nowhere.ckpt"
    source = missing.as_uri() if as_url else str(missing)

    with pytest.raises(FetchError, match="nowhere.ckpt"):
        fetch(source, tmp_path / "out" / "model.ckpt", sha256=SHA256, progress=False)

    assert leftovers(tmp_path / "out") == []


def test_offline_host_fails_fast_with_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def no_dns(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.chdir(tmp_path)
    url = "http://nonexistent.invalid/x.ckpt"

    start = time.monotonic()
    with pytest.raises(OfflineError) as info:
        fetch(url, "weights/x.ckpt", sha256=SHA256, retries=3, progress=False)

    message = str(info.value)
    assert str((tmp_path / "weights" / "x.ckpt").resolve()) in message
    assert url in message and "by hand" in message and "unreachable" in message
    assert len(calls) == 1  # no retries when offline
    assert time.monotonic() - start < 2
    assert leftovers(tmp_path / "weights") == []


def test_digest_is_required_and_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="md5 or sha256"):
        fetch("http://127.0.0.1:9/x", tmp_path / "x")
    with pytest.raises(ValueError, match="sha256"):
        fetch("http://127.0.0.1:9/x", tmp_path / "x", sha256=MD5)  # md5-length digest


def test_unsupported_scheme(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="unsupported"):
        fetch("ftp://example.org/x.ckpt", tmp_path / "x", sha256=SHA256)


def test_fetched_file_has_the_usual_permissions(server: Server, tmp_path: Path) -> None:
    """Written through the project's one atomic-write helper: the umask's mode (0644 here),
    not a private temporary file's 0600, which would stick to the checkpoint."""
    server.routes["/model.ckpt"] = serve(BODY)
    dest = tmp_path / "model.ckpt"
    old = os.umask(0o022)
    try:
        fetch(server.url("/model.ckpt"), dest, sha256=SHA256, progress=False)
    finally:
        os.umask(old)
    assert dest.stat().st_mode & 0o777 == 0o644
    assert leftovers(dest.parent) == ["model.ckpt"]
