"""A tiny Llama base, a tokenizer trained here, and random per-user PEFT LoRA adapters for tests.

The adapters' B matrices are random (PEFT initialises them to zero), so every user's greedy
output differs from the base's and from other users'.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ("the a movie film story about love war space robot city night dark funny sad old new "
         "hero villain ship star planet girl boy king queen dog cat run fight dream music "
         "comedy action classic fantasy romance violence").split()
CORPUS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(40)]


def build_tiny_base(out_dir: Path, seed: int = 0) -> Path:
    """Save a 2-layer ``LlamaForCausalLM`` and a word-level tokenizer to ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(CORPUS + [" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tiny_base(base_dir: Path):
    from oppu.models import load_model

    return load_model(base_dir)


def make_user_adapter(base_dir: Path, out_dir: Path, seed: int, rank: int = 4, alpha: int = 8,
                      target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A PEFT LoRA adapter directory for the tiny base with seeded random A and B."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, _ = load_tiny_base(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                                                  lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.8)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def publish_adapter(store, task: str, fingerprint: str, user: str, adapter_dir: Path, variant: str = "oppu"):
    from oppu.store import AdapterKey

    return store.publish(AdapterKey(task, fingerprint, variant, user), adapter_dir, data_hash=f"data-{user}",
                         config={"seed": user}, peft_method="lora", data_span={"n_items": 1}, metrics={})


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompts: list[str], max_new_tokens: int) -> list[str]:
    """What offline evaluation answers: ``generate_greedy`` with the user's PEFT model (or the bare base)."""
    from peft import PeftModel

    from oppu.models import generate_greedy

    model, tokenizer = load_tiny_base(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return generate_greedy(model, tokenizer, prompts, max_new_tokens)


def reseeded_adapter(template_dir: Path, out_dir: Path, seed: int) -> Path:
    """A copy of a PEFT adapter directory with fresh seeded random LoRA matrices (cheap many users)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(template_dir) / "adapter_config.json", out_dir / "adapter_config.json")
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(Path(template_dir) / "adapter_model.safetensors")
    save_file({name: torch.randn(t.shape, generator=generator) * 0.8 for name, t in tensors.items()},
              out_dir / "adapter_model.safetensors")
    return out_dir


def lamp2m_users(user_ids: list[str]):
    """LaMP-2M users with a few history items each (for /v1/predict's retrieval)."""
    from oppu.data.records import HistoryItem, UserData

    tags = ["sci-fi", "comedy", "romance", "action"]
    users = []
    for n, user in enumerate(user_ids):
        history = [HistoryItem(id=f"{user}-{i}", fields={"description": CORPUS[(n * 5 + i) % len(CORPUS)],
                                                         "tag": tags[(n + i) % len(tags)]})
                   for i in range(4)]
        users.append(UserData(user_id=user, role="test", history=history, queries=[]))
    return users
