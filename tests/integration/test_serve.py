"""The serve app end to end: real Ray Serve, real HTTP, the openai client, adapters in moto S3."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import time

import pytest

from tests.unit.serving.tiny_setup import (
    build_tiny_base,
    lamp2m_users,
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app(s3_server, tmp_path_factory):
    """The app serving a tiny base with users' adapters in S3; yields what the tests need."""
    import ray
    from ray import serve

    from oppu.data.dataset import write_dataset
    from oppu.models import base_fingerprint
    from oppu.store import AdapterKey, AdapterStore, TokenStore
    from serve_apps.oppu_serve import build

    root = tmp_path_factory.mktemp("serve")
    base = build_tiny_base(root / "base")
    fingerprint = base_fingerprint(base)
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
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OPPU_ADMIN_TOKEN": ADMIN_TOKEN}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"model": str(base), "store": store_uri, "data": str(data_dir), "gpu_slots": "8",
                     "host_cache_adapters": "16", "max_batch_size": "8", "adapter_check_ttl_s": "0.5",
                     "max_prompt_tokens": "256", "max_tokens_limit": "16", "default_max_tokens": "6",
                     "num_cpus_per_replica": "1"}), name="oppu", route_prefix="/")
    try:
        yield {"url": f"http://127.0.0.1:{port}", "base": base, "adapters": adapters, "tokens": user_tokens,
               "store": store, "fingerprint": fingerprint}
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


def completion(user: str | None, token: str, prompt: str = PROMPT, max_tokens: int = 6):
    model = "base" if user is None else f"base:{user}"
    return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens}, auth(token)


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


def test_openai_client_completions_chat_streaming_and_models(app):
    import openai

    client = openai.OpenAI(base_url=f"{app['url']}/v1", api_key=app["tokens"]["bob"], max_retries=0)
    expected = peft_greedy(app["base"], app["adapters"]["bob"], [PROMPT], 6)[0]
    assert client.completions.create(model="base:bob", prompt=PROMPT, max_tokens=6).choices[0].text == expected
    chat = client.chat.completions.create(model="base:bob", max_tokens=6,
                                          messages=[{"role": "user", "content": PROMPT}])
    assert chat.choices[0].message.content == expected  # no chat template: the message text is the prompt
    streamed = client.completions.create(model="base:bob", prompt=PROMPT, max_tokens=6, stream=True)
    pieces = [chunk.choices[0].text for chunk in streamed]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1
    chat_stream = client.chat.completions.create(model="base:bob", max_tokens=6, stream=True,
                                                 messages=[{"role": "user", "content": PROMPT}])
    chunks = list(chat_stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert {m.id for m in client.models.list()} == {"base", "base:bob"}


def test_sse_wire_format_ends_with_done(app):
    import httpx

    path, body, headers = completion("alice", app["tokens"]["alice"])
    with httpx.stream("POST", app["url"] + path, json=body | {"stream": True}, headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_auth_and_request_errors(app):
    import httpx

    tokens, url = app["tokens"], app["url"]
    cases = [  # (request, expected status, expected error type)
        (completion("alice", "not-a-token"), 401, "unauthorized"),
        (("/v1/completions", completion("alice", "x")[1], {}), 401, "unauthorized"),
        (completion("alice", tokens["bob"]), 403, "forbidden"),
        (completion("../../etc", tokens["alice"]), 400, "invalid_user_id"),
        (completion("a:b", tokens["alice"]), 400, "invalid_user_id"),
        (completion("alice", tokens["alice"], max_tokens=17), 400, "request_too_large"),
        (completion("alice", tokens["alice"], prompt="robot " * 300), 400, "request_too_large"),
        (("/v1/completions", {"model": "other:alice", "prompt": "x"}, auth(tokens["alice"])), 404,
         "model_not_found"),
        (completion("dave", tokens["dave"]), 404, "adapter_not_found"),  # a token, but no adapter
        (("/v1/completions", {"prompt": "x"}, auth(tokens["alice"])), 400, "invalid_request"),
    ]
    responses = asyncio.run(post_all(url, [request for request, _, _ in cases]))
    for (request, status, kind), response in zip(cases, responses, strict=True):
        assert (response.status_code, response.json()["error"]["type"]) == (status, kind), (request, response.text)
    admin = httpx.post(url + "/v1/completions", json=completion("alice", ADMIN_TOKEN)[1], headers=auth(ADMIN_TOKEN))
    assert admin.status_code == 200, admin.text  # the admin token may use any adapter: alice's answer comes back
    assert admin.json()["choices"][0]["text"] == peft_greedy(app["base"], app["adapters"]["alice"], [PROMPT], 6)[0]
    models = httpx.get(url + "/v1/models", headers=auth(ADMIN_TOKEN)).json()
    assert {"base", "base:alice", "base:load19"} <= {m["id"] for m in models["data"]}


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
    assert after.status_code == 404 and after.json()["error"]["type"] == "adapter_not_found"
    assert httpx.delete(url + "/v1/users/carol/adapter", headers=auth(ADMIN_TOKEN)).status_code == 404


def test_load_many_concurrent_users_all_answered(app):
    import httpx

    tokens = app["tokens"]
    n_requests, concurrency = 200, 20

    async def run() -> list[tuple[int, float]]:
        limit = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=app["url"], timeout=120) as client:
            async def one(i: int) -> tuple[int, float]:
                user = LOAD_USERS[(i * 7) % len(LOAD_USERS)]
                path, body, headers = completion(user, tokens[user], max_tokens=4)
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
