"""BM25 over a user's own history, as the OPPU authors retrieve (rank_bm25's ``BM25Okapi``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from oppu.data.records import HistoryItem
from oppu.tasks import Task, get_task


class BM25Retriever:
    """Ranks a user's history items against a query with BM25 over whitespace tokens.

    Documents are the task's renderings of the items; the query text is the task's retrieval
    query. ``limit`` restricts both the candidates and the BM25 statistics to ``items[:limit]``:
    a history item used for training retrieves only from the items before it.
    """

    def __init__(self, task: Task | str, items: Sequence[HistoryItem]):
        self.task = get_task(task)
        self.items = list(items)
        self._tokenized_documents = [self.task.retrieval_document(item.fields).split()
                                     for item in self.items]
        # The full-history index and the latest prefix index are kept; training asks for a new
        # prefix per item, and keeping every prefix would hold O(n^2) term counts.
        self._indexes: dict[int, object] = {}

    def _index(self, size: int):
        from rank_bm25 import BM25Okapi

        if size not in self._indexes:
            for cached in [s for s in self._indexes if s != len(self.items)]:
                del self._indexes[cached]
            self._indexes[size] = BM25Okapi(self._tokenized_documents[:size])
        return self._indexes[size]

    def scores(self, query: Mapping[str, str], limit: int | None = None) -> list[float]:
        """The BM25 score of each of ``items[:limit]`` for ``query`` (query fields, as parse_query gives)."""
        size = len(self.items) if limit is None else max(0, min(limit, len(self.items)))
        if size == 0:
            return []
        tokenized_query = self.task.retrieval_query(query).split()
        return [float(score) for score in self._index(size).get_scores(tokenized_query)]

    def top_k(self, query: Mapping[str, str], k: int, limit: int | None = None) -> list[HistoryItem]:
        """The ``k`` best items of ``items[:limit]``, highest score first, ties in history order."""
        if k <= 0:
            return []
        scores = self.scores(query, limit)
        ranked = sorted(range(len(scores)), key=lambda position: (-scores[position], position))
        return [self.items[position] for position in ranked[:k]]
