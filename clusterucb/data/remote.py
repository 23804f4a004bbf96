"""Dataset files fetched from their public source at a pinned commit, verified, written atomically.

``remote_manifest.tsv`` (shipped beside this module) lists every file of the
staged layout (``datasets_dir``): its path there, the source repository, the
pinned commit and the file's path in the repository, the sha256 of the
upstream bytes, whether the staged copy is a gzip of them (level 9, mtime 0),
and the sha256 of the staged file. A file is fetched from
``<base_url>/<repo>/<commit>/<source path>`` (GitHub's raw layout; a mirror in
the same layout works the same), resumed with HTTP Range requests when the
connection drops, retried with backoff, checked against the upstream sha256,
gzipped if the layout keeps it gzipped, and only then renamed to its final
name: a failed or corrupted download never leaves a file that looks finished.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = Path(__file__).with_name("remote_manifest.tsv")
DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
FIELDS = ("path", "repo", "commit", "source_path", "upstream_sha256", "gzip", "sha256", "bytes")


class FetchError(RuntimeError):
    """A dataset file could not be fetched or did not verify."""


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to datasets_dir
    repo: str
    commit: str
    source_path: str
    upstream_sha256: str
    gzip: bool  # the layout keeps a gzip of the upstream bytes
    sha256: str  # of the staged file
    bytes: int  # of the staged file

    def url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{self.source_path}"


def read_manifest(path: str | os.PathLike = MANIFEST) -> dict[str, RemoteFile]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return {
        r["path"]: RemoteFile(
            r["path"], r["repo"], r["commit"], r["source_path"], r["upstream_sha256"], r["gzip"] == "true", r["sha256"], int(r["bytes"])
        )
        for r in rows
    }


def build_manifest(staged_dir: str | os.PathLike, out: str | os.PathLike = MANIFEST) -> int:
    """Write the manifest from a staged mirror and its MANIFEST.md (repo, commit, source path, sha256 per file).

    The upstream sha256 of a file the mirror gzipped is computed from its
    decompressed bytes. Every file's sha256 is checked against MANIFEST.md.
    """
    staged = Path(staged_dir)
    rows = []
    for line in (staged / "MANIFEST.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 9 or not re.fullmatch(r"[0-9a-f]{64}", cells[7]) or not re.fullmatch(r"[0-9a-f]{40}", cells[2]):
            continue
        path, repo, commit, source_path, sha = cells[0], cells[1], cells[2], cells[3], cells[7]
        data = (staged / path).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise FetchError(f"{staged / path}: sha256 differs from MANIFEST.md ({sha})")
        regzipped = path.endswith(".gz") and not source_path.endswith(".gz")
        upstream = gzip.decompress(data) if regzipped else data
        rows.append([path, repo, commit, source_path, hashlib.sha256(upstream).hexdigest(), str(regzipped).lower(), sha, str(len(data))])
    rows.sort()
    tmp = Path(f"{out}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(FIELDS)
        writer.writerows(rows)
    os.replace(tmp, out)
    return len(rows)


def _download(url: str, part: Path, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (an HTTP Range request from its current size)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        mode = "ab" if have and response.status == 206 else "wb"  # 200: the server ignored the range, start over
        with open(part, mode) as sink:
            while chunk := response.read(1 << 20):
                sink.write(chunk)
        expected = response.headers.get("Content-Length")
    got = part.stat().st_size - (have if mode == "ab" else 0)
    if expected is not None and got < int(expected):
        raise ConnectionError(f"connection closed after {got} of {expected} bytes")


def fetch(
    entry: RemoteFile,
    dest: str | os.PathLike,
    base_url: str = DEFAULT_BASE_URL,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
) -> Path:
    """Download ``entry`` to ``dest``, verified, atomically (see the module doc)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = entry.url(base_url)
    part = dest.with_name(dest.name + ".part")  # resumable partial download, never the final name
    last_error: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            _download(url, part, timeout)
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
            if isinstance(error, urllib.error.HTTPError) and error.code in (404, 403, 410):
                part.unlink(missing_ok=True)
                raise FetchError(f"{url}: HTTP {error.code} (fetching {entry.path})") from error
            if isinstance(error, urllib.error.HTTPError) and error.code == 416:
                part.unlink(missing_ok=True)  # our partial file is longer than the remote one: start over
            last_error = error
            log.warning("fetch %s: attempt %d/%d failed (%s)", url, attempt, retries, error)
            if attempt < retries:
                time.sleep(backoff * 2 ** (attempt - 1))
    else:
        raise FetchError(f"{url}: gave up after {retries} attempts ({last_error}); partial download kept in {part}")
    data = part.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.upstream_sha256:
        part.unlink()
        raise FetchError(f"{url}: sha256 {digest} does not match the expected {entry.upstream_sha256} ({entry.path}); nothing written")
    if entry.gzip:
        data = gzip.compress(data, compresslevel=9, mtime=0)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            # Another zlib can compress the same bytes differently; the content was verified above.
            log.info("%s: content verified; its gzip bytes differ from the staged copy's (another zlib)", entry.path)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    part.unlink()
    log.info("fetched %s (%d bytes) from %s, sha256 verified", entry.path, len(data), url)
    return dest


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Fetch one dataset file, or rebuild the shipped remote manifest from a staged mirror.")
    parser.add_argument("--fetch", metavar="PATH", help="a path of the manifest (relative to datasets_dir)")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL)
    parser.add_argument("--out", help="where to write it")
    parser.add_argument("--build-manifest", metavar="STAGED_DIR", help="a staged datasets folder with its MANIFEST.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.build_manifest:
        print(f"{build_manifest(args.build_manifest)} files -> {MANIFEST}")
        return
    if not (args.fetch and args.out):
        parser.error("--fetch PATH --out FILE, or --build-manifest STAGED_DIR")
    entries = read_manifest()
    if args.fetch not in entries:
        raise SystemExit(f"{args.fetch} is not in {MANIFEST}")
    fetch(entries[args.fetch], args.out, base_url=args.base_url)


if __name__ == "__main__":
    main()
