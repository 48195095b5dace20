"""Downloads against a local HTTP server (with and without Range support), and the offline fallback."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from tinystories import download as datasets

PAYLOAD = bytes(range(256)) * 400 + b"the end"


class _Handler(http.server.BaseHTTPRequestHandler):
    ranges = True
    requests: list[tuple[str, str | None]] = []
    cut_after: int | None = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append((self.path, self.headers.get("Range")))
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/files/data.bin")
            self.end_headers()
            return
        if self.path != "/files/data.bin":
            self.send_error(404)
            return
        start = 0
        header = self.headers.get("Range")
        if header and self.ranges:
            start = int(header.removeprefix("bytes=").split("-")[0])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.cut_after is not None:
            self.wfile.write(body[: self.cut_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    handler = type("H", (_Handler,), {"requests": [], "ranges": True, "cut_after": None})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_download_whole_file_follows_redirect(server, tmp_path):
    handler, base = server
    out = datasets.download(f"{base}/moved", tmp_path / "d.bin", progress=False)
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "d.bin.part").exists()
    assert handler.requests == [("/moved", None), ("/files/data.bin", None)]


def test_download_resumes_a_partial_file(server, tmp_path):
    handler, base = server
    (tmp_path / "d.bin.part").write_bytes(PAYLOAD[:12345])
    out = datasets.download(f"{base}/files/data.bin", tmp_path / "d.bin", progress=False)
    assert out.read_bytes() == PAYLOAD
    assert handler.requests == [("/files/data.bin", "bytes=12345-")]


def test_interrupted_download_keeps_part_then_resumes(server, tmp_path):
    handler, base = server
    handler.cut_after = 40_000
    with pytest.raises(datasets.DownloadError, match="short download|connection lost"):
        datasets.download(f"{base}/files/data.bin", tmp_path / "d.bin", progress=False)
    part = tmp_path / "d.bin.part"
    assert part.read_bytes() == PAYLOAD[:40_000]
    assert not (tmp_path / "d.bin").exists()
    handler.cut_after = None
    datasets.download(f"{base}/files/data.bin", tmp_path / "d.bin", progress=False)
    assert (tmp_path / "d.bin").read_bytes() == PAYLOAD
    assert handler.requests[-1] == ("/files/data.bin", "bytes=40000-")


def test_server_without_range_support_restarts(server, tmp_path):
    handler, base = server
    handler.ranges = False
    (tmp_path / "d.bin.part").write_bytes(b"garbage that must be dropped")
    datasets.download(f"{base}/files/data.bin", tmp_path / "d.bin", progress=False)
    assert (tmp_path / "d.bin").read_bytes() == PAYLOAD


def test_complete_part_file_is_finished_on_416(server, tmp_path):
    _, base = server
    (tmp_path / "d.bin.part").write_bytes(PAYLOAD)
    datasets.download(f"{base}/files/data.bin", tmp_path / "d.bin", progress=False)
    assert (tmp_path / "d.bin").read_bytes() == PAYLOAD


def test_http_error_raises(server, tmp_path):
    _, base = server
    with pytest.raises(datasets.DownloadError, match="HTTP 404"):
        datasets.download(f"{base}/nope", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_resolve_corpus_downloads_tinystories_names(server, tmp_path):
    handler, base = server
    def serve_all(self):
        type(self).requests.append((self.path, None))
        body = f"story from {self.path}\n<|endoftext|>\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    handler.do_GET = serve_all
    corpus = datasets.resolve_corpus(
        tmp_path / "data", tmp_path / "emb", embedded_train_bytes=1000, embedded_valid_bytes=100,
        base_url=base + "/ds/{name}", progress=False,
    )
    assert corpus.source == "tinystories"
    assert corpus.train.name == "TinyStoriesV2-GPT4-train.txt"
    assert corpus.valid.read_text() == "story from /ds/TinyStoriesV2-GPT4-valid.txt\n<|endoftext|>\n"
    again = datasets.resolve_corpus(
        tmp_path / "data", tmp_path / "emb", embedded_train_bytes=1000, embedded_valid_bytes=100,
        base_url=base + "/ds/{name}", progress=False,
    )
    assert again == corpus and len(handler.requests) == 2


def test_offline_falls_back_to_embedded_with_one_line(tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/" + "{name}"
    corpus = datasets.resolve_corpus(
        tmp_path / "data", tmp_path / "emb", embedded_train_bytes=3000, embedded_valid_bytes=500,
        base_url=url, connect_timeout=1.0, progress=False,
    )
    assert corpus.source == "embedded"
    assert corpus.train.stat().st_size >= 3000 and corpus.valid.stat().st_size >= 500
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not available" in err[0] and "embedded" in err[0]


def test_existing_files_are_used_without_network(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in datasets.TINYSTORIES_FILES:
        (data / name).write_text("x\n<|endoftext|>\n")
    corpus = datasets.resolve_corpus(
        data, tmp_path / "emb", embedded_train_bytes=10, embedded_valid_bytes=10,
        base_url="http://127.0.0.1:9/{name}", progress=False,
    )
    assert corpus.source == "tinystories" and corpus.train == data / datasets.TINYSTORIES_FILES[0]


def test_no_data_dir_means_embedded(tmp_path, capsys):
    corpus = datasets.resolve_corpus(None, tmp_path, embedded_train_bytes=100, embedded_valid_bytes=100, progress=False)
    assert corpus.source == "embedded"
    assert capsys.readouterr().err == ""


def test_offline_without_fallback_raises_and_writes_nothing(tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/" + "{name}"
    with pytest.raises(datasets.DownloadError, match="cannot reach"):
        datasets.resolve_corpus(tmp_path / "data", tmp_path / "emb", embedded_train_bytes=3000,
                                embedded_valid_bytes=500, base_url=url, connect_timeout=1.0, progress=False,
                                fallback=False)
    assert not (tmp_path / "emb").exists() and capsys.readouterr().err == ""
