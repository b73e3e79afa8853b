"""A scripted OpenAI-compatible chat server on 127.0.0.1 for the judge and answer tests.

`reply(body)` decides each answer: a string (the assistant's content) or (status, message) for
an error response. Every request body is kept, so tests can assert what was asked.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

FASTCHAT = Path(__file__).resolve().parents[1] / "fixtures" / "fastchat"


class ScriptedOpenAI:
    def __init__(self) -> None:
        self.reply: Callable[[dict], str | tuple[int, str]] = lambda body: "ok"
        self.delay = 0.0
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                if server.delay:
                    time.sleep(server.delay)
                answer = server.reply(body)
                if isinstance(answer, tuple):
                    status, payload = answer[0], {"error": {"message": answer[1]}}
                else:
                    status = 200
                    payload = {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def user_text(self, body: dict) -> str:
        return "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def openai_server():
    server = ScriptedOpenAI()
    yield server
    server.close()


def _write_answers(path: Path, model: str, questions: list, text: Callable[[object, int], str]):
    """A model-answer JSONL with `text(question, turn)` as each answer."""
    with path.open("w") as f:
        for q in questions:
            turns = [text(q, i) for i in range(len(q.turns))]
            record = {
                "question_id": q.question_id,
                "answer_id": f"{model}-{q.question_id}",
                "model_id": model,
                "choices": [{"index": 0, "turns": turns}],
                "tstamp": 0.0,
            }
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def write_answers():
    return _write_answers


@pytest.fixture
def mt_bench():
    from vicuna_sky.eval.questions import load_questions

    return load_questions(
        FASTCHAT / "mt_bench" / "question.jsonl",
        FASTCHAT / "mt_bench" / "reference_answer_gpt-4.jsonl",
    )
