"""A real HTTP server on 127.0.0.1 that speaks the part of the Hugging Face hub protocol huggingface_hub's own
client uses for ``hf_hub_download`` and ``HfApi.create_repo`` / ``create_commit`` (regular, non-LFS uploads).

Endpoints (as read from huggingface_hub's source, file_download.py / hf_api.py / _commit_api.py):

    HEAD|GET /{org}/{name}/resolve/{revision}/{path}   X-Repo-Commit, ETag, Content-Length; 404 + X-Error-Code
    POST /api/repos/create                             {"name", "organization"} -> {"url"}; 409 if it exists
    POST /api/validate-yaml                            {"errors": [], "warnings": []}
    POST /api/models/{org}/{name}/preupload/{rev}      every file "regular"
    POST /api/models/{org}/{name}/commit/{rev}         ndjson header + base64 files -> {"commitUrl", "commitOid"}

``hub.truncate[(repo_id, path)] = n`` serves only the first n bytes of a file (with a matching Content-Length),
to test truncated downloads; ``hub.requests`` logs (method, path) for offline-mode assertions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

# Imported now, while HF_HUB_OFFLINE is unset: huggingface_hub reads it once, when `constants` is first imported
# (lazily), so a test that sets it must not be the first to import it.
import huggingface_hub.constants  # noqa: F401
import huggingface_hub.file_download  # noqa: F401
import pytest


class FakeHubState:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo_id -> {"commits": {sha: {path: bytes}}, "refs": {"main": sha}}
        self.requests: list[tuple[str, str]] = []
        self.truncate: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def create(self, repo_id: str) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            sha = hashlib.sha1(f"init:{repo_id}".encode()).hexdigest()
            self.repos[repo_id] = {"commits": {sha: {}}, "refs": {"main": sha}}
            return True

    def commit(self, repo_id: str, revision: str, files: dict[str, bytes], deleted: list[str]) -> str:
        with self.lock:
            repo = self.repos[repo_id]
            parent = repo["refs"].get(revision, revision)
            tree = dict(repo["commits"][parent])
            tree.update(files)
            for p in deleted:
                tree.pop(p, None)
            h = hashlib.sha1(parent.encode())
            for p in sorted(tree):
                h.update(p.encode() + hashlib.sha256(tree[p]).digest())
            sha = h.hexdigest()
            repo["commits"][sha] = tree
            repo["refs"][revision if revision in repo["refs"] else "main"] = sha
            return sha

    def put_files(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Test helper: create the repo if needed and commit raw files directly."""
        self.create(repo_id)
        return self.commit(repo_id, "main", files, [])


def _make_handler(state: FakeHubState, base_url: list[str]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # ---------------------------------------------------------------------------------- helpers
        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(code)
            headers = dict(headers or {})
            headers.setdefault("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if body and not head:
                self.wfile.write(body)

        def _json(self, code: int, obj, headers: dict | None = None) -> None:
            self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, code: int, error_code: str, message: str, extra: dict | None = None,
                   head: bool = False) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(code, body, {"Content-Type": "application/json", "X-Error-Code": error_code,
                                    "X-Error-Message": message, **(extra or {})}, head=head)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        # --------------------------------------------------------------------------------- resolve
        def _resolve(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path).lstrip("/")
            parts = path.split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return self._error(404, "RepoNotFound", f"no route {self.path}", head=head)
            repo_id, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            repo = state.repos.get(repo_id)
            if repo is None:
                return self._error(401, "RepoNotFound", f"Repository {repo_id} not found", head=head)
            sha = repo["refs"].get(revision, revision)
            if sha not in repo["commits"]:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            tree = repo["commits"][sha]
            if filename not in tree:
                return self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}",
                                   {"X-Repo-Commit": sha}, head=head)
            data = tree[filename]
            if (repo_id, filename) in state.truncate:
                data = data[: state.truncate[(repo_id, filename)]]
            etag = hashlib.sha256(tree[filename]).hexdigest()
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and not head:
                start = int(rng[len("bytes="):].split("-")[0] or 0)
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._send(206, data[start:], headers)
            headers["Content-Length"] = str(len(data))
            return self._send(200, data, headers, head=head)

        def do_HEAD(self) -> None:  # noqa: N802
            state.requests.append(("HEAD", self.path))
            self._resolve(head=True)

        def do_GET(self) -> None:  # noqa: N802
            state.requests.append(("GET", self.path))
            self._resolve(head=False)

        # ------------------------------------------------------------------------------------- api
        def do_POST(self) -> None:  # noqa: N802
            state.requests.append(("POST", self.path))
            path = unquote(urlparse(self.path).path)
            body = self._body()
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
                if not state.create(repo_id):  # the real hub also returns the url with its 409
                    return self._send(409, json.dumps({"error": "You already created this model repo",
                                                       "url": f"{base_url[0]}/{repo_id}"}).encode(),
                                      {"Content-Type": "application/json"})
                return self._json(200, {"url": f"{base_url[0]}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            parts = path.strip("/").split("/")
            # api / models / org / name / (preupload|commit) / revision
            if len(parts) == 6 and parts[0] == "api" and parts[1] == "models":
                repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                if repo_id not in state.repos:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False, "oid": None} for f in files]})
                if action == "commit":
                    files, deleted = {}, []
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if item["key"] == "file":
                            v = item["value"]
                            assert v.get("encoding") == "base64"
                            files[v["path"]] = base64.b64decode(v["content"])
                        elif item["key"] in ("deletedFile", "deletedFolder"):
                            deleted.append(item["value"]["path"])
                        elif item["key"] == "lfsFile":
                            return self._error(400, "BadRequest", "this test hub takes regular files only")
                    sha = state.commit(repo_id, revision, files, deleted)
                    return self._json(200, {"commitUrl": f"{base_url[0]}/{repo_id}/commit/{sha}",
                                            "commitOid": sha, "success": True})
            return self._error(404, "NotFound", f"no route POST {path}")

    return Handler


@pytest.fixture(scope="session")
def hub_server():
    state = FakeHubState()
    base = [""]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state, base))
    server.daemon_threads = True
    base[0] = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = base[0]
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_hub(hub_server, tmp_path, monkeypatch):
    """The fake hub, with HF_ENDPOINT pointing at it and a fresh hub cache per test; offline mode off."""
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    hub_server.requests.clear()
    return hub_server


@pytest.fixture
def random_model():
    """``random_model(name, seed=0, **overrides)``: preset ``name`` in eval mode with every parameter moved off its
    initialisation (so a load that silently keeps init values would show)."""
    import torch

    import zoo

    def make(name: str, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model = zoo.create_model(name, **overrides).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        return model

    return make
