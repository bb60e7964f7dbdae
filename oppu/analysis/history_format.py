"""``history-format`` (Table 4): what a history item teaches the personal adapter.

For tasks whose history items have the task's input/output shape (LaMP-2N/2M/3/4/5), the
adapter learns from the item's input only (its text by next-token prediction), its output only
(the label or title by next-token prediction), or both (the supervised prompt -> output sample
the main pipeline trains). Each format's adapters go to their own sub run's store under variant
``oppu`` and are evaluated by the evaluation job as OPPU.
"""

from __future__ import annotations

import logging
import time

from oppu.analysis.personal_inprocess import train_and_publish
from oppu.analysis.report import SuiteResult, grouped_bars, markdown_table
from oppu.analysis.runs import pick_users, sub_run, train_and_evaluate, write_sub_dataset
from oppu.data.records import UserData
from oppu.errors import ConfigError
from oppu.run_config import RunConfig
from oppu.tasks.base import Task, TrainingSample

log = logging.getLogger(__name__)

NAME = "history-format"
TITLE = "History format: input only, output only, both"
FORMATS = ("input only", "output only", "input + output")


def format_samples(task: Task, user: UserData, history_format: str) -> list[TrainingSample]:
    """The training samples of ``user``'s history in ``history_format``."""
    from oppu.training.samples import personal_samples

    if history_format == "input + output":
        return personal_samples(task, user)
    samples = []
    for item in user.history:
        if history_format == "input only":
            text = " ".join(item.fields[name] for name in task.query_fields)
        else:
            text = item.fields[task.output_field]
        samples.append(TrainingSample(prompt="", target=text))
    return samples


def run(cfg: RunConfig, n_users: int = 4):
    from oppu.data.dataset import read_dataset

    started = time.perf_counter()
    dataset = read_dataset(cfg.data_uri)
    task = dataset.task
    if task.trains_on_next_token or task.output_field is None:
        raise ConfigError(f"history-format needs history items with the task's input/output shape; "
                          f"{task.name}'s items are text only (use LaMP-2N, 2M, 3, 4 or 5)")
    users = pick_users(dataset.test_users(), n_users)
    metric = task.primary_metric
    results = {}
    for history_format in FORMATS:
        both = history_format == "input + output"
        slug = history_format.replace(" + ", "-and-").replace(" ", "-")
        sub = sub_run(cfg, NAME, slug, store=cfg.store_uri if both else None, link_bases=("plain",))
        write_sub_dataset(sub, cfg.task, users, {"suite": NAME, "history_format": history_format})
        if not both:  # the main pipeline's own samples: its job trains (or reuses) them below
            train_and_publish(sub, users, lambda u, f=history_format: format_samples(task, u, f), "oppu",
                              {"history_format": history_format}, log=log.info)
        metrics = train_and_evaluate(sub, ["oppu"] if both else [], ["non-personalized", "oppu"])
        results[history_format] = metrics["methods"]
    baseline = results["input + output"]["non-personalized"][metric]
    figure = grouped_bars(list(FORMATS), {"non-personalized": [baseline] * len(FORMATS),
                                          "OPPU": [results[f]["oppu"][metric] for f in FORMATS]},
                          title=f"{task.name}: history format of the personal adapter ({len(users)} users)",
                          xlabel="history format the adapter learns from", ylabel=metric)
    rows = [[f, *(results[f]["oppu"][n] for n in task.metric_names)] for f in FORMATS]
    section = (f"{len(users)} test users; OPPU trained on each history format (non-personalized "
               f"{metric}: {baseline:.4f}).\n\n" + markdown_table(["format", *task.metric_names], rows))
    data = {"task": task.name, "metric": metric, "users": [u.user_id for u in users],
            "non_personalized": results["input + output"]["non-personalized"],
            "oppu": {f: results[f]["oppu"] for f in FORMATS}}
    return SuiteResult(NAME, TITLE, section, data, time.perf_counter() - started), figure
