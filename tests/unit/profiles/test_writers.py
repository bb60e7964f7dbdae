"""Profile writers: the statistical writer's statements, the LLM backends' prompts and plumbing."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from oppu.data.records import HistoryItem, Query, UserData
from oppu.errors import ConfigError
from oppu.profiles import (
    STATISTICAL_MARK,
    OpenAIProfileWriter,
    StatisticalProfileWriter,
    make_writer,
)
from oppu.profiles.writers import profile_items
from oppu.tasks import get_task


def _user(user_id: str, items: list[dict[str, str]]) -> UserData:
    history = [HistoryItem(f"{user_id}-{i}", fields) for i, fields in enumerate(items)]
    return UserData(user_id, "test", history, [Query(f"{user_id}-q", "x", "y", len(history))])


def test_statistical_profile_names_most_popular_tags_and_itself():
    items = ([{"description": "a robot in space", "tag": "sci-fi"}] * 5
             + [{"description": "two lovers in paris", "tag": "romance"}] * 2
             + [{"description": "a ghost story", "tag": "classic"}])
    text = StatisticalProfileWriter().write(get_task("LaMP-2M"), [_user("u1", items)])["u1"]
    assert text.startswith(STATISTICAL_MARK)
    assert "Most popular tag: sci-fi (5 of 8), romance (2 of 8), classic (1 of 8)" in text
    assert "robot (5)" in text  # frequent history words come from the item text, not field names
    assert "description" not in text


def test_statistical_profile_of_ratings_states_positive_and_negative_scores():
    scores = ["5", "5", "4", "1", "2", "2", "3"]
    items = [{"text": f"review {i}", "score": s} for i, s in enumerate(scores)]
    text = StatisticalProfileWriter().write(get_task("LaMP-3"), [_user("r", items)])["r"]
    assert "most common positive score: 5 (2 of 7)" in text.lower()
    assert "most common negative score: 2 (2 of 7)" in text
    assert "mean score 3.1" in text


def test_statistical_profile_of_titles_and_of_text_only_history():
    titles = [{"abstract": "we study graphs", "title": "Graph neural networks for graphs"},
              {"abstract": "we study proteins", "title": "Neural protein folding"}]
    text = StatisticalProfileWriter().write(get_task("LaMP-5"), [_user("s", titles)])["s"]
    assert "Frequent title words: neural (2)" in text
    tweets = [{"text": "coffee coffee morning"}, {"text": "morning run"}]
    text = StatisticalProfileWriter().write(get_task("LaMP-7"), [_user("t", tweets)])["t"]
    assert text.startswith(STATISTICAL_MARK) and "coffee (2), morning (2)" in text


def test_profile_items_are_a_seeded_time_ordered_sample():
    user = _user("u", [{"description": f"d{i}", "tag": "comedy"} for i in range(30)])
    picked = profile_items(user, 10, seed=1)
    assert len(picked) == 10 and picked == profile_items(user, 10, seed=1)
    positions = [int(p["description"][1:]) for p in picked]
    assert positions == sorted(positions)
    assert profile_items(user, 10, seed=2) != picked


def test_make_writer_refuses_missing_settings():
    with pytest.raises(ConfigError, match="needs a model"):
        make_writer("hf")
    with pytest.raises(ConfigError, match="base_url"):
        make_writer("openai", model="m")
    with pytest.raises(ConfigError, match="unknown profile writer"):
        make_writer("gpt")


class _ChatHandler(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatHandler.requests.append(body)
        prompt = body["messages"][0]["content"]
        answer = {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": f" profile of {len(prompt)} chars "}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_writer_sends_the_appendix_i_prompt_to_the_endpoint():
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        task = get_task("LaMP-2M")
        user = _user("u7", [{"description": "a robot in space", "tag": "sci-fi"}])
        writer = OpenAIProfileWriter(f"http://127.0.0.1:{server.server_port}/v1", "my-model")
        profiles = writer.write(task, [user])
    finally:
        server.shutdown()
    prompt = task.profile_prompt([user.history[0].fields])
    assert _ChatHandler.requests[-1]["model"] == "my-model"
    assert _ChatHandler.requests[-1]["messages"][0]["content"] == prompt
    assert profiles == {"u7": f"profile of {len(prompt)} chars"}
