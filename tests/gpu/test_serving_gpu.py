"""GPU correctness of serving (pytest -m gpu on a CUDA machine; skipped without one).

Eight users' LoRA adapters (ranks 4 and 8, random A and B) in one batch of eight rows, in float32
(bfloat16 flips near-ties; ../shared/gpu/README.md): each row's greedy tokens must be, token for
token, what PEFT's ``generate`` gives that user's PEFT model for the prompt alone. Three decode
paths: the continuous batcher (the serve app's replica), the engine's static KV cache, and its
CUDA-graph replay of the compiled decode step (``compile_decode``; CUDA only).

``OPPU_TEST_DEVICE=cpu`` runs the same checks on the CPU (all but the CUDA-graph path).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("OPPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                   reason="needs a CUDA device")]

pytest.importorskip("peft")

from tests.unit.serving.tiny_setup import (  # noqa: E402
    WORDS,
    build_tiny_base,
    make_user_adapter,
    publish_adapter,
    reseeded_adapter,
)

USERS = [f"u{i}" for i in range(8)]
PROMPTS = [" ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(2 + 3 * i)) for i in range(len(USERS))]
MAX_NEW_TOKENS = 16
FINGERPRINT = "tinybase00000000"
TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny base, each user's PEFT adapter directory and its adapter as the replica loads it."""
    from oppu.serving.adapters import AdapterShape, decode_adapter
    from oppu.store import AdapterKey, AdapterStore

    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    root = tmp_path_factory.mktemp("serving")
    base = build_tiny_base(root / "base")
    templates = {rank: make_user_adapter(base, root / f"template-r{rank}", seed=rank, rank=rank)
                 for rank in (4, 8)}
    store = AdapterStore(str(root / "store"))
    shape = AdapterShape(FINGERPRINT, max_rank=8, target_modules=TARGETS)
    adapters, loaded = {}, {}
    for i, user in enumerate(USERS):
        adapters[user] = reseeded_adapter(templates[4 if i % 2 else 8], root / f"adapter-{user}", seed=100 + i)
        publish_adapter(store, "LaMP-2M", FINGERPRINT, user, adapters[user])
        manifest, files = store.read_files(AdapterKey("LaMP-2M", FINGERPRINT, "oppu", user))
        loaded[user] = decode_adapter(manifest, files, shape)
    yield base, adapters, loaded
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def load_base(base):
    from oppu.models import load_model

    return load_model(base, device=DEVICE, dtype=torch.float32)


@pytest.fixture(scope="module")
def peft_answers(served) -> list[list[int]]:
    """Each user's prompt alone through PEFT ``generate`` (greedy, float32), cut at end of sequence."""
    from peft import PeftModel

    from oppu.serving.engine import GenerationEngine

    base, adapters, _ = served
    answers = []
    for user, prompt in zip(USERS, PROMPTS, strict=True):
        model, tokenizer = load_base(base)
        bare = GenerationEngine(model, tokenizer, None)  # the engine's own encoding and end-of-sequence ids
        eos, encode = bare.eos_ids, bare.encode
        model = PeftModel.from_pretrained(model, adapters[user]).eval()
        ids = torch.tensor([encode(prompt)], device=DEVICE)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=list(eos))
        new = out[0, ids.shape[1]:].tolist()
        answers.append(new[:next((k for k, t in enumerate(new) if t in eos), len(new))])
    assert len({tuple(a) for a in answers}) > 1, "every user got the same answer: personalization not visible"
    return answers


def engine(base, **options):
    from oppu.serving.engine import GenerationEngine, LoraSlotsConfig

    model, tokenizer = load_base(base)
    return GenerationEngine(model, tokenizer, LoraSlotsConfig(len(USERS), 8, TARGETS), **options)


@pytest.mark.parametrize("compile_lora", [False, True], ids=["eager-lora", "compiled-lora"])
def test_the_continuous_batcher_answers_each_user_as_peft_generate_does(served, peft_answers, compile_lora):
    from oppu.serving.sampling import SamplingParams
    from oppu.serving.scheduler import ContinuousBatcher
    from oppu.serving.sequences import FinishEvent, SequenceRequest, TokenEvent

    base, _, loaded = served
    eng = engine(base, compile_lora=compile_lora)  # compiled: the replica's compile_lora_decode, CUDA only
    batcher = ContinuousBatcher(eng, max_batch_size=len(USERS), max_waiting=len(USERS))
    tokens = {user: [] for user in USERS}
    finished = set()

    def sink(user):
        def receive(event):
            if isinstance(event, TokenEvent):
                tokens[user].append(event.token_id)
            elif isinstance(event, FinishEvent):
                finished.add(user)
            else:
                raise AssertionError(f"{user}: {event}")
        return receive

    for user, prompt in zip(USERS, PROMPTS, strict=True):
        batcher.submit(SequenceRequest(eng.encode(prompt), loaded[user], MAX_NEW_TOKENS,
                                       SamplingParams(temperature=0.0)), sink(user))
    for _ in range(10 * MAX_NEW_TOKENS):
        if len(finished) == len(USERS):
            break
        batcher.step()
    assert [tokens[user] for user in USERS] == peft_answers
    # All eight were prefilled together, and decoded together until they ended.
    assert batcher.stats.prefill_chunks == 1
    assert batcher.stats.max_running == sum(1 for answer in peft_answers if answer)
    if DEVICE == "cuda":  # ... through replayed CUDA graphs, not the eager fallback of a failed capture
        assert batcher.cache.graphs.enabled and batcher.cache.graphs.captures >= 2, batcher.cache.graphs.error


@pytest.mark.parametrize("options", [
    {"static_cache": True},
    pytest.param({"cuda_graphs": True, "compile_step": True},
                 marks=pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need CUDA")),
], ids=["static-cache", "cuda-graphs-compiled"])
def test_the_engine_decode_answers_each_user_as_peft_generate_does(served, peft_answers, options):
    from oppu.serving.engine import GenerationRow

    base, _, loaded = served
    eng = engine(base, **options)
    rows = [GenerationRow(eng.encode(prompt), loaded[user], MAX_NEW_TOKENS) for user, prompt in zip(USERS, PROMPTS,
                                                                                                    strict=True)]
    assert eng.generate(rows) == peft_answers
    assert eng.generate(rows[::-1]) == peft_answers[::-1]  # the captured decoder starts clean again
