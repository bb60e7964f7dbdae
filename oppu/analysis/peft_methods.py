"""``peft-methods`` (Figure 6): personal adapters as LoRA, (IA)³ and prompt tuning.

Each method trains the ``oppu`` variant of a subset of test users into its own sub run's store
(LoRA, the run's own method, reuses the run's store) with ``users.peft.method`` set, and is
evaluated against the non-personalized base. The trainable share is the adapter's parameter
count over the base model's.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from oppu.analysis.report import SuiteResult, grouped_bars, markdown_table
from oppu.analysis.runs import pick_users, sub_run, train_and_evaluate, with_users, write_sub_dataset
from oppu.run_config import RunConfig

log = logging.getLogger(__name__)

NAME = "peft-methods"
TITLE = "PEFT methods for the personal adapters"
LABELS = {"lora": "LoRA", "ia3": "(IA)³", "prompt_tuning": "prompt tuning"}


def trainable_share(cfg: RunConfig, user: str) -> tuple[int, int]:
    """(adapter parameters, base model parameters) of ``user``'s newest ``oppu`` adapter."""
    from safetensors.torch import load as load_safetensors

    from oppu.models import base_fingerprint, load_model
    from oppu.store import AdapterKey, AdapterStore

    base_uri = cfg.base_uri("plain")
    _, files = AdapterStore(cfg.store_uri).read_files(AdapterKey(cfg.task, base_fingerprint(base_uri),
                                                                 "oppu", user))
    adapter = load_safetensors(files["adapter_model.safetensors"])
    model, _ = load_model(base_uri)
    return sum(t.numel() for t in adapter.values()), sum(p.numel() for p in model.parameters())


def run(cfg: RunConfig, n_users: int = 4, methods: tuple[str, ...] = ("lora", "ia3", "prompt_tuning")):
    from oppu.data.dataset import read_dataset

    started = time.perf_counter()
    dataset = read_dataset(cfg.data_uri)
    users = pick_users(dataset.test_users(), n_users)
    metric = dataset.task.primary_metric
    results = {}
    for method in methods:
        peft = dataclasses.replace(cfg.users.peft, method=method)
        reuse_store = method == cfg.users.peft.method
        sub = with_users(sub_run(cfg, NAME, method, store=cfg.store_uri if reuse_store else None,
                                 link_bases=("plain",)), peft=peft)
        write_sub_dataset(sub, cfg.task, users, {"suite": NAME, "peft_method": method})
        log.info(f"[{NAME}] {method}: {len(users)} users")
        metrics = train_and_evaluate(sub, ["oppu"], ["non-personalized", "oppu"])
        adapter_params, base_params = trainable_share(sub, users[0].user_id)
        results[method] = {"oppu": metrics["methods"]["oppu"], "non-personalized": metrics["methods"]["non-personalized"],
                           "errors": metrics.get("errors", {}), "adapter_parameters": adapter_params,
                           "base_parameters": base_params, "trainable_percent": 100 * adapter_params / base_params}
    baseline = next(iter(results.values()))["non-personalized"][metric]
    groups = [LABELS[m] for m in methods]
    figure = grouped_bars(groups, {"non-personalized": [baseline] * len(methods),
                                   "OPPU": [results[m]["oppu"][metric] for m in methods]},
                          title=f"{cfg.task}: PEFT method of the personal adapter ({len(users)} users)",
                          xlabel="PEFT method (trainable % of the base in the label)", ylabel=metric)
    axes = figure.axes[0]
    axes.set_xticks(axes.get_xticks(), [f"{LABELS[m]}\n{results[m]['trainable_percent']:.3f}% trainable"
                                        for m in methods])
    rows = [[LABELS[m], results[m]["oppu"][metric], baseline, results[m]["adapter_parameters"],
             f"{results[m]['trainable_percent']:.3f}%", sum(results[m]["errors"].values())] for m in methods]
    section = (f"{len(users)} test users; OPPU with each PEFT method against the non-personalized base.\n\n"
               + markdown_table(["method", f"OPPU {metric}", f"non-personalized {metric}",
                                 "adapter parameters", "trainable share", "failed queries"], rows))
    data = {"task": cfg.task, "metric": metric, "users": [u.user_id for u in users], "results": results}
    return SuiteResult(NAME, TITLE, section, data, time.perf_counter() - started), figure
