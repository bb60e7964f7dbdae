"""Batch inference over the test users' queries for every method, then LaMP scoring.

A Ray Data actor pool answers users in batches: each ``QueryAnswerer`` loads the task-adapted
bases once, builds every method's prompts through the task registry, and decodes greedily (or,
with ``eval.decoding: labels``, scores each of the task's labels and takes the one its metric
rewards most: ``oppu.tasks.decisions``): a method without an adapter answers all the batch's
users' queries at once, one with an adapter answers user by user with that user's adapter from
the store plugged in. The driver scores
each method with the task's LaMP metrics and writes LaMP-format predictions, ``metrics.json`` and
a Markdown table.

A query that could not be answered (a missing or corrupt adapter, an actor that could not start)
scores as an empty answer, so it is never silent: ``metrics.json`` lists the failed queries by
method (``failed_queries``: count, ids, the first error) and, once everything is written, more
failed queries than ``eval.max_failed_queries`` (default 0) fail the stage (``StageFailed``).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile

from oppu import fsutil, logs
from oppu.errors import ConfigError, StageFailed, name_list
from oppu.evaluation.methods import Method, resolve_method
from oppu.run_config import RunConfig

ANSWER_FIELDS = ("user_id", "method", "query_id", "prediction", "raw", "error")

log = logging.getLogger(__name__)


class QueryAnswerer:
    """Ray Data actor: answers every method's prompts for the users of each batch."""

    def __init__(self, cfg: RunConfig, methods: list[str], random_items: dict[str, dict]):
        import torch

        from oppu.models import base_fingerprint, load_model
        from oppu.models.prompting import resolve_prompt_format
        from oppu.store import AdapterStore
        from oppu.tasks import get_task

        self.cfg = cfg
        self.task = get_task(self.cfg.task)
        self.methods = [resolve_method(m) for m in methods]
        self.random_items = random_items
        device = "cuda" if self.cfg.eval.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.bases = {}
        for flavour in sorted({m.base_flavour(self.cfg) for m in self.methods}):
            uri = self.cfg.base_uri(flavour)
            model, tokenizer = load_model(uri, device=device)
            self.bases[flavour] = (model, tokenizer, base_fingerprint(uri),
                                   resolve_prompt_format(self.cfg.prompt_format, tokenizer))
        self.store = AdapterStore(self.cfg.store_uri)
        self.profiles: dict[str, str] = {}
        if any(m.profile for m in self.methods):
            from oppu.profiles import read_profiles

            self.profiles = read_profiles(self.cfg.data_uri, self.cfg.profiles.writer)

    def __call__(self, batch: dict) -> dict:
        from oppu.data.records import UserData

        rows = [dict(zip(batch.keys(), values, strict=True)) for values in zip(*batch.values(), strict=True)]
        users = [UserData.from_row(row) for row in rows]
        answers = []
        for method in self.methods:
            if method.adapter_variant:  # each user's own adapter: one user at a time
                for user in users:
                    answers.extend(self._answer([user], method))
            else:  # the shared base: every user's queries of the batch in one generation
                answers.extend(self._answer(users, method))
        return {name: [a[name] for a in answers] for name in ANSWER_FIELDS}

    def _prompts(self, user, method: Method) -> list[str]:
        from oppu.retrieval import BM25Retriever

        retriever = BM25Retriever(self.task, user.history) if method.retrieval == "bm25" else None
        profile = self.profiles[user.user_id] if method.profile else None
        prompts = []
        for query in user.queries:
            fields = self.task.parse_query(query.input)
            if retriever is not None:
                retrieved = [h.fields for h in retriever.top_k(fields, method.k,
                                                                limit=query.visible_history)]
            elif method.retrieval == "random":
                retrieved = [self.random_items[query.id]]
            else:
                retrieved = []
            prompts.append(self.task.build_prompt(fields, retrieved=retrieved, profile=profile))
        return prompts

    def _answer(self, users: list, method: Method) -> list[dict]:
        """``method``'s answers to the queries of ``users`` (one user where it has an adapter)."""
        model, tokenizer, fingerprint, prompt_format = self.bases[method.base_flavour(self.cfg)]
        prompts = [prompt for user in users for prompt in self._prompts(user, method)]
        queries = [(user, query) for user in users for query in user.queries]
        try:
            if method.adapter_variant:
                (user,) = users
                raws, predictions = self._answer_with_adapter(user, method, model, tokenizer, fingerprint, prompts)
            else:
                raws, predictions = self._decode(model, tokenizer, prompts, prompt_format)
            error = ""
        except Exception as exc:  # a missing or corrupt adapter fails this user's method only
            log.warning("user(s) %s, method %s: no answers (%s: %s)", ", ".join(u.user_id for u in users),
                        method.name, type(exc).__name__, exc)
            raws, error = [""] * len(prompts), f"{type(exc).__name__}: {exc}"[:1000]
            predictions = [""] * len(prompts)
        return [{"user_id": user.user_id, "method": method.name, "query_id": q.id,
                 "prediction": prediction, "raw": raw, "error": error}
                for (user, q), raw, prediction in zip(queries, raws, predictions, strict=True)]

    def _decode(self, model, tokenizer, prompts: list[str], prompt_format: str) -> tuple[list[str], list[str]]:
        """(raw output, prediction) of each prompt: label scoring where configured and the task has
        labels (the raw output is then the labels' normalised probabilities), else greedy decoding."""
        from oppu.models import generate_greedy
        from oppu.models.label_scoring import score_answers
        from oppu.tasks.decisions import label_probabilities

        settings = self.cfg.eval
        if answer_decoding(self.cfg, self.task) == "labels":
            labels = self.task.labels
            scores = score_answers(model, tokenizer, prompts, [" " + label for label in labels],
                                   batch_size=settings.label_batch_size,
                                   max_prompt_tokens=settings.max_prompt_tokens, prompt_format=prompt_format)
            raws = [json.dumps(dict(zip(labels, label_probabilities(row).round(4).tolist(), strict=True)))
                    for row in scores]
            return raws, [self.task.decide(row) for row in scores]
        raws = generate_greedy(model, tokenizer, prompts, self.task.max_new_tokens,
                               batch_size=settings.generation_batch_size,
                               max_prompt_tokens=settings.max_prompt_tokens, prompt_format=prompt_format)
        return raws, [self.task.parse_output(raw) for raw in raws]

    def _answer_with_adapter(self, user, method, model, tokenizer, fingerprint, prompts):
        from peft import PeftModel

        from oppu.models.peft_adapters import remove_adapter
        from oppu.store import AdapterKey, Manifest
        from oppu.store.manifest import MANIFEST_NAME

        key = AdapterKey(self.task.name, fingerprint, method.adapter_variant, user.user_id)
        with tempfile.TemporaryDirectory(prefix="oppu-eval-") as tmp:
            adapter_dir = self.store.fetch(key, dest_dir=tmp)
            # Prompted as the adapter was trained, whatever this run's setting says now.
            prompt_format = Manifest.from_json((adapter_dir / MANIFEST_NAME).read_bytes(),
                                               where=str(adapter_dir)).prompt_format
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
            try:
                return self._decode(peft_model, tokenizer, prompts, prompt_format)
            finally:
                remove_adapter(peft_model)


def _start_failed(batch: dict, error: str, methods: list[str], **_) -> dict:
    """The answers of a batch handed to an actor that could not start (``guard_start``): every
    query of every method failed with ``error``."""
    from oppu.data.records import UserData

    rows = [dict(zip(batch.keys(), values, strict=True)) for values in zip(*batch.values(), strict=True)]
    answers = [{"user_id": user.user_id, "method": method, "query_id": query.id, "prediction": "",
                "raw": "", "error": error[:1000]}
               for user in map(UserData.from_row, rows) for method in methods for query in user.queries]
    return {name: [a[name] for a in answers] for name in ANSWER_FIELDS}


def pick_random_items(dataset, seed: int) -> dict[str, dict]:
    """For the random-history baseline: one item drawn from every user's history, per test query."""
    pool = [item.fields for user in dataset.users for item in user.history]
    if not pool:
        return {}
    rng = random.Random(seed)
    return {q.id: pool[rng.randrange(len(pool))] for user in dataset.test_users() for q in user.queries}


def evaluate(cfg: RunConfig) -> dict:
    """Answer and score every configured method; writes predictions, metrics.json and metrics.md."""

    from oppu.actor_pools import map_users, read_test_users, result_batches
    from oppu.data.dataset import read_dataset
    from oppu.erasure import tombstone_check

    methods = [resolve_method(m) for m in cfg.eval.methods]
    missing = {m.base_flavour(cfg) for m in methods} - set(cfg.base.flavours)
    if missing:
        raise ConfigError(f"eval.methods need base flavour(s) {sorted(missing)} that base.flavours "
                          f"{cfg.base.flavours} does not train")
    dataset = read_dataset(cfg.data_uri)
    task = dataset.task
    erased = tombstone_check(cfg.store_uri)  # erased users (oppu users delete) are not answered for
    test_users = [u for u in dataset.test_users() if not erased(u.user_id)]
    golds = {q.id: q.gold for u in test_users for q in u.queries if q.gold is not None}
    if any(m.profile for m in methods):
        from oppu.profiles import stored_profiles

        stored_profiles(cfg, [u.user_id for u in test_users])  # fail here, not in every actor
    log.info("[evaluate] %s: %d test users, %d queries, methods %s", task.name, len(test_users), len(golds),
             ", ".join(m.name for m in methods))
    _, answers_ds = map_users(
        read_test_users(cfg.data_uri, lambda user: not erased(user)), QueryAnswerer, _start_failed, cfg.eval,
        {"cfg": cfg, "methods": [m.name for m in methods],
         "random_items": pick_random_items(dataset, cfg.seed)})
    predictions: dict[str, dict[str, str]] = {m.name: {} for m in methods}
    raw_outputs: dict[str, dict[str, str]] = {m.name: {} for m in methods}
    failed: dict[str, dict[str, str]] = {m.name: {} for m in methods}  # method -> query id -> error
    users_done, users_failed = set(), set()
    with logs.progress(len(test_users), "evaluate", unit="users") as bar:
        for rows in result_batches(answers_ds):  # a batch's rows come together, user by user
            done_before = len(users_done)
            newly_failed = []
            for row in rows:
                user = row["user_id"]
                predictions[row["method"]][row["query_id"]] = str(row["prediction"])
                raw_outputs[row["method"]][row["query_id"]] = str(row["raw"])
                if row["error"]:
                    failed[row["method"]][str(row["query_id"])] = str(row["error"])
                users_done.add(user)
                if row["error"] and user not in users_failed:
                    users_failed.add(user)
                    newly_failed.append(user)
            bar.update(len(users_done) - done_before, failed=newly_failed)
    metrics = write_results(cfg, task, golds, predictions, raw_outputs, failed, len(test_users))
    check_failed_queries(cfg, metrics)
    return metrics


def failed_queries_summary(failed: dict[str, dict[str, str]]) -> dict[str, dict]:
    """``metrics.json``'s ``failed_queries``: for each method with failures, their ``count``, the
    query ``ids`` (sorted) and the ``first_error`` (of the first id)."""
    summary = {}
    for method, errors in failed.items():
        if errors:
            ids = sorted(errors)
            summary[method] = {"count": len(ids), "ids": ids, "first_error": errors[ids[0]]}
    return summary


def check_failed_queries(cfg: RunConfig, metrics: dict) -> None:
    """Raise ``StageFailed`` when more queries failed than ``eval.max_failed_queries`` allows (-1: any)."""
    failed = metrics["failed_queries"]
    total = sum(entry["count"] for entry in failed.values())
    allowed = cfg.eval.max_failed_queries
    if not total or allowed == -1 or total <= allowed:
        return
    by_method = "; ".join(f"{method}: {entry['count']} ({name_list(entry['ids'], 5)}; first error: "
                          f"{entry['first_error'][:200]})" for method, entry in failed.items())
    raise StageFailed(
        f"evaluate: {total} queries could not be answered ({by_method}), more than "
        f"eval.max_failed_queries={allowed} allows (--max-failed-queries N); they scored as empty answers "
        f"in {fsutil.join(cfg.run_dir, 'metrics.json')} (failed_queries lists them all)")


def write_results(cfg: RunConfig, task, golds, predictions, raw_outputs, failed: dict[str, dict[str, str]],
                  n_users: int) -> dict:
    """Score, and write predictions, ``metrics.json`` and ``metrics.md``; ``failed`` maps each method
    to its failed query ids and their errors."""
    ids = sorted(golds)
    results = {}
    for method, preds in predictions.items():
        results[method] = task.score([golds[i] for i in ids], [preds.get(i, "") for i in ids])
        fsutil.write_json(fsutil.join(cfg.run_dir, "predictions", f"{method}.json"),
                          {"task": task.lamp_name,
                           "golds": [{"id": i, "output": preds.get(i, "")} for i in ids]})
        fsutil.write_json(fsutil.join(cfg.run_dir, "predictions", "raw", f"{method}.json"),
                          {i: raw_outputs[method].get(i, "") for i in ids})
    reference = load_reference(cfg.data_uri)
    decoding = answer_decoding(cfg, task)
    metrics = {"task": task.name, "methods": results, "reference": reference, "decoding": decoding,
               "n_test_users": n_users, "n_queries": len(ids),
               "oppu_gap_closed": gap_closed(task, results, reference),
               "population_gap_closed": population_gap_shares(task, results, reference),
               "errors": {m: len(e) for m, e in failed.items() if e},
               "failed_queries": failed_queries_summary(failed),
               "predictions": {m: f"predictions/{m}.json" for m in predictions}}
    fsutil.write_json(fsutil.join(cfg.run_dir, "metrics.json"), metrics)
    table = markdown_table(task, results, reference) + f"\nAnswers: {DECODING_NOTES[decoding]}.\n"
    fsutil.write_text(fsutil.join(cfg.run_dir, "metrics.md"), table)
    for method, count in metrics["errors"].items():
        log.warning("[evaluate] %s: %d queries failed, scored as empty answers (metrics.json failed_queries)",
                    method, count)
    return metrics


DECODING_NOTES = {
    "greedy": "greedy decoding, parsed (eval.decoding: greedy)",
    "labels": "each label scored as the whole answer, the one the metric rewards most taken (eval.decoding: labels)",
}


def answer_decoding(cfg: RunConfig, task) -> str:
    """How ``task``'s answers were decoded in this run: ``labels`` only where it has a label set."""
    return "labels" if cfg.eval.decoding == "labels" and task.answers_by_label else "greedy"


def load_reference(data_uri: str) -> dict:
    """``population`` and ``bayes`` reference scores where the data set has them (synthetic data)."""
    for candidate in ("reference.json", "lamp/reference.json"):
        uri = fsutil.join(data_uri, candidate)
        if fsutil.exists(uri):
            reference = fsutil.read_json(uri)
            return {k: reference[k] for k in ("population", "bayes") if k in reference}
    return {}


def markdown_table(task, results: dict[str, dict], reference: dict) -> str:
    """The results table; where the data has both references, a column of each method's share of
    the population -> Bayes gap (what personalization adds over the best non-personal answer)."""
    metric_names = list(task.metric_names)
    arrows = ["↑" if task.higher_is_better[m] else "↓" for m in metric_names]
    shares = population_gap_shares(task, results, reference)
    share_header = f" population → Bayes gap closed ({metric_names[0]}) |" if shares else ""
    header = ("| method | " + " | ".join(f"{m} {a}" for m, a in zip(metric_names, arrows, strict=True))
              + " |" + share_header)
    lines = [f"{task.name}", "", header, "|" + " --- |" * (len(metric_names) + 1 + bool(shares))]
    for method, scores in results.items():
        share = f" {shares[method]:.0%} |" if shares else ""
        lines.append(f"| {method} | " + " | ".join(f"{scores[m]:.4f}" for m in metric_names) + " |" + share)
    for name, scores in reference.items():
        share = (" 0% |" if name == "population" else " 100% |") if shares else ""
        lines.append(f"| *reference: {name}* | "
                     + " | ".join(f"{scores[m]:.4f}" if m in scores else "–" for m in metric_names) + " |"
                     + share)
    if "oppu" in shares:
        lines += ["", f"OPPU closes {shares['oppu']:.0%} of the gap between the population reference (the "
                      f"best answer that ignores the user) and the Bayes-optimal reference on {metric_names[0]}."]
    gap = gap_closed(task, results, reference)
    if gap is not None:
        lines += ["", f"OPPU closes {gap:.0%} of the gap between non-personalized and the Bayes-optimal "
                      f"reference on {metric_names[0]} (a share that flatters OPPU when the non-personalized "
                      "base is weaker than the population reference)."]
    return "\n".join(lines) + "\n"


def share_of_gap(start: float, value: float, end: float) -> float | None:
    """How far ``value`` went from ``start`` to ``end`` (1.0 = all the way; negative = backwards)."""
    return None if end == start else (value - start) / (end - start)


def gap_closed(task, results: dict, reference: dict) -> float | None:
    """(OPPU - non-personalized) / (Bayes - non-personalized) on the task's first metric."""
    metric = task.metric_names[0]
    try:
        base, oppu, bayes = (results["non-personalized"][metric], results["oppu"][metric],
                             reference["bayes"][metric])
    except KeyError:
        return None
    return share_of_gap(base, oppu, bayes)


def population_gap_shares(task, results: dict, reference: dict) -> dict[str, float]:
    """Each method's (score - population) / (Bayes - population) on the task's first metric;
    empty where the data has no references (real LaMP files) or they coincide."""
    metric = task.metric_names[0]
    try:
        population, bayes = reference["population"][metric], reference["bayes"][metric]
    except KeyError:
        return {}
    if population == bayes:
        return {}
    return {method: share_of_gap(population, scores[metric], bayes) for method, scores in results.items()}
