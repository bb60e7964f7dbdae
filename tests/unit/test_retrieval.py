"""BM25 retrieval over a user's own history."""

from __future__ import annotations

from rank_bm25 import BM25Okapi

from oppu.data.records import HistoryItem
from oppu.retrieval import BM25Retriever
from oppu.tasks import get_task


def movie(item_id, description, tag="comedy"):
    return HistoryItem(id=item_id, fields={"description": description, "tag": tag})


HISTORY = [
    movie("m0", "a quiet family drama in a small town"),
    movie("m1", "astronauts travel through a wormhole", "sci-fi"),
    movie("m2", "robots fight a war on mars", "action"),
    movie("m3", "a chef opens a restaurant in paris"),
    movie("m4", "robots learn to love", "romance"),
    movie("m5", "pirates search for gold", "action"),
]


def test_top_k_ranks_by_bm25_over_rendered_items():
    retriever = BM25Retriever("LaMP-2M", HISTORY)
    query = {"description": "astronauts crossing a wormhole"}
    assert retriever.top_k(query, 1)[0].id == "m1"
    task = get_task("LaMP-2M")
    expected = BM25Okapi([task.render_item(h.fields).split() for h in HISTORY]).get_scores(
        task.retrieval_query(query).split())
    assert retriever.scores(query) == [float(s) for s in expected]
    ranked = sorted(range(len(HISTORY)), key=lambda i: -expected[i])
    assert [item.id for item in retriever.top_k(query, 3)] == [HISTORY[i].id for i in ranked[:3]]


def test_limit_restricts_candidates_and_statistics_to_the_prefix():
    retriever = BM25Retriever("LaMP-2M", HISTORY)
    query = {"description": "robots in love"}
    assert retriever.top_k(query, 1)[0].id == "m4"
    assert retriever.top_k(query, 1, limit=4)[0].id == "m2"
    assert {item.id for item in retriever.top_k(query, 10, limit=4)} == {"m0", "m1", "m2", "m3"}
    prefix = BM25Retriever("LaMP-2M", HISTORY[:4])
    assert retriever.scores(query, limit=4) == prefix.scores(query)


def test_k_beyond_the_history_returns_all_and_empty_history_returns_nothing():
    retriever = BM25Retriever("LaMP-2M", HISTORY)
    assert len(retriever.top_k({"description": "space"}, 10)) == len(HISTORY)
    assert retriever.top_k({"description": "space"}, 3, limit=0) == []
    assert retriever.top_k({"description": "space"}, 0) == []
    assert BM25Retriever("LaMP-2M", []).top_k({"description": "space"}, 3) == []


def test_ties_keep_history_order():
    same = [movie(f"m{i}", "identical text") for i in range(3)]
    retriever = BM25Retriever("LaMP-2M", same)
    assert [item.id for item in retriever.top_k({"description": "identical"}, 3)] == ["m0", "m1", "m2"]


def test_citation_retrieval_uses_the_query_title():
    papers = [HistoryItem(id=str(i), fields={"title": title, "abstract": "x"})
              for i, title in enumerate(["graph neural networks", "protein folding with transformers"])]
    retriever = BM25Retriever(get_task("LaMP-1"), papers)
    query = {"title": "transformers for protein structure", "option1": "graph", "option2": "neural"}
    assert retriever.top_k(query, 1)[0].id == "1"
