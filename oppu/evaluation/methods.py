"""The methods of the paper's Table 1, as data: which base, which retrieval, which adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from oppu.run_config import METHOD, parse_name

Retrieval = Literal["none", "bm25", "random"]


@dataclass(frozen=True)
class Method:
    name: str
    retrieval: Retrieval  # how history items get into the prompt
    k: int  # how many
    adapter_variant: str | None  # the personal adapter plugged in, or None
    profile: bool = False  # the user's textual profile leads the prompt (PAG)

    def base_flavour(self, cfg) -> str:
        """The base of run config ``cfg`` that answers: the one trained with this prompt shape."""
        return cfg.base_flavour(self.profile, self.k if self.retrieval != "none" else 0)


def resolve_method(name: str) -> Method:
    """``non-personalized``, ``random-history`` (one random item of any user), ``rag-k<N>``,
    ``oppu``, ``rag-k<N>+oppu``, and the profile-augmented ``pag``, ``pag+rag-k<N>``,
    ``pag+oppu`` and ``pag+rag-k<N>+oppu`` (the grammar is ``oppu.run_config``'s name table)."""
    if name == "non-personalized":
        return Method(name, "none", 0, None)
    if name == "random-history":
        return Method(name, "random", 1, None)
    shape = parse_name(name, METHOD)
    return Method(name, "bm25" if shape.k else "none", shape.k, name if shape.adapter else None,
                  profile=shape.profile)
