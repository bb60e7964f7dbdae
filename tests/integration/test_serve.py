"""The serve app end to end: real Ray Serve, real HTTP, the openai client, adapters in moto S3."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import time

import pytest

from tests.unit.serving.tiny_setup import (
    build_tiny_base,
    lamp2m_users,
    load_tiny_base,
    make_user_adapter,
    peft_greedy,
    publish_adapter,
    reseeded_adapter,
)

pytestmark = pytest.mark.integration

TASK = "LaMP-2M"
ADMIN_TOKEN = "admin-secret-for-tests"
PROMPT = "the dark space movie about a robot"
USERS = ["alice", "bob", "carol"]
LOAD_USERS = [f"load{i:02d}" for i in range(20)]
# A chat template for the "limits" app's copy of the base (the tiny tokenizer has none).
CHAT_TEMPLATE = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }} {{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ bos_token }}assistant{% endif %}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app(s3_server, tmp_path_factory):
    """Two apps over one store: "oppu" (the tiny base, users' adapters in S3) and "limits" (a copy of
    the base with a chat template, one batch row, no waiting room and a 1 s request timeout)."""
    import ray
    from ray import serve

    from oppu.data.dataset import write_dataset
    from oppu.models import base_fingerprint
    from oppu.store import AdapterKey, AdapterStore, TokenStore
    from serve_apps.oppu_serve import build

    root = tmp_path_factory.mktemp("serve")
    base = build_tiny_base(root / "base")
    fingerprint = base_fingerprint(base)
    chat_base = root / "chatbase"
    shutil.copytree(base, chat_base)
    config_path = chat_base / "tokenizer_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"chat_template": CHAT_TEMPLATE}))
    store_uri = f"s3://{s3_server['bucket']}/serve-{os.getpid()}"
    store, tokens = AdapterStore(store_uri), TokenStore(store_uri)
    adapters = {user: make_user_adapter(base, root / user, seed=i) for i, user in enumerate(USERS)}
    for i, user in enumerate(["mallory", *LOAD_USERS]):
        adapters[user] = reseeded_adapter(adapters["alice"], root / user, seed=100 + i)
    for user, adapter_dir in adapters.items():
        publish_adapter(store, TASK, fingerprint, user, adapter_dir)
    # mallory's weights are overwritten after publishing: the sha256 in the manifest no longer matches.
    version = store.latest(AdapterKey(TASK, fingerprint, "oppu", "mallory")).version
    store._fs.pipe_file(f"{store._root}/{TASK}/{fingerprint}/oppu/mallory/{version}/adapter_model.safetensors",
                        b"corrupted")
    user_tokens = {user: tokens.create(user) for user in [*USERS, "mallory", "dave", *LOAD_USERS]}
    data_dir = write_dataset(root / "data", TASK, lamp2m_users(USERS), meta={})

    os.environ["OPPU_ADMIN_TOKEN"] = ADMIN_TOKEN
    metrics_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             runtime_env={"env_vars": {"OPPU_ADMIN_TOKEN": ADMIN_TOKEN}})
    # Chosen once Ray's own processes hold their ports: picked before ray.init, one of them took it
    # first on a run of the whole suite (the proxy "Failed to bind to address '127.0.0.1:40049'").
    port = free_port()
    while port == metrics_port:
        port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"model": str(base), "store": store_uri, "data": str(data_dir), "gpu_slots": "8",
                     "host_cache_adapters": "16", "max_batch_size": "8", "adapter_check_ttl_s": "0.5",
                     "max_prompt_tokens": "256", "max_tokens_limit": "16", "default_max_tokens": "6",
                     "max_queued_requests": "32", "max_body_bytes": "16384", "prefill_chunk_tokens": "16",
                     "num_cpus_per_replica": "1"}), name="oppu", route_prefix="/")
    serve.run(build({"model": str(chat_base), "store": store_uri, "task": TASK, "gpu_slots": "1",
                     "host_cache_adapters": "1", "max_batch_size": "1", "max_queued_requests": "0",
                     "request_timeout_s": "1.0", "max_tokens_limit": "480", "max_prompt_tokens": "32",
                     "model_max_ongoing_requests": "8", "num_cpus_per_replica": "1"}),
              name="limits", route_prefix="/limits")
    try:
        yield {"url": f"http://127.0.0.1:{port}", "base": base, "adapters": adapters, "tokens": user_tokens,
               "store": store, "fingerprint": fingerprint, "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        serve.shutdown()
        ray.shutdown()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def post_all(url: str, requests: list[tuple[str, dict, dict]]) -> list:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post(path, json=body, headers=headers)
                                      for path, body, headers in requests))


def completion(user: str | None, token: str, prompt: str = PROMPT, max_tokens: int = 6, **options):
    model = "base" if user is None else f"base:{user}"
    return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                               "temperature": 0} | options, auth(token)


def test_batched_personalized_answers_equal_each_users_offline_peft_model(app):
    tokens = app["tokens"]
    responses = asyncio.run(post_all(app["url"], [
        completion("alice", tokens["alice"]), completion("bob", tokens["bob"]),
        completion("carol", tokens["carol"]), completion(None, tokens["alice"])]))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    texts = [r.json()["choices"][0]["text"] for r in responses]
    expected = [peft_greedy(app["base"], app["adapters"][user], [PROMPT], 6)[0] for user in USERS]
    expected.append(peft_greedy(app["base"], None, [PROMPT], 6)[0])
    assert texts == expected
    assert len(set(texts)) >= 3, texts  # personalized: users' answers differ


def test_greedy_rows_mixed_with_sampled_rows_equal_the_request_alone(app):
    tokens = app["tokens"]
    sampled = [completion("bob", tokens["bob"], max_tokens=16, temperature=1.3, top_p=0.9, seed=i,
                          presence_penalty=0.5) for i in range(5)]
    greedy = [completion("alice", tokens["alice"], max_tokens=6), completion(None, tokens["carol"], max_tokens=6)]
    responses = asyncio.run(post_all(app["url"], [sampled[0], greedy[0], *sampled[1:3], greedy[1], *sampled[3:]]))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert responses[1].json()["choices"][0]["text"] == peft_greedy(app["base"], app["adapters"]["alice"], [PROMPT], 6)[0]
    assert responses[4].json()["choices"][0]["text"] == peft_greedy(app["base"], None, [PROMPT], 6)[0]


def test_openai_client_completions_chat_streaming_and_models(app):
    import openai

    client = openai.OpenAI(base_url=f"{app['url']}/v1", api_key=app["tokens"]["bob"], max_retries=0)
    expected = peft_greedy(app["base"], app["adapters"]["bob"], [PROMPT], 6)[0]
    assert client.completions.create(model="base:bob", prompt=PROMPT, max_tokens=6,
                                     temperature=0).choices[0].text == expected
    chat = client.chat.completions.create(model="base:bob", max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": PROMPT}])
    assert chat.choices[0].message.content == expected  # no chat template: the message text is the prompt
    streamed = client.completions.create(model="base:bob", prompt=PROMPT, max_tokens=6, stream=True, temperature=0)
    pieces = [chunk.choices[0].text for chunk in streamed]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1
    chat_stream = client.chat.completions.create(model="base:bob", max_tokens=6, stream=True, temperature=0,
                                                 messages=[{"role": "user", "content": PROMPT}])
    chunks = list(chat_stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert {m.id for m in client.models.list()} == {"base", "base:bob"}
    assert client.models.retrieve("base:bob").id == "base:bob"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("base:alice")  # another user's model is not visible to bob


def test_openai_client_sampling_seed_stop_n_logprobs_and_usage(app):
    import openai

    client = openai.OpenAI(base_url=f"{app['url']}/v1", api_key=app["tokens"]["bob"], max_retries=0)
    kwargs = {"model": "base:bob", "prompt": PROMPT, "max_tokens": 16}
    first = client.completions.create(**kwargs, temperature=1.2, seed=11).choices[0].text
    assert client.completions.create(**kwargs, temperature=1.2, seed=11).choices[0].text == first  # same seed
    seeds = {client.completions.create(**kwargs, temperature=1.2, seed=s).choices[0].text for s in range(4)}
    assert len(seeds) > 1  # the temperature is honoured, not greedy

    greedy = client.completions.create(**kwargs, temperature=0).choices[0].text
    words = greedy.split()
    stop = words[3]
    cut = client.completions.create(**kwargs, temperature=0, stop=[stop, "never-there"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == greedy[:greedy.index(stop)] and stop not in cut.choices[0].text
    streamed_cut = "".join(c.choices[0].text for c in client.completions.create(
        **kwargs, temperature=0, stop=stop, stream=True))
    assert streamed_cut == cut.choices[0].text

    several = client.completions.create(**kwargs, temperature=0, n=3)
    assert [c.index for c in several.choices] == [0, 1, 2] and {c.text for c in several.choices} == {greedy}
    assert several.usage.completion_tokens == 3 * 16

    with_logprobs = client.completions.create(**kwargs, temperature=0, logprobs=2)
    logprobs = with_logprobs.choices[0].logprobs
    assert "".join(logprobs.tokens).replace(" ", "") == greedy.replace(" ", "")
    assert len(logprobs.token_logprobs) == 16 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    chat = client.chat.completions.create(model="base:bob", max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=3, messages=[{"role": "user", "content": PROMPT}])
    assert len(chat.choices[0].logprobs.content) == 4
    assert all(len(entry.top_logprobs) == 3 for entry in chat.choices[0].logprobs.content)

    chunks = list(client.chat.completions.create(model="base:bob", max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": PROMPT}]))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(chunk.usage is None for chunk in chunks[:-1])

    # Chat: n streamed choices, each announced once, each ending; a stop string cuts the message.
    chunks = list(client.chat.completions.create(model="base:bob", max_tokens=16, temperature=0, stream=True, n=2,
                                                 messages=[{"role": "user", "content": PROMPT}]))
    by_choice = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
                 for i in (0, 1)}
    assert by_choice == {0: greedy, 1: greedy}
    assert sum(1 for c in chunks if c.choices[0].delta.role == "assistant") == 2
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1]
    stopped = client.chat.completions.create(model="base:bob", max_tokens=16, temperature=0, stop=stop,
                                             messages=[{"role": "user", "content": PROMPT}])
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == (cut.choices[0].text, "stop")


def test_sse_wire_format_ends_with_done(app):
    import httpx

    path, body, headers = completion("alice", app["tokens"]["alice"])
    with httpx.stream("POST", app["url"] + path, json=body | {"stream": True}, headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_errors_in_openai_shape_with_the_field_named(app):
    import httpx

    tokens, url = app["tokens"], app["url"]
    alice = auth(tokens["alice"])
    cases = [  # (request, expected status, expected code, expected param)
        (completion("alice", "not-a-token"), 401, "unauthorized", None),
        (("/v1/completions", completion("alice", "x")[1], {}), 401, "unauthorized", None),
        (completion("alice", tokens["bob"]), 403, "forbidden", "model"),
        (completion("../../etc", tokens["alice"]), 400, "invalid_user_id", "model"),
        (completion("a:b", tokens["alice"]), 400, "invalid_user_id", "model"),
        (completion("alice", tokens["alice"], max_tokens=17), 400, "request_too_large", "max_tokens"),
        (completion("alice", tokens["alice"], prompt="robot " * 300), 400, "request_too_large", "prompt"),
        (("/v1/completions", {"model": "other:alice", "prompt": "x"}, alice), 404, "model_not_found", "model"),
        (completion("dave", tokens["dave"]), 404, "adapter_not_found", "model"),  # a token, but no adapter
        (("/v1/completions", {"prompt": "x"}, alice), 400, "invalid_value", "model"),
        (completion("alice", tokens["alice"], frobnicate=True), 400, "unknown_field", "frobnicate"),
        (completion("alice", tokens["alice"], echo=True), 400, "unsupported_field", "echo"),
        (completion("alice", tokens["alice"], temperature=5), 400, "invalid_value", "temperature"),
        (("/v1/chat/completions", {"model": "base:alice", "messages": [{"role": "user", "content": "x"}],
                                   "tools": [{"type": "function", "function": {"name": "f"}}]}, alice),
         400, "unsupported_field", "tools"),
        (("/v1/chat/completions", {"model": "base:alice", "messages": [{"role": "wizard", "content": "x"}]},
          alice), 400, "invalid_value", "messages[0].role"),
        (("/v1/predict", {"task": TASK, "user": "alice", "input": "not a LaMP question"}, alice),
         400, "invalid_input", "input"),
        (("/v1/predict", {"task": "LaMP-3", "user": "alice", "input": "x"}, alice), 400, "invalid_value", "task"),
        (("/v1/predict", {"task": TASK, "user": "alice", "input": "x", "extra": 1}, alice),
         400, "unknown_field", "extra"),
    ]
    responses = asyncio.run(post_all(url, [request for request, _, _, _ in cases]))
    for (request, status, code, param), response in zip(cases, responses, strict=True):
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert (response.status_code, error["code"], error["param"]) == (status, code, param), (request, response.text)
    assert responses[0].json()["error"]["type"] == "authentication_error"
    assert responses[5].json()["error"]["type"] == "invalid_request_error"

    unknown = httpx.get(url + "/v1/nothing-here", headers=alice)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "route_not_found"
    wrong_method = httpx.get(url + "/v1/completions", headers=alice)
    assert wrong_method.status_code == 405 and set(wrong_method.json()["error"]) == {"message", "type", "param",
                                                                                      "code"}
    too_big = httpx.post(url + "/v1/completions", headers=alice, json={"model": "base", "prompt": "x" * 20000})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
    bad_json = httpx.post(url + "/v1/completions", headers=alice | {"Content-Type": "application/json"},
                          content=b"{nope")
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    # The token is checked before anything else: without one, a malformed or oversized body is still a 401.
    for content in (b"{nope", b"x" * 20000):
        anonymous = httpx.post(url + "/v1/chat/completions", content=content)
        assert anonymous.status_code == 401, anonymous.text

    admin = httpx.post(url + "/v1/completions", json=completion("alice", ADMIN_TOKEN)[1], headers=auth(ADMIN_TOKEN))
    assert admin.status_code == 200, admin.text  # the admin token may use any adapter: alice's answer comes back
    assert admin.json()["choices"][0]["text"] == peft_greedy(app["base"], app["adapters"]["alice"], [PROMPT], 6)[0]
    models = httpx.get(url + "/v1/models", headers=auth(ADMIN_TOKEN)).json()
    assert {"base", "base:alice", "base:load19"} <= {m["id"] for m in models["data"]}


def test_health_says_ready_once_the_model_is_loaded(app):
    import httpx

    health = httpx.get(app["url"] + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_corrupt_adapter_fails_only_its_own_request(app):
    tokens = app["tokens"]
    requests = [completion("mallory", tokens["mallory"]), completion("alice", tokens["alice"]),
                completion("load00", tokens["load00"])]
    responses = asyncio.run(post_all(app["url"], requests))
    assert responses[0].status_code == 422 and "sha256" in responses[0].json()["error"]["message"]
    assert [r.status_code for r in responses[1:]] == [200, 200]
    expected = peft_greedy(app["base"], app["adapters"]["load00"], [PROMPT], 6)[0]
    assert responses[2].json()["choices"][0]["text"] == expected
    again = asyncio.run(post_all(app["url"], [completion("alice", tokens["alice"])]))[0]
    assert again.status_code == 200  # the replica stayed healthy


def test_predict_uses_the_users_history_and_matches_offline_evaluation(app):
    from oppu.retrieval import BM25Retriever
    from oppu.tasks import get_task

    task = get_task(TASK)
    query = {"description": "a funny robot movie in space"}
    body = {"task": "LaMP_2M", "user": "carol", "input": task.lamp_input(query), "k": 2}
    response = asyncio.run(post_all(app["url"], [("/v1/predict", body, auth(app["tokens"]["carol"]))]))[0]
    assert response.status_code == 200, response.text
    history = lamp2m_users(USERS)[2].history
    retrieved = [item.fields for item in BM25Retriever(task, history).top_k(query, 2)]
    prompt = task.build_prompt(query, retrieved=retrieved)
    raw = peft_greedy(app["base"], app["adapters"]["carol"], [prompt], min(task.max_new_tokens, 16))[0]
    assert response.json()["raw"] == raw
    assert response.json()["prediction"] == task.parse_output(raw)
    assert response.json()["retrieved"] == 2


def test_chat_template_renders_system_user_assistant_turns(app):
    """The "limits" app's base has a chat template: the prompt is the template's text, no extra BOS."""
    import openai
    import torch

    client = openai.OpenAI(base_url=f"{app['url']}/limits/v1", api_key=ADMIN_TOKEN, max_retries=0)
    messages = [{"role": "system", "content": "a sad movie"}, {"role": "user", "content": "the dark space"},
                {"role": "assistant", "content": "robot"}, {"role": "user", "content": "movie about a robot"}]
    answer = client.chat.completions.create(model="chatbase", messages=messages, max_tokens=6, temperature=0)
    model, tokenizer = load_tiny_base(app["base"])
    tokenizer.chat_template = CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tokenizer.bos_token_id and (ids[0] == tokenizer.bos_token_id).sum() == 5
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[:generated.index(tokenizer.eos_token_id)]
    assert answer.choices[0].message.content == tokenizer.decode(generated, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == ids.shape[1]


def test_full_queue_answers_429_with_retry_after_and_timeouts_answer_504(app):
    """The "limits" app has one batch row, no waiting room and a 1 s request timeout."""
    import httpx

    url, headers = app["url"] + "/limits", auth(ADMIN_TOKEN)
    # Two choices need two rows: the second finds the only row taken and no room to wait.
    refused = httpx.post(url + "/v1/completions", headers=headers, timeout=30,
                         json={"model": "chatbase", "prompt": "king", "max_tokens": 2, "n": 2})
    assert refused.status_code == 429, refused.text
    assert refused.headers["Retry-After"] == "1" and refused.json()["error"]["code"] == "queue_full"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    # 470 tokens take longer than the app's request_timeout_s of 1 s: a stream ends with an in-band error ...
    long_body = {"model": "chatbase", "prompt": PROMPT, "max_tokens": 470, "temperature": 0}
    with httpx.stream("POST", url + "/v1/completions", json=long_body | {"stream": True}, headers=headers,
                      timeout=60) as running:
        assert running.status_code == 200
        events = [line for line in running.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0][6:])["choices"][0]["text"]  # it had started answering
    assert json.loads(events[-2][6:])["error"]["code"] == "timeout" and events[-1] == "data: [DONE]"
    # ... and a plain request with a 504 in OpenAI's shape.
    timed_out = httpx.post(url + "/v1/completions", headers=headers, timeout=30, json=long_body)
    assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == "timeout"
    after = httpx.post(url + "/v1/completions", headers=headers, timeout=30,
                       json={"model": "chatbase", "prompt": "king", "max_tokens": 2})
    assert after.status_code == 200  # the row was freed


def test_new_version_is_served_without_restart_and_delete_gives_404(app):
    import httpx

    tokens, url = app["tokens"], app["url"]
    first = httpx.post(url + "/v1/completions", json=completion("carol", tokens["carol"])[1],
                       headers=auth(tokens["carol"]), timeout=60).json()["choices"][0]["text"]
    newer = reseeded_adapter(app["adapters"]["alice"], app["adapters"]["carol"].parent / "carol-v2", seed=999)
    publish_adapter(app["store"], TASK, app["fingerprint"], "carol", newer)
    time.sleep(0.6)  # the app's adapter_check_ttl_s
    second = httpx.post(url + "/v1/completions", json=completion("carol", tokens["carol"])[1],
                        headers=auth(tokens["carol"]), timeout=60).json()["choices"][0]["text"]
    assert second == peft_greedy(app["base"], newer, [PROMPT], 6)[0] != first

    assert httpx.delete(url + "/v1/users/carol/adapter", headers=auth(tokens["bob"])).status_code == 403
    deleted = httpx.delete(url + "/v1/users/carol/adapter", headers=auth(tokens["carol"]))
    assert deleted.status_code == 200 and deleted.json()["deleted_versions"] == 2
    # At once, not after the TTL: the deletion is broadcast to the replicas' caches.
    after = httpx.post(url + "/v1/completions", json=completion("carol", tokens["carol"])[1],
                       headers=auth(tokens["carol"]), timeout=60)
    assert after.status_code == 404 and after.json()["error"]["code"] == "adapter_not_found"
    assert httpx.delete(url + "/v1/users/carol/adapter", headers=auth(ADMIN_TOKEN)).status_code == 404


def test_load_many_concurrent_users_all_answered_with_continuous_batching(app):
    import httpx
    from ray import serve

    tokens = app["tokens"]
    n_requests, concurrency = 200, 20

    async def run() -> list[tuple[int, float]]:
        limit = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=app["url"], timeout=120) as client:
            async def one(i: int) -> tuple[int, float]:
                user = LOAD_USERS[(i * 7) % len(LOAD_USERS)]
                path, body, headers = completion(user, tokens[user], max_tokens=4 + i % 9)
                async with limit:
                    started = time.perf_counter()
                    response = await client.post(path, json=body, headers=headers)
                    return response.status_code, time.perf_counter() - started
            return await asyncio.gather(*(one(i) for i in range(n_requests)))

    started = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - started
    latencies = sorted(latency for _, latency in results)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * len(latencies)) - 1]
    print(f"\nload: {n_requests} requests, {concurrency} concurrent, {len(LOAD_USERS)} users: "
          f"{n_requests / elapsed:.1f} req/s, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    assert [status for status, _ in results] == [200] * n_requests
    stats = serve.get_deployment_handle("model", app_name="oppu").stats.remote().result()
    print(f"scheduler: {stats['decode_steps']} decode steps, {stats['joined_running_batch']} sequences joined a "
          f"running batch, at most {stats['max_running']} rows")
    assert stats["joined_running_batch"] > 0 and stats["max_running"] > 1


def test_prometheus_metrics_have_latency_histograms_and_token_counters(app):
    """Ray exports the replicas' metrics for Prometheus (every earlier test has produced some)."""
    import httpx

    wanted = ["ray_oppu_serve_time_to_first_token_seconds_bucket", "ray_oppu_serve_inter_token_latency_seconds_bucket",
              "ray_oppu_serve_prompt_tokens", "ray_oppu_serve_completion_tokens"]
    def completion_tokens(text: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ray_oppu_serve_completion_tokens"))

    # Metrics are pushed to the exporter every few seconds, so the counters catch up in steps:
    # poll until the load test's tokens have all arrived (or the deadline passes).
    deadline = time.monotonic() + 90
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(app["metrics_url"], timeout=5).text
        except httpx.HTTPError:
            text = ""
        if all(name in text for name in wanted) and completion_tokens(text) >= 200 * 4:
            break
        time.sleep(2)
    assert all(name in text for name in wanted), [name for name in wanted if name not in text]
    assert completion_tokens(text) >= 200 * 4  # the load test alone generated at least this many


def test_erase_user_removes_adapters_and_tokens_and_tombstones_them(app):
    import httpx

    from oppu.erasure import is_tombstoned

    tokens, url = app["tokens"], app["url"]
    assert httpx.delete(url + "/v1/users/load19", headers=auth(tokens["bob"])).status_code == 403
    erased = httpx.delete(url + "/v1/users/load19", headers=auth(tokens["load19"]))
    assert erased.status_code == 200
    assert erased.json() | {"deleted_versions": 1, "tokens_revoked": 1} == erased.json()
    gone = httpx.post(url + "/v1/completions", json=completion("load19", ADMIN_TOKEN)[1], headers=auth(ADMIN_TOKEN),
                      timeout=60)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "adapter_not_found"
    assert httpx.post(url + "/v1/completions", json=completion("load19", tokens["load19"])[1],
                      headers=auth(tokens["load19"]), timeout=60).status_code == 401
    assert is_tombstoned(app["store"].root_uri, "load19")


def test_killing_the_deletion_log_fails_no_request_and_deletions_still_hold(app):
    """The deletion-events actor is a fast path: with it killed under load, every request is
    answered, and a deletion is honoured through the store within adapter_check_ttl_s."""
    import httpx
    import ray

    tokens, url = app["tokens"], app["url"]
    ray.kill(ray.get_actor("adapter_events_oppu", namespace="oppu_serve"))
    load = [completion(user, tokens[user]) for user in LOAD_USERS[:16]]
    answers = asyncio.run(post_all(url, load))
    assert [a.status_code for a in answers] == [200] * 16
    assert httpx.delete(url + "/v1/users/load16/adapter", headers=auth(tokens["load16"])).status_code == 200
    time.sleep(0.6)  # the app's adapter_check_ttl_s
    after = httpx.post(url + "/v1/completions", json=completion("load16", tokens["load16"])[1],
                       headers=auth(tokens["load16"]), timeout=60)
    assert after.status_code == 404
    answers = asyncio.run(post_all(url, [completion(user, tokens[user]) for user in LOAD_USERS[:8]]))
    assert [a.status_code for a in answers] == [200] * 8
