"""A real HTTP server on 127.0.0.1 that serves model repos the way the Hugging Face hub does, for huggingface_hub.

Why: `Reranker.from_pretrained("owner/name")` downloads through huggingface_hub's `snapshot_download`
when a hub id is not in the cache; CI has no network, so the online path is tested against this server
(point HF_ENDPOINT at `url`). It answers the calls snapshot_download makes: the repo info
(`/api/models/<repo>/revision/<rev>`), the file listing (`/api/models/<repo>/tree/<rev>`) and the files
(`/<repo>/resolve/<rev>/<file>`, HEAD and GET, with the commit and ETag headers the client checks).
Unknown repos, revisions and files get the hub's 404 with its `X-Error-Code`. Every request is logged
in `requests` as (method, path), so tests can check which files were fetched.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "FakeHub"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _reply(self, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _json(self, status: int, obj, body: bool, headers: dict[str, str] | None = None) -> None:
        self._reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}, body)

    def _not_found(self, code: str, message: str, body: bool) -> None:
        self._json(404, {"error": message}, body, {"X-Error-Code": code, "X-Error-Message": message})

    def _serve(self, *, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.server.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, kind, revision = "/".join(parts[2:4]), parts[4], parts[5]
            repo = self._repo(repo_id, revision, body)
            if repo is None:
                return
            if kind == "revision":
                self._json(200, {"id": repo_id, "modelId": repo_id, "sha": repo["sha"], "private": False,
                                 "siblings": [{"rfilename": name} for name in sorted(repo["files"])]}, body)
            else:
                self._json(200, [{"type": "file", "path": name, "size": len(data), "oid": _blob_id(data)}
                                 for name, data in sorted(repo["files"].items())], body)
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            repo = self._repo(repo_id, revision, body)
            if repo is None:
                return
            if filename not in repo["files"]:
                self._not_found("EntryNotFound", f"{filename} does not exist in {repo_id}", body)
                return
            data = repo["files"][filename]
            self._reply(200, data, {"Content-Type": "application/octet-stream", "X-Repo-Commit": repo["sha"],
                                    "ETag": f'"{_blob_id(data)}"'}, body)
            return
        self._not_found("EndpointNotFound", f"no such endpoint {path}", body)

    def _repo(self, repo_id: str, revision: str, body: bool) -> dict | None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._not_found("RepoNotFound", f"Repository {repo_id} not found", body)
            return None
        if revision not in ("main", repo["sha"]):
            self._not_found("RevisionNotFound", f"Invalid rev id: {revision}", body)
            return None
        return repo


def _blob_id(data: bytes) -> str:
    """git's blob id, which the hub reports as a file's oid (and ETag for files stored in git)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add_repo(self, repo_id: str, folder: Path, *, extra_files: dict[str, bytes] | None = None) -> str:
        """Serve every file of `folder` (plus `extra_files`) as repo `repo_id`; returns its commit sha."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        files.update(extra_files or {})
        sha = hashlib.sha1(repo_id.encode() + b"".join(files[name] for name in sorted(files))).hexdigest()
        self.repos[repo_id] = {"sha": sha, "files": files}
        return sha

    def fetched(self) -> set[str]:
        """The files GET-downloaded so far, as "<repo>/<file>"."""
        out = set()
        for method, path in self.requests:
            parts = path.strip("/").split("/")
            if method == "GET" and len(parts) >= 5 and parts[2] == "resolve":
                out.add("/".join(parts[:2] + parts[4:]))
        return out

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
