"""The ``Task``: everything task-specific that training, evaluation and serving need.

One frozen instance per LaMP task (see ``oppu.tasks.lamp``), assembled from small strategy
pieces: how LaMP's ``input`` holds the query (``oppu.tasks.queries``), the Appendix H prompt,
how a history item is rendered and turned into a training sample, how a generation is parsed
(``oppu.tasks.outputs``) and how LaMP scores it (``oppu.metrics.lamp``). Code outside
``oppu/tasks/`` asks the ``Task`` and never branches on the task's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from oppu.errors import DataError
from oppu.tasks.decisions import LabelDecision

TaskKind = Literal["classification", "rating", "generation"]


@dataclass(frozen=True)
class TrainingSample:
    """One training example: ``prompt + target`` is the exact training text.

    Only the target is trained on (the prompt is masked). A supervised target starts with the
    space that separates it from the prompt's final ``tag:``/``score:``/...; a next-token sample
    has an empty prompt and the whole history text as target.
    """

    prompt: str
    target: str


class QueryFormat(Protocol):
    """Where LaMP's official ``input`` text keeps a task's query fields."""

    fields: tuple[str, ...]

    def parse(self, lamp_input: str) -> dict[str, str]: ...

    def render(self, query: Mapping[str, str]) -> str: ...


@dataclass(frozen=True)
class SupervisedHistory:
    """The item has the task's input/output shape: prompt from the item, target its output field."""

    target_field: str


@dataclass(frozen=True)
class NextTokenHistory:
    """The item is only text of the user's (papers, tweets): learn it by next-token prediction."""

    text_template: str


HistoryRule = SupervisedHistory | NextTokenHistory
Scorer = Callable[[Sequence[str], Sequence[str]], dict[str, float]]


def require_fields(fields: Mapping[str, object], names: Sequence[str], what: str) -> None:
    """Raise ``DataError(field=name)`` for the first of ``names`` missing from ``fields`` or not text."""
    for name in names:
        if name not in fields:
            raise DataError(f"{what} has no {name!r} field", field=name)
        if not isinstance(fields[name], str):
            raise DataError(f"{what} field {name!r} must be text, got {type(fields[name]).__name__}",
                            field=name)


@dataclass(frozen=True, eq=False)
class Task:
    """A LaMP task. Equal (and hashed, and pickled) by name: there is one instance per task."""

    name: str  # "LaMP-2M"
    lamp_name: str  # "LaMP_2M", as in LaMP outputs files
    kind: TaskKind
    labels: tuple[str, ...] | None  # the evaluator's label order (classification, rating)
    item_fields: tuple[str, ...]  # required profile-item fields
    output_field: str | None  # the item field holding the task's output; None for LaMP-1, LaMP-7
    metric_names: tuple[str, str]
    higher_is_better: Mapping[str, bool]
    max_new_tokens: int
    default_epochs: int  # personal-adapter epochs, the paper's Table 5
    query_format: QueryFormat
    prompt_template: str  # Appendix H body; str.format over the query fields
    item_template: str  # a retrieved history item as the reference code renders it, ending in "\n"
    retrieval_query_template: str  # BM25 query text over the query fields
    history_rule: HistoryRule
    output_parser: Callable[[str], str]
    scorer: Scorer
    profile_instruction: str  # Appendix I; "{history}" marks where the user history goes
    # How the model's belief over ``labels`` becomes the answer its metric rewards most (label
    # scoring, ``eval.decoding: labels``); None for generation tasks, which are decoded greedily.
    label_decision: LabelDecision | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __reduce__(self):
        from oppu.tasks import get_task

        return get_task, (self.name,)

    def __repr__(self) -> str:
        return f"Task({self.name!r})"

    @property
    def query_fields(self) -> tuple[str, ...]:
        """The keys of ``parse_query``'s result, e.g. ``("description",)``."""
        return self.query_format.fields

    @property
    def primary_metric(self) -> str:
        """The metric the paper's tables lead with: accuracy, MAE or ROUGE-1."""
        return self.metric_names[0]

    @property
    def trains_on_next_token(self) -> bool:
        """True where history items are plain text learnt by next-token prediction (LaMP-1, LaMP-7)."""
        return isinstance(self.history_rule, NextTokenHistory)

    def item_query(self, fields: Mapping[str, str]) -> dict[str, str] | None:
        """A history item seen as a query (its input part), or None where items are not query-shaped."""
        if self.trains_on_next_token:
            return None
        require_fields(fields, self.item_fields, f"{self.name} history item")
        return {name: fields[name] for name in self.query_fields}

    def parse_query(self, lamp_input: str) -> dict[str, str]:
        """The query fields cut out of LaMP's official ``input``; ``DataError(field="input")`` if malformed."""
        if not isinstance(lamp_input, str):
            raise DataError(f"{self.name} input must be text, got {type(lamp_input).__name__}",
                            field="input")
        return self.query_format.parse(lamp_input)

    def lamp_input(self, query: Mapping[str, str]) -> str:
        """LaMP's official ``input`` text for ``query``: ``parse_query(lamp_input(q)) == q``."""
        require_fields(query, self.query_fields, f"{self.name} query")
        return self.query_format.render(query)

    def render_item(self, fields: Mapping[str, str]) -> str:
        """A history item as it appears among the retrieved items of a prompt (ends in a newline)."""
        require_fields(fields, self.item_fields, f"{self.name} history item")
        return self.item_template.format(**fields)

    def build_prompt(self, query: Mapping[str, str], retrieved: Sequence[Mapping[str, str]] = (),
                     profile: str | None = None) -> str:
        """The Appendix H prompt: profile line, retrieved items, then the task prompt for ``query``.

        The profile and retrieved-history slots are left out, with their line, when empty.
        """
        require_fields(query, self.query_fields, f"{self.name} query")
        parts = []
        if profile:
            parts.append(profile + "\n")
        if retrieved:
            parts.append("".join(self.render_item(item) for item in retrieved) + "\n")
        parts.append(self.prompt_template.format(**query))
        return "".join(parts)

    def retrieval_query(self, query: Mapping[str, str]) -> str:
        """The BM25 query text: the task instruction with the query text."""
        require_fields(query, self.query_fields, f"{self.name} query")
        return self.retrieval_query_template.format(**query)

    def retrieval_document(self, fields: Mapping[str, str]) -> str:
        """The BM25 document text of a history item: its rendering."""
        return self.render_item(fields)

    def history_sample(self, fields: Mapping[str, str], retrieved: Sequence[Mapping[str, str]] = (),
                       profile: str | None = None) -> TrainingSample:
        """The training sample a history item gives for a personal adapter.

        Supervised items become (the item's prompt, its output). Next-token items ignore
        ``retrieved`` and ``profile``, as the reference code does: the text alone is learnt.
        """
        require_fields(fields, self.item_fields, f"{self.name} history item")
        rule = self.history_rule
        if isinstance(rule, NextTokenHistory):
            return TrainingSample(prompt="", target=rule.text_template.format(**fields))
        return TrainingSample(prompt=self.build_prompt(self.item_query(fields), retrieved, profile),
                              target=" " + fields[rule.target_field])

    def query_sample(self, query: Mapping[str, str], gold: str, retrieved: Sequence[Mapping[str, str]] = (),
                     profile: str | None = None) -> TrainingSample:
        """A supervised sample from a query and its gold output (base-model task adaptation)."""
        if not isinstance(gold, str):
            raise DataError(f"{self.name} gold output must be text, got {type(gold).__name__}",
                            field="output")
        return TrainingSample(prompt=self.build_prompt(query, retrieved, profile), target=" " + gold)

    def parse_output(self, text: str) -> str:
        """The prediction LaMP scores, parsed leniently from a model's generation."""
        return self.output_parser(text)

    @property
    def answers_by_label(self) -> bool:
        """True where an answer can be chosen by scoring each label (classification, rating)."""
        return self.labels is not None and self.label_decision is not None

    def decide(self, log_probs: Sequence[float]) -> str:
        """The label the task's decision rule picks from the model's log-probability of each of
        ``labels`` (in that order), e.g. the likeliest for accuracy, a median for MAE."""
        if not self.answers_by_label:
            raise ValueError(f"{self.name} has no label set to decide among")
        if len(log_probs) != len(self.labels):
            raise ValueError(f"{self.name}: {len(log_probs)} log-probabilities for {len(self.labels)} labels")
        return self.label_decision(self.labels, log_probs)

    def score(self, golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
        """LaMP's evaluator for this task over position-aligned golds and predictions."""
        if len(golds) != len(preds):
            raise DataError(f"{self.name}: {len(golds)} golds but {len(preds)} predictions")
        if not golds:
            raise DataError(f"{self.name}: nothing to score (no predictions)")
        return self.scorer(golds, preds)

    def profile_prompt(self, history_fields: Sequence[Mapping[str, str]]) -> str:
        """The Appendix I prompt asking an instruction-tuned LLM to profile the user.

        Every item given is rendered and joined with `` | `` as the reference code does; choosing
        which and how many items to show (the reference samples 10) is the caller's.
        """
        history = " | ".join(self.render_item(fields).rstrip("\n") for fields in history_fields)
        return self.profile_instruction.replace("{history}", history)
