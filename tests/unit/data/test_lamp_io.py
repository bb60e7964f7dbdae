from __future__ import annotations

import json
from datetime import datetime

import pytest

from oppu.data.lamp_io import read_lamp, read_oppu_format
from oppu.data.records import parse_date
from oppu.errors import DataError
from oppu.tasks import get_task
from tests.unit.data.fixtures.lamp_files import (
    M1,
    M2,
    citation_questions,
    item,
    movie_questions,
    question,
    review_questions,
    write_lamp,
    write_movies,
)

MOVIES = get_task("LaMP-2M")


def test_groups_movie_queries_by_user_id_and_orders_history_by_date(tmp_path):
    users = read_lamp(MOVIES, *write_movies(tmp_path))

    assert [u.user_id for u in users] == ["u1", "u2", "u3"]
    u1 = users[0]
    assert [h.id for h in u1.history] == ["m2", "m1", "m3"]
    assert u1.history[0].fields == {"description": "car chases", "tag": "action"}
    assert u1.history[0].date == "2020-01-15"
    assert [(q.id, q.gold, q.visible_history) for q in u1.queries] == [("101", "comedy", 2),
                                                                        ("102", "sci-fi", 3)]
    assert {u.role for u in users} == {"base"}
    assert [h.id for h in users[2].history] == ["m6", "m5", "m7"]


def test_visible_history_counts_leading_items_its_profile_reaches(tmp_path):
    # q2 sees only the newest item, but that item is last: it may see everything before it too.
    questions = [question("LaMP-2M", "q1", {"description": "x"}, [M1, M2], user_id="u"),
                 question("LaMP-2M", "q2", {"description": "y"}, [item("m0", "2019-01-01",
                                                                        description="d", tag="classic")],
                          user_id="u")]
    users = read_lamp(MOVIES, *write_lamp(tmp_path, questions, {"q1": "comedy", "q2": "classic"},
                                          "LaMP_2M"))
    assert [h.id for h in users[0].history] == ["m0", "m2", "m1"]
    assert [q.visible_history for q in users[0].queries] == [3, 1]


def test_lamp3_without_user_ids_makes_one_user_per_question_and_normalises_numbers(tmp_path):
    questions, golds = review_questions()
    users = read_lamp(get_task("LaMP-3"), *write_lamp(tmp_path, questions, golds, "LaMP_3"))

    assert [u.user_id for u in users] == ["7", "8"]
    assert [h.id for h in users[0].history] == ["1", "2"]
    assert [h.fields["score"] for h in users[0].history] == ["5", "3"]
    assert users[0].history[0].date is None
    assert users[0].queries[0].input.endswith("review: great kettle")
    assert [u.queries[0].gold for u in users] == ["5", "1"]


def test_lamp1_undated_history_keeps_first_seen_order(tmp_path):
    questions, golds = citation_questions()
    users = read_lamp(get_task("LaMP-1"), *write_lamp(tmp_path, questions, golds, "LaMP_1"))

    assert len(users) == 1 and users[0].user_id == "author-7"
    assert [h.id for h in users[0].history] == ["p9", "p1"]
    assert [q.visible_history for q in users[0].queries] == [1, 2]
    assert users[0].history[1].fields == {"title": "A paper", "abstract": "aa"}


def test_official_lamp2_task_name_is_accepted_for_movies(tmp_path):
    questions, golds = movie_questions()
    assert len(read_lamp(MOVIES, *write_lamp(tmp_path, questions, golds, "LaMP_2"))) == 3


@pytest.mark.parametrize(("text", "expected"), [
    ("2016-05-22", datetime(2016, 5, 22)),
    ("2005", datetime(2005, 1, 1)),
    ("2005-07", datetime(2005, 7, 1)),
    ("2016-05-22T10:00:00+02:00", datetime(2016, 5, 22, 8)),
    ("Tue Apr 07 02:13:08 PDT 2009", datetime(2009, 4, 7, 2, 13, 8)),
    ("May 3, 2011", datetime(2011, 5, 3)),
])
def test_parse_date_reads_lamp_date_formats(text, expected):
    assert parse_date(text) == expected


def test_parse_date_rejects_text_that_is_no_date():
    with pytest.raises(ValueError, match="not a date"):
        parse_date("soon-ish")


def _error(tmp_path, questions, golds, lamp_name="LaMP_2M") -> DataError:
    paths = write_lamp(tmp_path, questions, golds, lamp_name)
    with pytest.raises(DataError) as caught:
        read_lamp(MOVIES, *paths)
    return caught.value


def test_malformed_json_names_file_and_position(tmp_path):
    questions_path, outputs_path = write_movies(tmp_path)
    questions_path.write_text('[{"id": "1", "input": }]')
    with pytest.raises(DataError, match=r"malformed JSON at line 1 column 23") as caught:
        read_lamp(MOVIES, questions_path, outputs_path)
    assert caught.value.file == str(questions_path)


@pytest.mark.parametrize(("break_it", "record", "field", "message"), [
    (lambda q: q[0]["profile"][1].pop("tag"), "101", "profile[1].tag", "missing field 'tag'"),
    (lambda q: q[0].update(input=42), "101", "input", "'input' must be a string"),
    (lambda q: q[0].update(input="tell me a tag"), "101", "input", "lacks the marker"),
    (lambda q: q[0]["profile"][0].update(description=["x"]), "101", "profile[0].description",
     "must be a string"),
    (lambda q: q[0]["profile"][0].update(date="someday"), "101", "profile[0].date", "not a date"),
    (lambda q: q[0].update(profile={"m1": {}}), "101", "profile", "must be a list"),
    (lambda q: q[1].update(id="101"), "101", "id", "duplicate question id"),
    (lambda q: q[0].update(user_id="../etc"), "101", "user_id", "invalid user id"),
    (lambda q: q[0]["profile"][0].update(tag="horror"), "102", "profile", "different content"),
])
def test_bad_question_record_names_file_record_and_field(tmp_path, break_it, record, field, message):
    questions, golds = movie_questions()
    break_it(questions)
    error = _error(tmp_path, questions, golds)
    assert (error.file, error.record, error.field) == (str(tmp_path / "questions.json"), record, field)
    assert message in str(error)


def test_question_without_gold_is_an_error(tmp_path):
    questions, golds = movie_questions()
    del golds["201"]
    error = _error(tmp_path, questions, golds)
    assert (error.record, error.field, error.user) == ("201", "output", "u2")
    assert "no gold output" in str(error)


def test_gold_without_question_is_an_error(tmp_path):
    questions, golds = movie_questions()
    error = _error(tmp_path, questions, {**golds, "999": "comedy"})
    assert (error.file, error.record) == (str(tmp_path / "outputs.json"), "999")


def test_outputs_of_another_task_are_refused(tmp_path):
    questions, golds = movie_questions()
    error = _error(tmp_path, questions, golds, lamp_name="LaMP_3")
    assert error.field == "task" and "'LaMP_3', not LaMP-2M" in str(error)


def test_collect_errors_drops_only_the_users_with_bad_records(tmp_path):
    questions, golds = movie_questions()
    questions[2]["profile"][2].pop("description")  # u1's second query
    golds["301"] = 3  # u3's gold, mistyped: a number for a tag is accepted as text "3"
    golds["201"] = None  # u2's gold is no text
    users, errors = read_lamp(MOVIES, *write_lamp(tmp_path, questions, golds, "LaMP_2M"),
                              collect_errors=True)

    assert [u.user_id for u in users] == ["u3"]
    assert {e.user for e in errors if e.user} == {"u1", "u2"}
    assert any(e.field == "profile[2].description" and e.record == "102" for e in errors)
    assert any(e.file.endswith("outputs.json") and e.record == "201" and e.field == "output"
               for e in errors)


def test_identical_duplicate_profile_items_are_merged(tmp_path):
    questions = [question("LaMP-2M", "q1", {"description": "x"}, [M1, dict(M1)], user_id="u")]
    users = read_lamp(MOVIES, *write_lamp(tmp_path, questions, {"q1": "comedy"}, "LaMP_2M"))
    assert [h.id for h in users[0].history] == ["m1"]


def _oppu_users() -> list[dict]:
    movie_input = MOVIES.lamp_input({"description": "robots"})
    return [
        {"user_id": 11, "profile": [dict(M2), dict(M1)],
         "query": [{"id": "q11", "input": movie_input, "gold": "sci-fi"}]},
        {"user_id": "12", "profile": [dict(M1)],
         "query": [{"id": "q12", "input": movie_input, "gold": "comedy"}]},
    ]


def test_read_oppu_format_keeps_profile_order_and_shows_whole_history(tmp_path):
    path = tmp_path / "user_top_100_history.json"
    path.write_text(json.dumps(_oppu_users()))
    users = read_oppu_format(MOVIES, path)

    assert [u.user_id for u in users] == ["11", "12"]
    assert [h.id for h in users[0].history] == ["m2", "m1"]
    assert [(q.id, q.gold, q.visible_history) for q in users[0].queries] == [("q11", "sci-fi", 2)]


def test_read_oppu_format_reports_missing_gold_and_drops_that_user(tmp_path):
    entries = _oppu_users()
    del entries[1]["query"][0]["gold"]
    path = tmp_path / "users.json"
    path.write_text(json.dumps(entries))

    with pytest.raises(DataError, match="missing field 'gold'") as caught:
        read_oppu_format(MOVIES, path)
    assert (caught.value.record, caught.value.field, caught.value.user) == ("q12", "gold", "12")

    users, errors = read_oppu_format(MOVIES, path, collect_errors=True)
    assert [u.user_id for u in users] == ["11"] and len(errors) == 1
