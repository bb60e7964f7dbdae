"""How a task prompt becomes model input: plain text after BOS, or the user turn of a chat template.

An instruction-tuned model answers best when asked through its own chat template: the Appendix H
task prompt goes in the user turn and the answer is the assistant turn. A plain (non-chat) model
keeps the plain prompt. One setting, the run config's ``prompt_format``, decides:

- ``auto`` (default): ``chat`` when the model's tokenizer carries a chat template, else ``plain``;
- ``plain`` / ``chat``: forced (``chat`` on a tokenizer without a template is an error).

The resolved format is what training, evaluation and serving use, and it is recorded in each
adapter's manifest, so serving renders a prompt exactly as that adapter was trained.
"""

from __future__ import annotations

from typing import Literal

from oppu.errors import ConfigError

PromptFormatSetting = Literal["auto", "plain", "chat"]
PLAIN = "plain"
CHAT = "chat"
_SENTINEL = "\u2063OPPU-PROMPT\u2063"  # invisible separator: never part of a real template


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_prompt_format(setting: str, tokenizer) -> str:
    """``plain`` or ``chat`` for a configured ``setting`` and the model's tokenizer."""
    if setting == "auto":
        return CHAT if has_chat_template(tokenizer) else PLAIN
    if setting == CHAT and not has_chat_template(tokenizer):
        raise ConfigError("prompt_format=chat, but the model's tokenizer has no chat template: use "
                          "prompt_format=plain (or auto)")
    if setting not in (PLAIN, CHAT):
        raise ConfigError(f"prompt_format: {setting!r} is not one of ['auto', 'plain', 'chat']")
    return setting


def model_prompt_format(setting: str, model_dir) -> str:
    """``resolve_prompt_format`` for the model saved in the local directory ``model_dir``: its
    tokenizer alone is read, not its weights."""
    from transformers import AutoTokenizer

    return resolve_prompt_format(setting, AutoTokenizer.from_pretrained(str(model_dir)))


def chat_text(tokenizer, prompt: str) -> str:
    """The chat template's rendering of ``prompt`` as one user turn, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def chat_frame(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after the user's text in ``chat_text``.

    Tokenized apart from the prompt, so a long prompt can lose tokens from its left without
    cutting into the template (system turn, role headers), and training and generation see the
    same ids for the same prompt.
    """
    text = chat_text(tokenizer, _SENTINEL)
    if text.count(_SENTINEL) != 1:
        raise ConfigError("the model's chat template does not place the user's message once; "
                          "use prompt_format=plain")
    before, after = text.split(_SENTINEL)
    return (tokenizer(before, add_special_tokens=False)["input_ids"],
            tokenizer(after, add_special_tokens=False)["input_ids"])
