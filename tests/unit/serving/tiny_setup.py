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
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(base_dir).eval(), AutoTokenizer.from_pretrained(base_dir)


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


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy token ids of the user's PEFT model alone (or the bare base), one prompt, no padding."""
    import torch
    from peft import PeftModel

    model, tokenizer = load_tiny_base(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    generated = out[0, inputs["input_ids"].shape[1]:].tolist()
    return [t for t in generated[: generated.index(tokenizer.eos_token_id)]] if tokenizer.eos_token_id in \
        generated else generated
