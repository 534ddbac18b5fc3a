"""A scripted judge behind a real OpenAI-compatible endpoint (http.server on a free port).

`serve(answer)` runs it: `answer(prompt) -> str` writes the judge's reply to the user message
of each /v1/chat/completions request; /v1/models lists one model. Every request body is kept
in `.seen`. With `strict=True` it refuses the structured-output fields (response_format,
structured_outputs, guided_*) with HTTP 400, as the OpenAI API refuses fields it does not know.
With `fail_after=k` it answers HTTP 500 to every chat request after the first k (0: to all).
"""

import contextlib
import http.server
import json
import threading

_STRUCTURED = ("response_format", "structured_outputs", "guided_json", "guided_choice",
               "guided_regex")


class _Handler(http.server.BaseHTTPRequestHandler):
    answer = staticmethod(lambda prompt: "")
    seen: list = []
    strict = False
    fail_after = None

    def _send(self, obj, status=200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        if type(self).fail_after is not None and len(type(self).seen) > type(self).fail_after:
            self._send({"error": {"message": "internal server error", "type": "server_error",
                                  "param": None, "code": None}}, status=500)
            return
        refused = [k for k in _STRUCTURED if k in body] if type(self).strict else []
        if refused:
            self._send({"error": {"message": f"Unrecognized request argument supplied: "
                                             f"{refused[0]}", "type": "invalid_request_error",
                                  "param": None, "code": None}}, status=400)
            return
        text = type(self).answer(body["messages"][-1]["content"])
        self._send({"id": "j", "object": "chat.completion", "created": 0, "model": "judge",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}]})

    def do_GET(self):  # noqa: N802 - the model list a spec without a model id asks for
        self._send({"object": "list", "data": [{"id": "judge", "object": "model",
                                                "max_model_len": 8192}]})

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(answer, *, strict: bool = False, fail_after: int | None = None):
    """Yields (handler class with `.seen`, base URL "http://127.0.0.1:<port>/v1")."""
    handler = type("Handler", (_Handler,), {"answer": staticmethod(answer), "seen": [],
                                            "strict": strict, "fail_after": fail_after})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield handler, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()
