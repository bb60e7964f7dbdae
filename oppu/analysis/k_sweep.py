"""``k-sweep`` (Figure 4): RAG and RAG+OPPU with k = 0, 1, 2, 4, 8 retrieved history items.

k=0 is the non-personalized base (RAG) and plain OPPU (RAG+OPPU). A subset of the test users,
spread over activity levels; their adapters go to the run's own store (new variants
``rag-k<N>+oppu`` beside the served ones; existing adapters of the same data and config are
reused, never replaced).
"""

from __future__ import annotations

import time

from oppu.analysis.report import SuiteResult, lines, markdown_table
from oppu.analysis.runs import pick_users, sub_run, train_and_evaluate, write_sub_dataset
from oppu.run_config import RunConfig

NAME = "k-sweep"
TITLE = "Number of retrieved items k"


def methods_for(ks: list[int]) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """(adapter variants to train, methods to evaluate, {curve: {k: method}})."""
    rag = {k: ("non-personalized" if k == 0 else f"rag-k{k}") for k in ks}
    rag_oppu = {k: ("oppu" if k == 0 else f"rag-k{k}+oppu") for k in ks}
    variants = [rag_oppu[k] for k in ks]
    methods = [*rag.values(), *rag_oppu.values()]
    return variants, methods, {"RAG": rag, "RAG+OPPU": rag_oppu}


def run(cfg: RunConfig, n_users: int = 4, ks: tuple[int, ...] = (0, 1, 2, 4, 8)):
    from oppu.data.dataset import read_dataset

    started = time.perf_counter()
    dataset = read_dataset(cfg.data_uri)
    users = pick_users(dataset.test_users(), n_users)
    sub = sub_run(cfg, NAME, store=cfg.store_uri)
    write_sub_dataset(sub, cfg.task, users, {"suite": NAME})
    variants, methods, curves = methods_for(list(ks))
    metrics = train_and_evaluate(sub, variants, methods)
    metric = dataset.task.primary_metric
    series = {curve: [metrics["methods"][by_k[k]][metric] for k in ks] for curve, by_k in curves.items()}
    figure = lines(ks, series, title=f"{cfg.task}: {metric} against retrieved items ({len(users)} users)",
                   xlabel="retrieved history items k", ylabel=metric)
    rows = [[k, *(series[c][i] for c in curves)] for i, k in enumerate(ks)]
    section = (f"{len(users)} test users ({', '.join(u.user_id for u in users)}); {metric} per k.\n\n"
               + markdown_table(["k", *curves], rows))
    data = {"task": cfg.task, "metric": metric, "users": [u.user_id for u in users], "k": list(ks),
            "series": series, "methods": metrics["methods"]}
    return SuiteResult(NAME, TITLE, section, data, time.perf_counter() - started), figure
