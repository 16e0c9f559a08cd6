"""A local stand-in for the Hugging Face hub, serving directories as repositories on 127.0.0.1.

The hub cannot be reached from CI, yet `--dataset allenai/c4 --tokenizer t5-base` is what every user with a network
runs first. This server answers exactly the requests that huggingface_hub 2.4 (`HfFileSystem`, `hf_hub_download`),
datasets 5.2 (`hf://` streaming) and transformers 5.24 (`AutoTokenizer.from_pretrained`) make, read from their
sources, so those clients run unmodified against it when `HF_ENDPOINT` points here:

- `GET /api/{models|datasets}/{repo}[/revision/{rev}]`: repository info (`sha`, `siblings`);
- `GET /api/{type}/{repo}/tree/{rev}[/{path}]?recursive=&expand=`: a folder listing (one page, no `Link` header);
- `POST /api/{type}/{repo}/paths-info/{rev}` (form fields `paths`, `expand`): entries of the given paths;
- `HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}`: the file, with `X-Repo-Commit` and `ETag` (the client refuses
  a file without them), `Content-Length`, and `Range: bytes=a-b` / `bytes=a-` answered with 206 (HfFileSystem reads
  blocks and resumes broken streams that way).

Errors carry the hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`), which is how the
clients tell a missing optional file (transformers probes several) from a missing repository. Anything else is
answered 404 and recorded in `unhandled`, so a test can assert that the clients asked for nothing unexpected
(`/api/agent-harnesses`, huggingface_hub's telemetry registry, is answered 404 as an ignorable extra). Olah 0.5.4,
a self-hosted hub mirror, was tried first: offline it answers 401 to `/api/{type}/{repo}` without a revision and to
a missing file, which stops `HfFileSystem.glob` and `AutoTokenizer.from_pretrained`.

Faults, for the tests of a flaky hub (`hub.fail`, `hub.drop`): the next N requests whose path matches a regular
expression are answered with an HTTP status (503: the hub overloaded) or, for file reads, cut after a number of
body bytes by closing the connection (a connection dropped mid-shard). `hub.faults_served` counts the faults
answered; `hub.clear_faults()` ends them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

IGNORED = ("/api/agent-harnesses",)


class Repo:
    """A directory served as one hub repository at a fixed commit."""

    def __init__(self, repo_type: str, repo_id: str, root: str):
        self.repo_type, self.repo_id, self.root = repo_type, repo_id, os.path.abspath(root)
        self.files = sorted(os.path.relpath(os.path.join(d, f), self.root).replace(os.sep, "/")
                            for d, _, names in os.walk(self.root) for f in names)
        digest = hashlib.sha1()
        for path in self.files:
            digest.update(path.encode() + b"\0" + self.blob_id(path).encode())
        self.sha = digest.hexdigest()

    def blob_id(self, path: str) -> str:
        """The git blob id of a file, as the hub gives it for files not stored in LFS."""
        with open(os.path.join(self.root, path), "rb") as fh:
            content = fh.read()
        return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()

    def is_dir(self, path: str) -> bool:
        return path == "" or any(f.startswith(path.rstrip("/") + "/") for f in self.files)

    def entry(self, path: str) -> dict:
        if path in self.files:
            return {"type": "file", "oid": self.blob_id(path), "size": os.path.getsize(os.path.join(self.root, path)),
                    "path": path}
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}

    def listing(self, folder: str, recursive: bool) -> list[dict]:
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        paths = set()
        for f in self.files:
            if not f.startswith(prefix):
                continue
            parts = f[len(prefix):].split("/")
            last = len(parts) if recursive else 1
            paths.update(prefix + "/".join(parts[:i]) for i in range(1, last + 1))
        return [self.entry(p) for p in sorted(paths)]

    def info(self) -> dict:
        return {"id": self.repo_id, "author": self.repo_id.split("/")[0], "sha": self.sha, "private": False,
                "gated": False, "disabled": False, "lastModified": "2026-01-01T00:00:00.000Z", "tags": [],
                "siblings": [{"rfilename": f} for f in self.files]}


@dataclass
class Fault:
    """After letting `skip` matching requests through, answer the next `count` requests matching `pattern` with
    `status` (and `Retry-After: 0`, so the clients' own backoff is short), or (status None) send `after_bytes` bytes
    of a file's body and close the connection."""

    pattern: str
    count: int
    status: int | None = 503
    after_bytes: int = 0
    skip: int = 0


class LocalHub:
    """`with LocalHub({("datasets", "org/c4"): "data/c4_sample"}) as hub:` then set HF_ENDPOINT=hub.endpoint."""

    def __init__(self, repos: dict[tuple[str, str], str]):
        self.repos = {(kind, repo_id): Repo(kind, repo_id, root) for (kind, repo_id), root in repos.items()}
        self.requests: list[str] = []  # "METHOD /path [Range]" of every request, in order
        self.unhandled: list[str] = []
        self.faults: list[Fault] = []
        self.faults_served = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # -- faults ------------------------------------------------------------------------------------------------
    def fail(self, count: int, status: int = 503, pattern: str = r"/resolve/", skip: int = 0) -> None:
        """The next `count` requests whose path matches `pattern` (default: file reads), after `skip` of them, are
        answered `status`. Faults queue: a request takes the first unexhausted one it matches."""
        with self._lock:
            self.faults.append(Fault(pattern, count, status=status, skip=skip))

    def drop(self, count: int, after_bytes: int, pattern: str = r"/resolve/", skip: int = 0) -> None:
        """The next `count` file reads matching `pattern`, after `skip` of them, send `after_bytes` bytes of the body,
        then the connection closes (the headers announce the whole length: the client sees a stream broken
        mid-file)."""
        with self._lock:
            self.faults.append(Fault(pattern, count, status=None, after_bytes=after_bytes, skip=skip))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take_fault(self, method: str, raw: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.count > 0 and re.search(fault.pattern, raw) and (fault.status is not None or method == "GET"):
                    if fault.skip > 0:
                        fault.skip -= 1
                        return None
                    fault.count -= 1
                    self.faults_served += 1
                    return fault
        return None

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the clients' connection pools expect

            def log_message(self, *args) -> None:  # quiet: the test reads hub.requests instead
                pass

            def do_HEAD(self) -> None:
                self._route("HEAD")

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            # -- responses ----------------------------------------------------------------------------
            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, str(value))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if head:
                    return
                fault = getattr(self, "_fault", None)
                if fault is not None and fault.status is None and status in (200, 206):  # drop mid-body
                    self.wfile.write(body[:fault.after_bytes])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def _json(self, obj, head: bool = False, headers: dict | None = None) -> None:
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})},
                           head)

            def _error(self, status: int, code: str, message: str, repo: Repo | None = None, head: bool = False):
                headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
                if repo is not None:
                    headers["X-Repo-Commit"] = repo.sha
                self._send(status, json.dumps({"error": message}).encode(), headers, head)

            # -- routing ------------------------------------------------------------------------------
            def _repo(self, kind: str, repo_id: str, revision: str | None, head: bool) -> Repo | None:
                repo = hub.repos.get((kind, repo_id))
                if repo is None:
                    self._error(404, "RepoNotFound", "Repository not found", head=head)
                    return None
                if revision is not None and urllib.parse.unquote(revision) not in ("main", repo.sha):
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", repo, head)
                    return None
                return repo

            def _route(self, method: str) -> None:
                url = urllib.parse.urlsplit(self.path)
                raw, query = url.path, urllib.parse.parse_qs(url.query)
                ranged = self.headers.get("Range")
                hub.requests.append(f"{method} {raw}" + (f" [{ranged}]" if ranged else ""))
                head = method == "HEAD"
                body = b""
                if "Content-Length" in self.headers:
                    body = self.rfile.read(int(self.headers["Content-Length"]))
                self._fault = hub._take_fault(method, raw)
                if self._fault is not None and self._fault.status is not None:
                    return self._send(self._fault.status, b"injected fault", {"Retry-After": "0"}, head=head)
                repo_part = r"(?P<repo>[^/]+/[^/]+)"
                if m := re.fullmatch(rf"/api/(?P<kind>models|datasets)/{repo_part}(/revision/(?P<rev>[^/]+))?", raw):
                    if method in ("GET", "HEAD") and (repo := self._repo(m["kind"], m["repo"], m["rev"], head)):
                        return self._json(repo.info(), head)
                    if method not in ("GET", "HEAD"):
                        return self._unhandled(method, raw)
                    return None
                if m := re.fullmatch(rf"/api/(?P<kind>models|datasets)/{repo_part}/tree/(?P<rev>[^/]+)(/(?P<path>.+))?",
                                     raw):
                    if not (repo := self._repo(m["kind"], m["repo"], m["rev"], head)):
                        return None
                    path = urllib.parse.unquote(m["path"] or "")
                    if not repo.is_dir(path):
                        return self._error(404, "EntryNotFound", f"{path} does not exist", repo, head)
                    recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
                    return self._json(repo.listing(path, recursive), head)
                if m := re.fullmatch(rf"/api/(?P<kind>models|datasets)/{repo_part}/paths-info/(?P<rev>[^/]+)", raw):
                    if method != "POST":
                        return self._unhandled(method, raw)
                    if not (repo := self._repo(m["kind"], m["repo"], m["rev"], head)):
                        return None
                    form = urllib.parse.parse_qs(body.decode())
                    paths = [p.strip("/") for p in form.get("paths", [])]
                    found = [repo.entry(p) for p in paths if p in repo.files or (p and repo.is_dir(p))]
                    return self._json(found)
                if m := re.fullmatch(rf"/(?P<kind>datasets/)?{repo_part}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", raw):
                    if method not in ("GET", "HEAD"):
                        return self._unhandled(method, raw)
                    kind = "datasets" if m["kind"] else "models"
                    if not (repo := self._repo(kind, m["repo"], m["rev"], head)):
                        return None
                    return self._file(repo, urllib.parse.unquote(m["path"]), head)
                if raw in IGNORED:
                    return self._send(404, b"", head=head)
                return self._unhandled(method, raw)

            def _unhandled(self, method: str, raw: str) -> None:
                hub.unhandled.append(f"{method} {raw}")
                self._send(404, b"not implemented by tests/hub_server.py", head=method == "HEAD")

            def _file(self, repo: Repo, path: str, head: bool) -> None:
                if path not in repo.files:
                    return self._error(404, "EntryNotFound", f"{path} does not exist", repo, head)
                with open(os.path.join(repo.root, path), "rb") as fh:
                    content = fh.read()
                headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{repo.blob_id(path)}"', "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "") or "")
                if not ranged:
                    return self._send(200, content, headers, head)
                start = int(ranged[1])
                end = min(int(ranged[2]) if ranged[2] else len(content) - 1, len(content) - 1)
                if start >= len(content):
                    return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"}, head)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                return self._send(206, content[start:end + 1], headers, head)

        return Handler
