"""A real HTTP server on 127.0.0.1 speaking the Ollama endpoints the generator uses.

GET /api/tags lists the models; POST /api/generate answers per clip from a script the test controls
(keyed by the clip's first caption, which the generator sends inside its prompt). Every request is
logged, so tests can assert which clip was asked when.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NUMBER_WORDS = ["one", "two", "three", "four", "five", "six"]


def good_answer(key: str, items: int = 5, extra: str = "") -> str:
    """A valid numbered list whose captions are a pure function of the clip (so runs are comparable)."""
    words = [w for w in key.lower().replace(".", " ").replace(",", " ").split() if w.isalpha()][:6]
    return "\n".join(f"{i + 1}. a new description {NUMBER_WORDS[i]} of {' '.join(words)}{extra}"
                     for i in range(items))


class ScriptedOllama:
    """Behaviours per clip, consumed one per request; the last one repeats."""

    def __init__(self, models=("phi4:latest",), delay_seconds: float = 0.0, hang_seconds: float = 5.0):
        self.models = list(models)
        self.delay_seconds = delay_seconds
        self.hang_seconds = hang_seconds
        self.scripts: dict[str, list[str]] = {}
        self.requests: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "ScriptedOllama":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def behaviour_for(self, key: str) -> str:
        with self.lock:
            self.requests.append((time.time(), key))
            script = self.scripts.get(key, ["ok"])
            return script.pop(0) if len(script) > 1 else script[0]

    def answer(self, key: str, behaviour: str) -> str:
        return {
            "ok": good_answer(key),
            "chatter": "Sure! Here are five descriptions:\n\n" + good_answer(key) + "\n\nI hope these help.",
            "four": good_answer(key, items=4),
            "six": good_answer(key, items=6),
            "digits": good_answer(key).replace("one of", "1 of"),
            "long": good_answer(key, extra=" and then it goes on and on for a very long while indeed"),
        }[behaviour]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _json(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/api/tags":
                    self._json(200, {"models": [{"name": m, "model": m, "modified_at": "2026-01-01T00:00:00Z",
                                                 "size": 1, "digest": "0"} for m in server.models]})
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/api/generate":
                    return self._json(404, {"error": "not found"})
                if request["model"] not in server.models and f"{request['model']}:latest" not in server.models:
                    return self._json(404, {"error": f"model '{request['model']}' not found"})
                payload = json.loads(request["prompt"][request["prompt"].index("{"):])
                key = payload["captions"][0]
                behaviour = server.behaviour_for(key)
                time.sleep(server.delay_seconds)
                if behaviour == "500":
                    return self._json(500, {"error": "llama runner process has terminated"})
                if behaviour == "hang":
                    time.sleep(server.hang_seconds)
                    return self._json(500, {"error": "too late"})
                if behaviour == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return None
                self._json(200, {"model": request["model"], "created_at": "2026-01-01T00:00:00Z",
                                 "response": server.answer(key, behaviour), "done": True})

        return Handler
