"""Training samples from prepared users: the personal path (history) and the base path (queries)."""

from __future__ import annotations

import random

from oppu.data.records import UserData
from oppu.errors import DataError
from oppu.retrieval import BM25Retriever
from oppu.tasks.base import Task, TrainingSample


def personal_samples(task: Task, user: UserData, k: int = 0,
                     profile: str | None = None) -> list[TrainingSample]:
    """One sample per history item of ``user``; with ``k`` > 0 the item at position i is prompted
    with its top-k items among ``history[:i]`` (never later ones), as the OPPU authors train; with
    a ``profile`` (PAG) the user's textual profile leads every prompt."""
    retriever = BM25Retriever(task, user.history) if k > 0 else None
    samples = []
    for position, item in enumerate(user.history):
        retrieved = []
        if retriever is not None and position > 0:
            query = task.item_query(item.fields)
            if query is not None:
                retrieved = [h.fields for h in retriever.top_k(query, k, limit=position)]
        try:
            samples.append(task.history_sample(item.fields, retrieved=retrieved, profile=profile))
        except DataError as exc:
            raise DataError(str(exc), user=user.user_id, record=item.id, field=exc.field) from exc
    return samples


def base_samples(task: Task, users: list[UserData], k: int, include_history: bool,
                 seed: int, max_samples: int | None = None,
                 profiles: dict[str, str] | None = None) -> list[TrainingSample]:
    """Samples that adapt the base to the task: the base users' queries with their golds (top-k of
    each user's own earlier history in the prompt when ``k`` > 0), plus their history items; with
    ``profiles`` ({user_id: text}, the profile flavour) each user's profile leads their prompts."""
    samples: list[TrainingSample] = []
    for user in users:
        retriever = BM25Retriever(task, user.history) if k > 0 else None
        profile = profiles[user.user_id] if profiles is not None else None
        for query in user.queries:
            if query.gold is None:
                continue
            fields = task.parse_query(query.input)
            retrieved = ([h.fields for h in retriever.top_k(fields, k, limit=query.visible_history)]
                         if retriever is not None else [])
            samples.append(task.query_sample(fields, query.gold, retrieved=retrieved, profile=profile))
        if include_history:
            samples.extend(personal_samples(task, user, k, profile))
    rng = random.Random(seed)
    rng.shuffle(samples)
    return samples[:max_samples] if max_samples else samples


def pretraining_corpus(task: Task, users: list[UserData]) -> list[str]:
    """Plain text of the base users' behaviour (history items and answered queries): what the tiny
    default model is pretrained on, standing in for an LLM's pretraining data."""
    texts = []
    for user in users:
        texts.extend(task.render_item(item.fields).strip() for item in user.history)
        for query in user.queries:
            if query.gold is not None:
                sample = task.query_sample(task.parse_query(query.input), query.gold)
                texts.append(sample.prompt + sample.target)
    return texts
