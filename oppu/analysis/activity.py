"""``activity`` (Figure 3): users at different activity levels (history lengths).

Users of the whole data set are ranked by history length and cut into ``n_buckets`` equal-width
rank buckets; the same number of users is drawn from each (spread within the bucket). Those
users become the test users of a sub run whose base is trained *without them* (every other user
adapts the base, and, for the tiny default unless ``fresh_pretrained`` is off, pretrains it), so
no bucket was seen by the base.
Every method then runs per bucket.

With ``fresh_pretrained`` off (``--activity-reuse-pretrained``) the sub run starts from the main
run's tiny pretrained model, which read the main run's base users' queries *with their golds*;
bucket users that were base users of the main run then have their test answers in its
pretraining text. The suite checks every held-out test query against every text its models were
trained on before evaluation (``oppu.analysis.leakage``) and reports the leaks in its JSON
(``leak_check``) and report section.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from oppu.analysis.leakage import audit_run
from oppu.analysis.report import SuiteResult, lines, markdown_table
from oppu.analysis.runs import pick_users, scores_by_group, sub_run, train_and_evaluate, write_sub_dataset
from oppu.data.records import UserData
from oppu.run_config import RunConfig

log = logging.getLogger(__name__)

NAME = "activity"
TITLE = "Users at different activity levels"
METHODS = ("non-personalized", "rag-k1", "oppu", "rag-k1+oppu")
FLAVOURS = ("plain", "rag")
VARIANTS = ("oppu", "rag-k1+oppu")


def bucket_users(users: list[UserData], n_buckets: int, per_bucket: int) -> dict[str, list[UserData]]:
    """{bucket label: users}: rank buckets by history length, least active first, labelled with
    their history-length range."""
    ordered = sorted(users, key=lambda u: (len(u.history), u.user_id))
    size = len(ordered) // n_buckets
    buckets = {}
    for b in range(n_buckets):
        members = ordered[b * size:(b + 1) * size if b < n_buckets - 1 else len(ordered)]
        chosen = sorted(pick_users(members, per_bucket), key=lambda u: len(u.history))
        label = f"{len(chosen[0].history)}-{len(chosen[-1].history)} items"
        buckets[label] = chosen
    return buckets


def run(cfg: RunConfig, n_buckets: int = 3, per_bucket: int = 3, base_max_samples: int | None = 600,
        fresh_pretrained: bool = True):
    from oppu.data.dataset import read_dataset
    from oppu.pipeline import run_stages

    started = time.perf_counter()
    dataset = read_dataset(cfg.data_uri)
    buckets = bucket_users([u for u in dataset.users if u.queries], n_buckets, per_bucket)
    held_out = {u.user_id: label for label, members in buckets.items() for u in members}
    users = [dataclasses.replace(u, role="test" if u.user_id in held_out else "base") for u in dataset.users]
    log.info(f"[{NAME}] buckets: " + "; ".join(f"{label}: {', '.join(u.user_id for u in members)}"
                                                for label, members in buckets.items()))
    sub = sub_config(cfg, base_max_samples, fresh_pretrained)
    base = sub.base
    write_sub_dataset(sub, cfg.task, users, {"suite": NAME, "buckets": {k: [u.user_id for u in v]
                                                                       for k, v in buckets.items()}})
    run_stages(sub, ["base"])
    train_and_evaluate(sub, list(VARIANTS), METHODS)
    leak_check = audit_run(sub, FLAVOURS, VARIANTS, pretraining_candidates=[cfg.data_uri])
    log.info("[%s] leak check: %d of %d held-out test queries have their gold in a text their models were "
             "trained on %s", NAME, leak_check["leaked_queries"], leak_check["test_queries"],
             leak_check["leaked_queries_by_source"])
    metric = dataset.task.primary_metric
    scores = scores_by_group(sub, METHODS, held_out)
    labels = list(buckets)
    series = {m: [scores[label][m][metric] for label in labels] for m in METHODS}
    # The gain is an improvement whichever way the metric points (MAE: lower is better).
    direction = 1.0 if dataset.task.higher_is_better[metric] else -1.0
    gain = [direction * (series["oppu"][i] - series["non-personalized"][i]) for i in range(len(labels))]
    figure = lines(range(len(labels)), series, title=f"{cfg.task}: {metric} by activity level "
                   f"({per_bucket} users per bucket, held out of the base)",
                   xlabel="history length bucket", ylabel=metric)
    figure.axes[0].set_xticks(range(len(labels)), labels)
    rows = [[label, *(series[m][i] for m in METHODS), gain[i]] for i, label in enumerate(labels)]
    pretrained = ("a tiny model pretrained without them too" if fresh_pretrained and cfg.model == "tiny"
                  else f"the run's pretrained model {cfg.pretrained_uri}")
    section = (f"{n_buckets} buckets x {per_bucket} users by history length, held out of a base trained "
               f"without them (base samples capped at {base.max_samples}) from {pretrained}.\n\n"
               + markdown_table(["bucket", *METHODS, "OPPU gain"], rows)
               + f"\n\nOPPU gain: OPPU's improvement over non-personalized in {metric}"
               + ("" if direction > 0 else " (lower is better, so the gain is non-personalized minus OPPU)") + "."
               + f"\n\nLeak check: {leak_check['leaked_queries']} of {leak_check['test_queries']} held-out test "
               "queries have their gold in a text their models were trained on before evaluation (pretraining "
               "corpus, base samples, personal samples)"
               + (f": {leak_check['leaked_queries_by_source']}." if leak_check["leaked_queries"] else "."))
    data = {"task": cfg.task, "metric": metric, "pretrained": pretrained, "buckets": {k: [u.user_id for u in v] for k, v in buckets.items()},
            "history_lengths": {u.user_id: len(u.history) for v in buckets.values() for u in v},
            "series": series, "oppu_gain": dict(zip(labels, gain, strict=True)), "scores": scores,
            "leak_check": leak_check}
    return SuiteResult(NAME, TITLE, section, data, time.perf_counter() - started), figure


def sub_config(cfg: RunConfig, base_max_samples: int | None = 600, fresh_pretrained: bool = True) -> RunConfig:
    """The activity suite's sub run of ``cfg``: its own bases (plain and RAG, samples capped at
    ``base_max_samples``) and, unless ``fresh_pretrained`` is off, its own tiny pretrained model."""
    base = dataclasses.replace(cfg.base, flavours=list(FLAVOURS), max_samples=base_max_samples or cfg.base.max_samples)
    return sub_run(cfg, NAME, link_bases=(), link_pretrained=not fresh_pretrained, base=base)
