"""Personalized inference: one frozen base, every user's LoRA adapter, batched together.

``config`` (the validated serve-app config), ``adapters`` (the host-memory adapter cache over the
store), ``engine`` (the multi-LoRA model with per-row adapter slots, and its fixed-batch path),
``scheduler`` (continuous batching: sequences join and leave the running decode batch),
``sampling`` (per-row OpenAI sampling), ``textstream`` (incremental text and stop strings),
``openai_api`` (request checking, error shape, response formats), ``replica`` and ``ingress``
(the Ray Serve deployments; the ingress calls the replicas through ``model_calls`` and does its
per-user routes' work in ``user_routes``), ``auth``, ``events`` (deletion broadcast) and ``metrics``.
Heavy libraries are imported inside functions, so importing this package is cheap.
"""
