"""Personalized inference: one frozen base, every user's LoRA adapter, batched together.

``config`` (the validated serve-app config), ``adapters`` (the host-memory adapter cache over the
store), ``engine`` (multi-LoRA greedy decoding with per-row adapter slots), ``replica`` and
``ingress`` (the Ray Serve deployments), ``auth``, ``events`` (deletion broadcast) and ``metrics``.
Heavy libraries are imported inside functions, so importing this package is cheap.
"""
