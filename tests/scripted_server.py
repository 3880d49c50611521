"""A scripted OpenAI-compatible server on real HTTP, for the tests and the benchmarks: it answers
what a test's `reply(body)` says, or fails in one of the ways a real server or proxy does (FAULTS)."""
import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("http_500", "http_503", "http_429", "drop", "cut", "not_json", "no_choices", "no_usage", "stall",
          "context_length")


class ScriptedServer:
    """Serves /v1/chat/completions on 127.0.0.1. `reply(body)` returns the assistant text, raw
    bytes for the answer's body, a message dict (e.g. with tool_calls), an int HTTP status to
    fail with, or one of FAULTS: an
    HTTP error (`http_NNN`; a 429 / 503 says Retry-After `retry_after` s when that is given), a
    dropped connection, an answer cut off mid-body, a body that is not JSON, an answer without
    `choices` or `usage`, a stall of `stall` s (past the client's timeout) before dropping, or a
    400 for a prompt over the context length, worded as vLLM words it. `delay` seconds are slept
    before each answer (a stand-in for model latency). /v1/models lists `models` (answered with
    `list_status` when it is not 200, as `transformers serve` answers 500 for a local path); with
    `strict`, a chat request for another model gets vLLM's 404. `port` 0 picks a free one."""

    def __init__(self, reply, delay=0.0, models=("scripted",), strict=False, list_status=200,
                 stall=2.0, port=0, retry_after=None):
        self.reply, self.delay, self.requests = reply, delay, []
        self.models, self.strict, self.list_status, self.stall = models, strict, list_status, stall
        self.retry_after = retry_after
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload, data=None, cut=False):
                data = data or json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status in (429, 503) and server.retry_after is not None:
                    self.send_header("Retry-After", str(server.retry_after))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2] if cut else data)
                if cut:
                    self.wfile.flush()
                    self._drop()

            def _drop(self):
                self.close_connection = True
                with contextlib.suppress(OSError):   # the client may have gone already
                    self.connection.shutdown(socket.SHUT_RDWR)

            def do_GET(self):
                if server.list_status != 200:
                    return self._send(server.list_status, {"error": "Internal Server Error"})
                self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompt = sum(len(str(m.get("content") or "")) for m in body.get("messages", [])) // 4  # ~tokens
                with server._lock:
                    server.requests.append(body)
                if server.delay:
                    time.sleep(server.delay)
                if server.strict and body.get("model") not in server.models:
                    return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                                      "type": "NotFoundError", "param": None, "code": 404}})
                out = server.reply(body)
                if isinstance(out, bytes):   # a raw 200 body, as a broken proxy or server sends
                    return self._send(200, None, out)
                if isinstance(out, int) or (isinstance(out, str) and out.startswith("http_") and out in FAULTS):
                    status = int(str(out).removeprefix("http_"))
                    return self._send(status, {"error": {"message": f"scripted failure {status}"}})
                if out == "drop":
                    return self._drop()
                if out == "stall":
                    time.sleep(server.stall)
                    return self._drop()
                if out == "not_json":
                    return self._send(200, None, b"<html><body>502 Bad Gateway</body></html>")
                if out == "context_length":
                    return self._send(400, {"error": {
                        "message": f"'max_tokens' or 'max_completion_tokens' is too large: {body.get('max_tokens')}. "
                                   f"This model's maximum context length is {prompt} tokens and your request has "
                                   f"{prompt} input tokens ({body.get('max_tokens')} > {prompt} - {prompt}). None",
                        "type": "BadRequestError", "param": None, "code": 400}})
                message = out if isinstance(out, dict) else {"role": "assistant", "content": out}
                message.setdefault("role", "assistant")
                completion = len(message.get("content") or "") // 4
                answer = {
                    "id": "chatcmpl-scripted", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "scripted"),
                    "choices": [{"index": 0, "message": message,
                                 "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion}}
                if out in ("no_choices", "no_usage"):
                    del answer[out.removeprefix("no_")]
                self._send(200, answer, cut=out == "cut")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None   # a client that left is not news
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve_in_process(self):
        """Serve from a forked process instead (as a real server is), so the client's process
        does not share its CPU and GIL with the server. Returns the process; terminate it."""
        import multiprocessing
        proc = multiprocessing.get_context("fork").Process(target=self.httpd.serve_forever, daemon=True)
        proc.start()
        self.httpd.socket.close()  # the child owns the listening socket now
        return proc
