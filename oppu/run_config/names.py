"""The one grammar of the names a run config holds: base flavours, adapter variants and evaluation
methods, ``parse_name`` over the ``NameKind`` table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from oppu.errors import ConfigError

# The one grammar of the names a run uses, a table of three kinds. A name is up to three parts
# joined by ``+``, in this order: the profile part (the user's textual profile leads the prompt),
# ``rag-k<N>`` (N retrieved history items in the prompt), ``oppu`` (the user's personal adapter).
# A kind spells the profile part its own way, says whether ``oppu`` must, may or must not end
# the name, and has a few names outside the grammar.
#
# | kind            | profile part | oppu part | names outside it                   | examples                       |
# | --------------- | ------------ | --------- | ---------------------------------- | ------------------------------ |
# | base flavour    | ``profile``  | never     | ``plain``; ``rag`` (k = rag_k)     | ``rag-k2``, ``profile+rag-k1`` |
# | adapter variant | ``pag``      | always    |                                    | ``oppu``, ``pag+rag-k1+oppu``  |
# | method          | ``pag``      | optional  | ``non-personalized``, ``random-history`` | ``rag-k4``, ``pag``, ``rag-k1+oppu`` |


@dataclass(frozen=True)
class NameKind:
    """One row of the name table: how one kind of name is spelled."""

    what: str  # "base flavour", "adapter variant", "method": the kind, as errors name it
    profile_part: str  # how the profile part is spelled
    oppu_part: Literal["never", "always", "optional"]
    spellings: str  # every form, for the error message


BASE_FLAVOUR = NameKind("base flavour", "profile", "never",
                        "plain, rag, rag-k<N>, profile or profile+rag-k<N>")
ADAPTER_VARIANT = NameKind("adapter variant", "pag", "always",
                           "'oppu', 'rag-k<N>+oppu', 'pag+oppu' or 'pag+rag-k<N>+oppu'")
METHOD = NameKind("method", "pag", "optional",
                  "non-personalized, random-history, rag-k<N>, oppu, rag-k<N>+oppu, pag, pag+rag-k<N>, "
                  "pag+oppu or pag+rag-k<N>+oppu")

_RAG_PART = re.compile(r"rag-k([1-9][0-9]*)")


@dataclass(frozen=True)
class PromptShape:
    """What a name says: the profile leads the prompt, ``k`` retrieved items, the personal adapter."""

    profile: bool
    k: int
    adapter: bool


def parse_name(name: str, kind: NameKind) -> PromptShape:
    """``name`` read by the grammar of ``kind`` (its names outside the grammar are the caller's)."""
    parts = name.split("+")
    profile = parts[0] == kind.profile_part
    if profile:
        parts = parts[1:]
    k = 0
    if parts and (match := _RAG_PART.fullmatch(parts[0])):
        k, parts = int(match[1]), parts[1:]
    adapter = parts == ["oppu"]
    if adapter:
        parts = []
    wrong_adapter = (kind.oppu_part == "always" and not adapter) or (kind.oppu_part == "never" and adapter)
    if parts or wrong_adapter:
        raise ConfigError(f"unknown {kind.what} {name!r}: use {kind.spellings}")
    return PromptShape(profile, k, adapter)


def parse_variant(variant: str) -> tuple[bool, int]:
    """A personal-adapter variant -> (the user's profile leads its prompts, retrieved items in them).

    ``oppu``, ``rag-k<N>+oppu``, ``pag+oppu`` and ``pag+rag-k<N>+oppu``; ``RunConfig.variant_base``
    says which base it trains on.
    """
    shape = parse_name(variant, ADAPTER_VARIANT)
    return shape.profile, shape.k


def parse_flavour(flavour: str, rag_k: int) -> tuple[bool, int]:
    """A base flavour -> (profile in its prompts, retrieved items in them): ``plain``, ``rag``
    (``rag_k`` items), ``rag-k<N>``, ``profile``, ``profile+rag-k<N>``."""
    fixed = {"plain": (False, 0), "rag": (False, rag_k)}
    if flavour in fixed:
        return fixed[flavour]
    shape = parse_name(flavour, BASE_FLAVOUR)
    return shape.profile, shape.k
