"""Dataset files fetched from a mirror in the upstream layout (repo/commit/path) served over HTTP on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clusterucb.data.remote import MANIFEST, FetchError, build_manifest, fetch, read_manifest

REPO = Path(__file__).resolve().parents[2]
PLAIN = "gsm8k/test.jsonl"  # staged as upstream has it
REGZIPPED = "gsm8k/train.jsonl.gz"  # staged as a gzip of the upstream file


class Mirror(ThreadingHTTPServer):
    """Upstream bytes by URL path, with Range support and injectable faults."""

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files
        self.drop: dict[str, int] = {}  # url path -> how many more responses to cut in half
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        server: Mirror = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drop.get(self.path, 0) > 0:
            server.drop[self.path] -= 1
            self.wfile.write(body[: len(body) // 2])  # then the connection closes mid-file
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def entries():
    return read_manifest()


@pytest.fixture
def mirror(datasets, entries):
    """Serves the upstream bytes of two staged files (one kept gzipped by the layout) and nothing else."""
    files = {}
    for path in (PLAIN, REGZIPPED):
        entry = entries[path]
        staged = (datasets / path).read_bytes()
        files[f"{entry.repo}/{entry.commit}/{entry.source_path}"] = gzip.decompress(staged) if entry.gzip else staged
    server = Mirror(files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_shipped_manifest_covers_the_staged_mirror(datasets, tmp_path):
    # Rebuilt from the mirror's MANIFEST.md and files, it is the shipped one (so it is also up to date).
    rebuilt = tmp_path / "manifest.tsv"
    assert build_manifest(datasets, rebuilt) == len(read_manifest())
    assert rebuilt.read_text() == MANIFEST.read_text()
    staged = {p.relative_to(datasets).as_posix() for p in datasets.rglob("*") if p.is_file() and p.name != "MANIFEST.md"}
    assert staged == set(read_manifest())


def test_fetch_writes_the_staged_bytes_verified(mirror, entries, datasets, tmp_path):
    for path in (PLAIN, REGZIPPED):
        out = fetch(entries[path], tmp_path / path, base_url=mirror.url, retries=1)
        assert out.read_bytes() == (datasets / path).read_bytes(), path
    assert sorted(p.name for p in (tmp_path / "gsm8k").iterdir()) == ["test.jsonl", "train.jsonl.gz"]  # no .part/.tmp left


def test_a_corrupted_file_is_an_error_naming_url_and_checksum_and_leaves_nothing(mirror, entries, tmp_path):
    entry = entries[PLAIN]
    key = f"{entry.repo}/{entry.commit}/{entry.source_path}"
    mirror.files[key] = mirror.files[key][:-10] + b"corrupted!"
    with pytest.raises(FetchError) as error:
        fetch(entry, tmp_path / PLAIN, base_url=mirror.url, retries=1)
    assert entry.url(mirror.url) in str(error.value) and entry.upstream_sha256 in str(error.value)
    assert not (tmp_path / "gsm8k").exists() or list((tmp_path / "gsm8k").iterdir()) == []


def test_a_dropped_connection_resumes_with_a_range_request(mirror, entries, datasets, tmp_path):
    entry = entries[REGZIPPED]
    url_path = "/" + f"{entry.repo}/{entry.commit}/{entry.source_path}"
    mirror.drop[url_path] = 2
    out = fetch(entry, tmp_path / REGZIPPED, base_url=mirror.url, retries=4, backoff=0.01)
    assert out.read_bytes() == (datasets / REGZIPPED).read_bytes()
    ranges = [r for p, r in mirror.requests if p == url_path]
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:]) and len(ranges) == 3


def test_a_server_that_always_drops_gives_up_with_no_final_file(mirror, entries, tmp_path):
    entry = entries[PLAIN]
    mirror.drop["/" + f"{entry.repo}/{entry.commit}/{entry.source_path}"] = 99
    with pytest.raises(FetchError, match="gave up after 3 attempts"):
        fetch(entry, tmp_path / PLAIN, base_url=mirror.url, retries=3, backoff=0.01)
    assert not (tmp_path / PLAIN).exists() and (tmp_path / (PLAIN + ".part")).exists()  # kept to resume


def test_a_missing_remote_file_is_an_error(mirror, entries, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(dataclasses.replace(entries[PLAIN], source_path="nope.jsonl"), tmp_path / "x", base_url=mirror.url)


@pytest.mark.workflow
def test_the_workflow_fetches_what_datasets_dir_lacks_and_nothing_it_holds(mirror, datasets, tmp_path):
    """rule fetch_dataset on an empty datasets_dir, then nothing to do; the staged mirror itself never plans a fetch."""
    empty = tmp_path / "datasets"
    target = empty / PLAIN

    def snakemake(*targets, dry=False, datasets_dir=empty):
        cmd = [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--configfile",
            str(REPO / "configs" / "demo.yaml"),
        ]
        cmd += ["--directory", str(tmp_path), "--cores", "1", *(["-n"] if dry else [])]
        cmd += ["--config", f"datasets_dir={datasets_dir}", f"datasets_url={mirror.url}", "--", *targets]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    done = snakemake(str(target))
    assert done.returncode == 0, done.stderr[-3000:]
    assert target.read_bytes() == (datasets / PLAIN).read_bytes()
    assert "fetched gsm8k/test.jsonl" in (tmp_path / "logs/fetch_dataset" / (PLAIN + ".log")).read_text()
    # Fetched once: a file the folder holds is a plain input from then on (what reads it plans no fetch of it).
    again = snakemake("results/data/targets/gsm8k/test.parquet", dry=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"dataset_file={PLAIN}" not in again.stdout and "prepare_test" in again.stdout
    plan = snakemake("results/data/pool.parquet", dry=True, datasets_dir=datasets)
    stats = plan.stdout.split("Job stats:", 1)[1].split("Reasons:", 1)[0]
    assert plan.returncode == 0 and "build_pool" in stats and "fetch_dataset" not in stats, stats
    assert hashlib.sha256(target.read_bytes()).hexdigest() == read_manifest()[PLAIN].sha256
