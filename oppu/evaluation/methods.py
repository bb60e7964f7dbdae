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
    retrieval: Retrieval  # how history items get into the prompt
    k: int  # how many
    adapter_variant: str | None  # the personal adapter plugged in, or None
    profile: bool = False  # the user's textual profile leads the prompt (PAG)

    def base_flavour(self, cfg) -> str:
        """The base of run config ``cfg`` that answers: the one trained with this prompt shape."""
        return cfg.base_flavour(self.profile, self.k if self.retrieval != "none" else 0)


# The paper's Table 1 names: [pag+][rag-k<N>+]oppu, [pag+]rag-k<N>, pag, and the two baselines.
_METHOD = re.compile(r"(?P<pag>pag)?(?:\+?rag-k(?P<k>[1-9][0-9]*))?(?P<oppu>\+?oppu)?")


def resolve_method(name: str) -> Method:
    """``non-personalized``, ``random-history`` (one random item of any user), ``rag-k<N>``,
    ``oppu``, ``rag-k<N>+oppu``, and the profile-augmented ``pag``, ``pag+rag-k<N>``,
    ``pag+oppu`` and ``pag+rag-k<N>+oppu``."""
    if name == "non-personalized":
        return Method(name, "none", 0, None)
    if name == "random-history":
        return Method(name, "random", 1, None)
    match = _METHOD.fullmatch(name)
    canonical = match and (("pag" if match["pag"] else "") + (f"+rag-k{match['k']}" if match["k"] else "")
                           + ("+oppu" if match["oppu"] else "")).lstrip("+")
    if not match or not name or canonical != name:
        raise ConfigError(f"unknown method {name!r}: use non-personalized, random-history, rag-k<N>, "
                          "oppu, rag-k<N>+oppu, pag, pag+rag-k<N>, pag+oppu or pag+rag-k<N>+oppu")
    k = int(match["k"] or 0)
    return Method(name, "bm25" if k else "none", k, name if match["oppu"] else None,
                  profile=bool(match["pag"]))
