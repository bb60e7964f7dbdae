"""The methods of the paper's Table 1, as data: which base, which retrieval, which adapter."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from oppu.errors import ConfigError

Retrieval = Literal["none", "bm25", "random"]


@dataclass(frozen=True)
class Method:
    name: str
    base_flavour: str  # "plain", "rag" or "profile": which task-adapted base answers
    retrieval: Retrieval  # how history items get into the prompt
    k: int  # how many
    adapter_variant: str | None  # the personal adapter plugged in, or None
    profile: bool = False  # the user's textual profile leads the prompt (PAG)

    @property
    def personalized_by_adapter(self) -> bool:
        return self.adapter_variant is not None


_RAG = re.compile(r"rag-k(?P<k>[1-9][0-9]*)(?P<oppu>\+oppu)?")
_PAG_RAG = re.compile(r"pag\+rag-k(?P<k>[1-9][0-9]*)")


def resolve_method(name: str) -> Method:
    """``non-personalized``, ``random-history``, ``rag-k<N>``, ``oppu``, ``rag-k<N>+oppu``, and the
    profile-augmented ``pag``, ``pag+rag-k<N>`` (Appendix C uses k=1) and ``pag+oppu``."""
    if name == "pag":
        return Method(name, "profile", "none", 0, None, profile=True)
    if name == "pag+oppu":
        return Method(name, "profile", "none", 0, "pag+oppu", profile=True)
    pag_rag = _PAG_RAG.fullmatch(name)
    if pag_rag:
        return Method(name, "profile", "bm25", int(pag_rag["k"]), None, profile=True)
    if name == "non-personalized":
        return Method(name, "plain", "none", 0, None)
    if name == "random-history":
        return Method(name, "rag", "random", 1, None)
    if name == "oppu":
        return Method(name, "plain", "none", 0, "oppu")
    match = _RAG.fullmatch(name)
    if match:
        k = int(match["k"])
        return Method(name, "rag", "bm25", k, name if match["oppu"] else None)
    raise ConfigError(f"unknown method {name!r}: use non-personalized, random-history, rag-k<N>, "
                      "oppu, rag-k<N>+oppu, pag, pag+rag-k<N> or pag+oppu")
