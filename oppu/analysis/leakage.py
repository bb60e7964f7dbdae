"""Leaked answers: test queries whose gold is in text a model was trained on before it was evaluated.

A model evaluated on a user's test queries has been trained, in order, on: the tiny default's
pretraining corpus (``model: tiny`` only), the base's task-adaptation samples (per flavour), and
the user's own personal samples (history only). :func:`run_training_texts` rebuilds those texts
for a run from its data and checks that they are the texts actually used: the pretraining corpus
must reproduce the build hash recorded in the pretrained model (``oppu-build.json``), and each
base's sample list must have the length and source model its provenance (``oppu-base.json``)
records. :func:`find_leaks` then looks for every test query's answer in them.

A query's answer is "in" a text when the text holds the query's input together with its gold, as
the project renders them: the task prompt followed by the gold (a query sample, or a query in
the pretraining corpus) or the history-item rendering with the gold as the output
(``description: ... tag: GOLD``). For generation tasks the gold text alone counts too (a title
or a paraphrase is specific enough). A label or a rating alone never counts: every LaMP-2M prompt
lists every tag.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from oppu import fsutil
from oppu.data.records import UserData
from oppu.errors import ConfigError
from oppu.run_config import RunConfig
from oppu.tasks.base import Task


@dataclass(frozen=True)
class Leak:
    user_id: str
    query_id: str
    source: str  # which training text set: "pretraining", "base-plain", "personal:oppu", ...
    text: str  # the training text that holds the answer


def answer_renderings(task: Task, fields: dict[str, str], gold: str) -> list[str]:
    """The strings whose presence in a training text means it taught this query's answer."""
    sample = task.query_sample(fields, gold)
    found = [sample.prompt.rstrip() + sample.target, task.prompt_template.format(**fields) + " " + gold]
    if task.output_field is not None and set(task.item_fields) <= {*fields, task.output_field}:
        found.append(task.render_item({**fields, task.output_field: gold}).strip())
    if task.kind == "generation" and gold.strip():
        found.append(gold.strip())
    return list(dict.fromkeys(found))


def find_leaks(task: Task, test_users: Sequence[UserData], texts: dict[str, Iterable[str]],
               personal: dict[str, dict[str, Iterable[str]]] | None = None) -> list[Leak]:
    """Every (test query, training text) where the text holds the query's answer.

    ``texts``: {source: texts every test user's model saw (pretraining, base samples)};
    ``personal``: {user_id: {source: texts only that user's adapter saw}}.
    """
    shared = {source: list(values) for source, values in texts.items()}
    leaks = []
    for user in test_users:
        sources = {**shared, **{s: list(v) for s, v in (personal or {}).get(user.user_id, {}).items()}}
        for query in user.queries:
            if query.gold is None:
                continue
            needles = answer_renderings(task, task.parse_query(query.input), query.gold)
            for source, values in sources.items():
                for text in values:
                    if any(_holds(text, needle) for needle in needles):
                        leaks.append(Leak(user.user_id, query.id, source, text))
    return leaks


def _holds(text: str, needle: str) -> bool:
    """``needle`` occurs in ``text`` and ends there, at a newline or a space (so the gold
    ``comedy`` is not found in ``tag: comedy-drama``)."""
    start = text.find(needle)
    while start >= 0:
        end = start + len(needle)
        if end == len(text) or text[end].isspace():
            return True
        start = text.find(needle, start + 1)
    return False


def _sample_text(sample) -> str:
    return sample.prompt + sample.target


def pretraining_texts(cfg: RunConfig, candidates: Sequence[str]) -> tuple[str, list[str]]:
    """(data URI, corpus) of the tiny pretrained model ``cfg`` starts from: the first data set among
    ``candidates`` whose base users' corpus reproduces the build hash recorded in the model.
    Raises ``ConfigError`` when none does, so a check never runs on texts the model did not see."""
    from oppu.data.dataset import read_dataset
    from oppu.models.tiny import BUILD_RECORD, build_hash
    from oppu.training.samples import pretraining_corpus

    record = fsutil.read_json(fsutil.join(cfg.pretrained_uri, BUILD_RECORD))
    for data_uri in candidates:
        dataset = read_dataset(data_uri)
        corpus = [text for text in pretraining_corpus(dataset.task, dataset.base_users()) if text]
        if build_hash(corpus, cfg.tiny, cfg.seed) == record["build_hash"]:
            return data_uri, corpus
    raise ConfigError(f"no data set among {list(candidates)} reproduces the pretraining corpus of "
                      f"{cfg.pretrained_uri} (build hash {record['build_hash']})")


def base_texts(cfg: RunConfig, flavour: str) -> list[str]:
    """The task-adaptation samples of the run's ``flavour`` base, rebuilt as ``adapt_base`` builds
    them and checked against the base's provenance (sample count, source model)."""
    from oppu.data.dataset import read_dataset
    from oppu.training.samples import base_samples

    if flavour == "profile":
        raise ConfigError("the leak check does not rebuild profile-base samples")
    dataset = read_dataset(cfg.data_uri)
    provenance = fsutil.read_json(fsutil.join(cfg.base_uri(flavour), "oppu-base.json"))
    k = cfg.base.rag_k if flavour == "rag" else 0
    samples = base_samples(dataset.task, dataset.base_users(), k, cfg.base.include_history_samples,
                           cfg.seed, cfg.base.max_samples)
    if (provenance["samples"], provenance["rag_k"], provenance["source_model"]) != (len(samples), k, cfg.pretrained_uri):
        raise ConfigError(f"{cfg.base_uri(flavour)} was not trained on the samples rebuilt from {cfg.data_uri}: "
                          f"provenance {provenance}, rebuilt {len(samples)} samples with k={k} "
                          f"from {cfg.pretrained_uri}")
    return [_sample_text(s) for s in samples]


def personal_texts(cfg: RunConfig, task: Task, user: UserData, variants: Sequence[str]) -> dict[str, list[str]]:
    """{``personal:<variant>``: the user's personal training texts} for the ``oppu`` and
    ``rag-k<k>+oppu`` variants."""
    from oppu.training.samples import personal_samples

    found = {}
    for variant in variants:
        if variant == "oppu":
            k = 0
        elif variant.startswith("rag-k") and variant.endswith("+oppu"):
            k = int(variant[len("rag-k"):-len("+oppu")])
        else:
            raise ConfigError(f"the leak check does not rebuild the samples of variant {variant!r}")
        found[f"personal:{variant}"] = [_sample_text(s) for s in personal_samples(task, user, k)]
    return found


def run_training_texts(cfg: RunConfig, flavours: Sequence[str], variants: Sequence[str],
                       pretraining_candidates: Sequence[str] = ()) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """(shared texts, {user: personal texts}) a run's test users' models were trained on before
    evaluation, each verified against what the run recorded (see the module docstring).

    ``pretraining_candidates``: data sets the tiny pretrained model may have been built from
    (the run's own is tried first)."""
    from oppu.data.dataset import read_dataset

    dataset = read_dataset(cfg.data_uri)
    shared: dict[str, list[str]] = {}
    if cfg.model == "tiny":
        data_uri, corpus = pretraining_texts(cfg, [cfg.data_uri, *pretraining_candidates])
        shared[f"pretraining ({data_uri})"] = corpus
    for flavour in flavours:
        shared[f"base-{flavour}"] = base_texts(cfg, flavour)
    personal = {u.user_id: personal_texts(cfg, dataset.task, u, variants) for u in dataset.test_users()}
    return shared, personal


def audit_run(cfg: RunConfig, flavours: Sequence[str], variants: Sequence[str],
              pretraining_candidates: Sequence[str] = ()) -> dict:
    """The leak check of a run, as a JSON-able summary: test queries checked, leaks per source and
    the first few leaked (user, query) pairs."""
    from oppu.data.dataset import read_dataset

    dataset = read_dataset(cfg.data_uri)
    shared, personal = run_training_texts(cfg, flavours, variants, pretraining_candidates)
    leaks = find_leaks(dataset.task, dataset.test_users(), shared, personal)
    by_source: dict[str, set] = {}
    for leak in leaks:
        by_source.setdefault(leak.source, set()).add(leak.query_id)
    queries = [q for u in dataset.test_users() for q in u.queries if q.gold is not None]
    return {"test_queries": len(queries), "leaked_queries": len({leak.query_id for leak in leaks}),
            "texts_checked": {source: len(texts) for source, texts in shared.items()}
            | {"personal (all users)": sum(len(t) for v in personal.values() for t in v.values())},
            "leaked_queries_by_source": {source: len(ids) for source, ids in sorted(by_source.items())},
            "examples": [[leak.user_id, leak.query_id, leak.source] for leak in leaks[:5]]}
