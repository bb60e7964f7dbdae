"""``behaviour-shift`` (Table 3): personalization when only the least relevant history is left.

For each user of a subset of the test users, every history item gets a relevance score: its
best cosine similarity to any of the user's queries, on the features of an embedding model
given by id or path (mean-pooled last hidden states, as the paper's DeBERTa-v3 features), or,
without one, on TF-IDF vectors (the *lexical fallback*, named so in every output). The least
relevant ``keep_fraction`` of the history is kept; adapters are trained and retrieval runs on it
alone. Methods: non-personalized, RAG k=1, OPPU k=0 and OPPU k=1.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

from oppu.analysis.report import SuiteResult, grouped_bars, markdown_table
from oppu.analysis.runs import pick_users, sub_run, train_and_evaluate, write_sub_dataset
from oppu.data.records import UserData
from oppu.run_config import RunConfig
from oppu.tasks.base import Task

log = logging.getLogger(__name__)

NAME = "behaviour-shift"
TITLE = "User behaviour shift: only the least relevant history"
METHODS = {"non-personalized": "non-personalized", "rag-k1": "RAG k=1", "oppu": "OPPU k=0",
           "rag-k1+oppu": "OPPU k=1"}
LEXICAL = "lexical fallback (TF-IDF cosine)"


def lexical_similarity(queries: Sequence[str], items: Sequence[str]):
    """[item, query] cosine similarity of TF-IDF vectors fitted on both."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    vectors = TfidfVectorizer().fit_transform([*queries, *items])
    return cosine_similarity(vectors[len(queries):], vectors[:len(queries)])


def embedding_similarity(queries: Sequence[str], items: Sequence[str], model_id: str, batch_size: int = 16):
    """[item, query] cosine similarity of mean-pooled last hidden states of ``model_id``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    model = AutoModel.from_pretrained(model_id).eval()
    texts = [*queries, *items]
    vectors = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              max_length=512, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vectors.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    embedded = torch.nn.functional.normalize(torch.cat(vectors), dim=-1)
    return (embedded[len(queries):] @ embedded[:len(queries)].T).numpy()


def least_relevant_history(task: Task, user: UserData, keep_fraction: float,
                           embedding_model: str | None = None) -> UserData:
    """``user`` with only the ``keep_fraction`` least relevant history items (time order kept);
    every query may see all of them."""
    queries = [task.retrieval_query(task.parse_query(q.input)) for q in user.queries]
    items = [task.retrieval_document(item.fields) for item in user.history]
    similarity = (embedding_similarity(queries, items, embedding_model) if embedding_model
                  else lexical_similarity(queries, items))
    relevance = similarity.max(axis=1)
    keep = max(1, round(keep_fraction * len(items)))
    kept = sorted(sorted(range(len(items)), key=lambda i: (relevance[i], i))[:keep])
    history = [user.history[i] for i in kept]
    queries = [dataclasses.replace(q, visible_history=len(history)) for q in user.queries]
    return UserData(user.user_id, "test", history, queries)


def run(cfg: RunConfig, n_users: int = 4, keep_fraction: float = 0.5, embedding_model: str | None = None):
    from oppu.data.dataset import read_dataset

    started = time.perf_counter()
    dataset = read_dataset(cfg.data_uri)
    users = pick_users(dataset.test_users(), n_users)
    relevance = f"embedding model {embedding_model} (cosine)" if embedding_model else LEXICAL
    shifted = [least_relevant_history(dataset.task, u, keep_fraction, embedding_model) for u in users]
    log.info("[%s] %d users keep their %.0f%% least relevant items by %s", NAME, len(users),
             keep_fraction * 100, relevance)
    sub = sub_run(cfg, NAME)
    write_sub_dataset(sub, cfg.task, shifted, {"suite": NAME, "relevance": relevance,
                                               "keep_fraction": keep_fraction})
    metrics = train_and_evaluate(sub, ["oppu", "rag-k1+oppu"], list(METHODS))
    metric = dataset.task.primary_metric
    scores = {METHODS[m]: metrics["methods"][m][metric] for m in METHODS}
    figure = grouped_bars([metric], {label: [value] for label, value in scores.items()},
                          title=f"{cfg.task}: least relevant {keep_fraction:.0%} of history only\n"
                                f"(relevance: {relevance}; {len(users)} users)",
                          xlabel="metric", ylabel=metric)
    rows = [[label, *(metrics["methods"][m][n] for n in dataset.task.metric_names)] for m, label in METHODS.items()]
    section = (f"{len(users)} test users keep the {keep_fraction:.0%} of their history least relevant to "
               f"their queries (relevance: **{relevance}**); adapters are trained and retrieval runs on "
               f"that history only.\n\n" + markdown_table(["method", *dataset.task.metric_names], rows))
    data = {"task": cfg.task, "metric": metric, "relevance": relevance, "keep_fraction": keep_fraction,
            "users": [u.user_id for u in users], "history_kept": {u.user_id: len(u.history) for u in shifted},
            "methods": {METHODS[m]: metrics["methods"][m] for m in METHODS}}
    return SuiteResult(NAME, TITLE, section, data, time.perf_counter() - started), figure
