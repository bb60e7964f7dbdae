"""Profile writers: a user's history -> a short textual profile (paper Appendix I), for PAG.

A writer is anything with ``name`` and ``write(task, users) -> {user_id: text}``. Three backends:

- ``hf``: any Hugging Face instruction-tuned causal LM (id, local or ``s3://`` path), batched
  greedy decoding of ``Task.profile_prompt`` over a sample of the user's history items;
- ``openai``: any OpenAI-compatible endpoint (this project's serve app included), one chat
  completion per user with the same prompt;
- ``statistical``: no LLM at all, for the embedded default where no instruction-tuned model
  exists. It states what the Appendix I prompts ask for (the user's most frequent labels, most
  common positive and negative scores, frequent title or text words) computed from the history,
  and every text it writes starts with ``[statistical profile]`` so it is never read as an LLM's.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from oppu.data.records import UserData
from oppu.errors import ConfigError
from oppu.tasks.base import Task

STATISTICAL_MARK = "[statistical profile]"
WRITER_NAMES = ("statistical", "hf", "openai")

# Words that say nothing about a user; kept short on purpose (the statistics only rank words).
_STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were "
    "will with we our their his her they you your i not but which who what how about into over "
    "new paper title abstract".split())
_WORD = re.compile(r"[a-z][a-z'-]+")


class ProfileWriter(Protocol):
    """Writes one textual profile per user; ``name`` names the Parquet file the profiles go to."""

    name: str

    def write(self, task: Task, users: Sequence[UserData]) -> dict[str, str]: ...


def profile_items(user: UserData, n_items: int, seed: int) -> list[Mapping[str, str]]:
    """The history items shown to an LLM writer: ``n_items`` drawn per user (the reference draws
    10), kept in time order; the draw depends only on the seed and the user id."""
    history = user.history
    if len(history) <= n_items:
        return [item.fields for item in history]
    rng = random.Random(f"{seed}:{user.user_id}")
    picked = sorted(rng.sample(range(len(history)), n_items))
    return [history[i].fields for i in picked]


@dataclass
class StatisticalProfileWriter:
    """Appendix I's questions answered by counting, named as such in every profile."""

    top_n: int = 3  # labels / words listed per line
    name: str = "statistical"

    def write(self, task: Task, users: Sequence[UserData]) -> dict[str, str]:
        return {user.user_id: self.profile(task, user) for user in users}

    def profile(self, task: Task, user: UserData) -> str:
        n_items = len(user.history)
        if n_items == 0:
            return f"{STATISTICAL_MARK} The user has no history."
        lines = [f"{STATISTICAL_MARK} Computed from {n_items} history items, not written by an LLM."]
        if task.output_field is not None and task.kind == "classification":
            labels = Counter(item.fields[task.output_field] for item in user.history)
            lines.append(f"Most popular {task.output_field}: {_counted(labels, self.top_n, n_items)}.")
        elif task.output_field is not None and task.kind == "rating":
            scores = Counter(item.fields[task.output_field] for item in user.history)
            positive = Counter({s: c for s, c in scores.items() if _rating(s) >= 4})
            negative = Counter({s: c for s, c in scores.items() if _rating(s) <= 2})
            lines.append(f"Most common positive score: {_counted(positive, 1, n_items) or 'none'}; "
                         f"most common negative score: {_counted(negative, 1, n_items) or 'none'}; "
                         f"mean score {sum(_rating(s) * c for s, c in scores.items()) / n_items:.1f}.")
        elif task.output_field is not None:
            outputs = [item.fields[task.output_field] for item in user.history]
            lines.append(f"Frequent {task.output_field} words: "
                         f"{_counted(_words(outputs), self.top_n, None)}; typical {task.output_field} "
                         f"length {_median([len(o.split()) for o in outputs])} words.")
        texts = [" ".join(v for k, v in item.fields.items() if k != task.output_field)
                 for item in user.history]
        lines.append(f"Frequent history words: {_counted(_words(texts), self.top_n + 2, None)}.")
        return " ".join(lines)


def _rating(score: str) -> float:
    try:
        return float(score)
    except ValueError:
        return float("nan")


def _words(texts: Sequence[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS)
    return counts


def _counted(counts: Counter[str], top_n: int, total: int | None) -> str:
    # Ties are broken alphabetically so the same history always gives the same profile.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
    if total is None:
        return ", ".join(f"{word} ({count})" for word, count in ranked)
    return ", ".join(f"{label} ({count} of {total})" for label, count in ranked)


def _median(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0


@dataclass
class HFProfileWriter:
    """An instruction-tuned Hugging Face model writes each profile (batched greedy decoding)."""

    model: str  # HF id, local directory or fsspec URI
    items_per_user: int = 10
    batch_size: int = 8
    max_new_tokens: int = 128
    max_prompt_tokens: int = 1024
    num_gpus: float = 0.0  # GPUs of the Ray task that runs the writer; the model goes on CUDA when > 0
    seed: int = 0
    name: str = "hf"

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def write(self, task: Task, users: Sequence[UserData]) -> dict[str, str]:
        from oppu.models import generate_greedy, load_model
        from oppu.models.prompting import resolve_prompt_format

        model, tokenizer = load_model(self.model, device=self.device)
        prompts = [task.profile_prompt(profile_items(u, self.items_per_user, self.seed)) for u in users]
        # An instruction-tuned writer is asked through its chat template, as it was tuned.
        texts = generate_greedy(model, tokenizer, prompts, self.max_new_tokens,
                                batch_size=self.batch_size, max_prompt_tokens=self.max_prompt_tokens,
                                prompt_format=resolve_prompt_format("auto", tokenizer))
        return {user.user_id: text.strip() for user, text in zip(users, texts, strict=True)}


@dataclass
class OpenAIProfileWriter:
    """Any OpenAI-compatible chat endpoint writes each profile (temperature 0)."""

    base_url: str
    model: str
    api_key: str = "unused"  # local endpoints often need none; the client insists on a value
    items_per_user: int = 10
    max_new_tokens: int = 128
    seed: int = 0
    name: str = "openai"

    def write(self, task: Task, users: Sequence[UserData]) -> dict[str, str]:
        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key)
        profiles = {}
        for user in users:
            prompt = task.profile_prompt(profile_items(user, self.items_per_user, self.seed))
            response = client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}],
                max_tokens=self.max_new_tokens, temperature=0.0)
            profiles[user.user_id] = (response.choices[0].message.content or "").strip()
        return profiles


def make_writer(name: str, *, model: str | None = None, base_url: str | None = None,
                api_key: str | None = None, items_per_user: int = 10, batch_size: int = 8,
                max_new_tokens: int = 128, num_gpus: float = 0.0, seed: int = 0) -> ProfileWriter:
    """The writer called ``name`` (``statistical``, ``hf`` or ``openai``) with its settings."""
    if name == "statistical":
        return StatisticalProfileWriter()
    if name == "hf":
        if not model:
            raise ConfigError("profile writer 'hf' needs a model (profiles.model / --model): an "
                              "instruction-tuned HF id or path")
        return HFProfileWriter(model, items_per_user, batch_size, max_new_tokens, num_gpus=num_gpus,
                               seed=seed)
    if name == "openai":
        if not (base_url and model):
            raise ConfigError("profile writer 'openai' needs profiles.base_url and profiles.model")
        return OpenAIProfileWriter(base_url, model, api_key or "unused", items_per_user,
                                   max_new_tokens, seed)
    raise ConfigError(f"unknown profile writer {name!r}: use one of {list(WRITER_NAMES)}")
