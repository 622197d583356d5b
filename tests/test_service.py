"""The query service over real HTTP on 127.0.0.1: the index's answers, checked requests,
concurrent queries during adds, image uploads, and a killed server restarted."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from dedup_index.index import DedupIndex  # noqa: E402
from dedup_index.service import ServiceConfig, create_app  # noqa: E402

KEY = "s3cret"


@contextlib.contextmanager
def running(config: ServiceConfig):
    """The service in a uvicorn server on a free 127.0.0.1 port, in a thread."""
    import uvicorn

    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(20)


def unit(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def index_path(tmp_path):
    rng = np.random.default_rng(0)
    E = unit(rng.standard_normal((40, 16)))
    with DedupIndex.create(tmp_path / "i", 16, 0.99) as index:
        index.add(E, keys=[f"k{r}" for r in range(40)])
    np.save(tmp_path / "E.npy", E)
    return tmp_path / "i"


def test_query_add_stats_health_match_the_index(index_path):
    E = np.load(index_path.parent / "E.npy")
    probe = np.concatenate([E[:3], unit(-E[3:4])])
    with DedupIndex.open(index_path) as reader:
        expected = reader.query(probe)
    with running(ServiceConfig(index_path, api_key=KEY)) as http:
        assert http.get("/health").json()["rows"] == 40
        got = http.post("/query", json={"embeddings": probe.tolist()}).json()["results"]
        assert [[(h["key"], h["similarity"]) for h in hits] for hits in got] == expected
        new = unit(E[5:7] + 1e-4)
        assert http.post("/add", json={"embeddings": new.tolist()}).status_code == 401
        bad = http.post("/add", json={"embeddings": new.tolist()}, headers={"X-API-Key": "no"})
        assert bad.status_code == 401
        done = http.post(
            "/add",
            json={"embeddings": new.tolist(), "keys": ["c5", "c7"]},
            headers={"X-API-Key": KEY},
        )
        assert done.status_code == 200, done.text
        body = done.json()
        assert [r["duplicate_of"] for r in body["results"]] == ["k5", "k6"]
        assert body["rows"] == 42 and not any(r["kept"] for r in body["results"])
        again = http.post(
            "/add",
            json={"embeddings": new.tolist(), "keys": ["c5", "c7"]},
            headers={"X-API-Key": KEY},
        )
        assert again.status_code == 409 and "already in the index" in again.json()["detail"]
        stats = http.get("/stats").json()
        assert stats["rows"] == 42 and stats["removed"] == 2
    with DedupIndex.open(index_path) as reader:  # committed before the answer
        assert reader.keys()[-2:] == ["c5", "c7"]


def test_bad_requests_get_clear_4xx(index_path):
    with running(ServiceConfig(index_path, max_rows=8, max_body_bytes=20_000)) as http:
        r = http.post("/query", content=b"embeddings", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["detail"]
        r = http.post("/query", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
        r = http.post("/query", json={"embeddings": [[1.0, 2.0]]})
        assert r.status_code == 422 and "16-dimensional" in r.json()["detail"]
        r = http.post("/query", json={"vectors": []})
        assert r.status_code == 422 and '"embeddings"' in r.json()["detail"]
        r = http.post("/query", json={"embeddings": [[1.0] * 16, [1.0] * 15]})
        assert r.status_code == 422 and "one length" in r.json()["detail"]
        r = http.post(
            "/query",
            content=b'{"embeddings": [[NaN' + b", 1.0" * 15 + b"]]}",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422 and "NaN" in r.json()["detail"]
        r = http.post("/query", json={"embeddings": [[1.0] * 16] * 9})
        assert r.status_code == 413 and "limit is 8" in r.json()["detail"]
        r = http.post("/query", json={"embeddings": [[1.0] * 16] * 8, "pad": "x" * 30_000})
        assert r.status_code == 413
        files = {"files": ("photo.jpg", b"not an image", "image/jpeg")}
        r = http.post("/query", files=files)
        assert r.status_code == 422 and "no image model" in r.json()["detail"]
        assert http.get("/health").status_code == 200  # still serving


def test_uploads_embed_with_the_index_model(tmp_path, photo_dir, encoder):
    from conftest import COPY_THRESHOLD

    with DedupIndex.create(tmp_path / "i", encoder.dim, COPY_THRESHOLD, model_name="tiny") as ix:
        ix.add_images([str(photo_dir / "a.jpg")], encoder=encoder, keys=["a"])
    with running(ServiceConfig(tmp_path / "i", encoder=encoder)) as http:
        copy = (photo_dir / "a_copy.jpg").read_bytes()
        other = (photo_dir / "b.jpg").read_bytes()
        files = [
            ("files", ("x.jpg", copy, "image/jpeg")),
            ("files", ("y.jpg", other, "image/jpeg")),
        ]
        hits = http.post("/query", files=files).json()["results"]
        assert [h["key"] for h in hits[0]] == ["a"] and hits[1] == []
        r = http.post("/add", files=files, data={"keys": ["a2", "b"]})
        assert r.status_code == 200, r.text
        assert [x["duplicate_of"] for x in r.json()["results"]] == ["a", None]
        bad = [("files", ("notes.txt", b"hello", "text/plain"))]
        r = http.post("/add", files=bad)
        assert r.status_code == 422 and "notes.txt" in r.json()["detail"]
        assert http.get("/health").json()["rows"] == 3


def test_concurrent_queries_during_adds_see_one_version_each(tmp_path):
    rng = np.random.default_rng(1)
    base = unit(rng.standard_normal((50, 16)))
    with DedupIndex.create(tmp_path / "i", 16, 0.99, backend="ivf") as index:
        index.add(base, keys=[f"b{r}" for r in range(50)])
    probe = base[:1]
    copies = [unit(probe + 1e-3 * rng.standard_normal((1, 16))) for _ in range(6)]
    answers, errors = [], []

    def reader(http):
        for _ in range(40):  # bounded
            r = http.post("/query", json={"embeddings": probe.tolist()})
            if r.status_code != 200:
                errors.append(r.text)
            answers.append(sorted(h["key"] for h in r.json()["results"][0]))

    with running(ServiceConfig(tmp_path / "i")) as http:
        threads = [threading.Thread(target=reader, args=(http,)) for _ in range(3)]
        for t in threads:
            t.start()
        for g, row in enumerate(copies):
            r = http.post("/add", json={"embeddings": row.tolist(), "keys": [f"c{g}"]})
            assert r.status_code == 200, r.text
        for t in threads:
            t.join(60)
    assert not errors and len(answers) == 120
    versions = [sorted(["b0", *(f"c{g}" for g in range(k))]) for k in range(len(copies) + 1)]
    assert all(a in versions for a in answers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli_server(path: Path, port: int) -> subprocess.Popen:
    cli = str(Path(sys.executable).with_name("dedup-index"))
    env = dict(os.environ, DEDUP_INDEX_API_KEY=KEY)
    proc = subprocess.Popen(
        [cli, "serve", str(path), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not come up")


def test_killed_server_restarts_with_nothing_lost(index_path):
    E = np.load(index_path.parent / "E.npy")
    port = free_port()
    proc = start_cli_server(index_path, port)
    url = f"http://127.0.0.1:{port}"
    try:
        # A second writer is refused while the service holds the lock.
        from dedup_index.index import IndexLockedError

        with pytest.raises(IndexLockedError):
            DedupIndex.open(index_path, mode="a")
        new = unit(E[:3] + 1e-4)
        for r in range(3):
            done = httpx.post(
                f"{url}/add",
                json={"embeddings": new[r : r + 1].tolist(), "keys": [f"n{r}"]},
                headers={"X-API-Key": KEY},
                timeout=30,
            )
            assert done.status_code == 200, done.text
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc = start_cli_server(index_path, port)
    try:
        assert httpx.get(f"{url}/health").json()["rows"] == 43
        hits = httpx.post(f"{url}/query", json={"embeddings": E[:1].tolist()}).json()
        assert sorted(h["key"] for h in hits["results"][0]) == ["k0", "n0"]
    finally:
        proc.terminate()
        proc.wait(10)
    with DedupIndex.open(index_path, mode="a") as index:  # the lock went with the server
        assert len(index) == 43


def test_serve_refuses_a_missing_index(tmp_path):
    cli = str(Path(sys.executable).with_name("dedup-index"))
    done = subprocess.run([cli, "serve", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert done.returncode == 2 and "no index at" in done.stderr


def test_read_only_service_follows_another_writer(index_path):
    E = np.load(index_path.parent / "E.npy")
    with running(ServiceConfig(index_path, read_only=True)) as http:
        r = http.post("/add", json={"embeddings": E[:1].tolist()})
        assert r.status_code == 403
        with DedupIndex.open(index_path, mode="a") as writer:  # no lock held by the service
            writer.add(unit(E[:1] + 1e-4), keys=["w0"])
        hits = http.post("/query", json={"embeddings": E[:1].tolist()}).json()["results"][0]
        assert sorted(h["key"] for h in hits) == ["k0", "w0"]
        assert http.get("/health").json()["rows"] == 41
