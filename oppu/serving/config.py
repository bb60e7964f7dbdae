"""The serve app's configuration: Ray Serve builder arguments validated into one pydantic model.

``serve run serve_apps.oppu_serve:build model=DIR/base store=DIR/adapters data=DIR/data`` passes
every ``key=value`` as text; the same keys appear under ``args:`` in ``serve_apps/config.yaml``.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from oppu.errors import ConfigError


class ServeConfig(BaseModel):
    """Everything the OPPU serve app needs; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="base model: a local HF model dir or an fsspec URI (DIR/base)")
    store: str = Field(description="adapter store root URI (file:///..., s3://bucket/prefix)")
    # Apart from the adapters on a cluster, under credentials of their own: whoever can write
    # adapters (training jobs, the serving pods' delete right) must not be able to mint tokens.
    tokens: str | None = Field(None, description="token store root URI (`oppu token --tokens`); default: "
                               "the adapter store's root, fine for one machine, not for a cluster")
    tokens_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options of the token root (no secrets: its S3 keys "
        "come from OPPU_TOKENS_AWS_ACCESS_KEY_ID / OPPU_TOKENS_AWS_SECRET_ACCESS_KEY)")
    data: str | None = Field(None, description="prepared data set dir for /v1/predict's history")
    task: str | None = Field(None, description="task the adapters were trained for (default: data set's)")
    variant: str = Field("oppu", description="adapter variant to serve")
    model_id: str | None = Field(None, description="public id of the base model (default: dir name)")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu' or 'cuda'")
    dtype: str = Field("auto", description="'auto' (bfloat16 on cuda, float32 on cpu), 'float32', 'bfloat16'")
    gpu_slots: int = Field(32, ge=1, description="adapters resident in the multi-LoRA model per replica")
    host_cache_adapters: int = Field(256, ge=1, description="adapter state dicts kept in host memory")
    max_lora_rank: int = Field(16, ge=1, description="largest LoRA rank a slot holds")
    # Every Llama projection by default, so adapters of any subset load (the quickstart's target
    # all seven; the paper's q/v only); name fewer to save slot memory on large models.
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="modules that carry LoRA slots (a superset of the adapters' targets)")
    adapter_check_ttl_s: float = Field(5.0, ge=0, description="how long a cached adapter is trusted "
                                       "before the store is asked for a newer version")
    history_check_ttl_s: float = Field(5.0, ge=0, description="how often /v1/predict's copy of the users' "
                                       "histories (data) is checked for additions made elsewhere")
    max_batch_size: int = Field(8, ge=1, description="sequences decoded together in one forward pass (the running "
                                "batch; requests join and leave it at step boundaries)")
    cuda_graphs: bool = Field(True, description="on CUDA, capture each prefill and decode shape as a CUDA graph "
                              "and replay it (off: every forward launched from Python, ~100 ms a 7B decode step)")
    compile_lora_decode: bool = Field(False, description="on CUDA, run the adapters' one-token decode update "
                                      "through torch.compile (two fused kernels a layer instead of ~19 small ones "
                                      "captured in each graph); compiled once per replica at warm-up")
    prefill_chunk_tokens: int = Field(512, ge=1, description="prompt tokens prefilled between two decode steps "
                                      "(longer prompts are prefilled in chunks while running streams go on)")
    stream_interval_ms: float = Field(25.0, ge=0, description="a stream sends what was generated at most this "
                                      "often (the first token at once): each chunk costs Ray and HTTP work in the "
                                      "replica's process, which at many streams one chunk a token would make the limit")
    gil_switch_interval_ms: float = Field(0.5, gt=0, description="the replica process's interpreter switch "
                                          "interval (Python's default is 5): the scheduler thread gives up the "
                                          "lock at every torch call and, with the event loop busy, waits up to "
                                          "this long to get it back, several times a decode step")
    max_queued_requests: int = Field(64, ge=0, description="sequences a replica holds waiting for a batch row; "
                                     "more get HTTP 429 with Retry-After")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After header of a 429")
    request_timeout_s: float = Field(300.0, ge=0, description="a request still waiting or generating after "
                                     "this long ends with HTTP 504 (0: no limit)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get HTTP 413")
    max_prompt_tokens: int = Field(1024, ge=1, description="longer prompts get HTTP 400")
    max_tokens_limit: int = Field(256, ge=1, description="larger max_tokens get HTTP 400")
    prompt_format: Literal["auto", "plain", "chat"] = Field(
        "auto", description="how /v1/predict renders a task prompt for the base model (auto: the chat "
        "template where the tokenizer has one); a user's adapter is prompted as its manifest records")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request gives none")
    max_n: int = Field(8, ge=1, description="the largest n (choices per request) accepted")
    # Greedy by default: what offline evaluation does and what clients of this server have relied on
    # (OpenAI's own default is 1.0; set it here to match OpenAI).
    default_temperature: float = Field(0.0, ge=0, le=2, description="temperature when a request gives none "
                                       "(0: greedy; OpenAI's default is 1)")
    num_replicas: int = Field(1, ge=1, description="model replicas")
    routing_buckets: int = Field(64, ge=1, description="opaque routing keys user ids hash into for Ray "
                                 "Serve's multiplexed routing (the ids themselves never reach Serve's "
                                 "metrics or logs; oppu/serving/privacy.py)")
    model_max_ongoing_requests: int = Field(128, ge=1, description="requests a model replica takes at "
                                            "once (>= max_batch_size, or batches cannot fill); more wait in "
                                            "the ingress's handle, at most max_queued_requests of them")
    ingress_max_ongoing_requests: int = Field(512, ge=1, description="requests an ingress replica takes at once")
    num_gpus_per_replica: float = Field(0, ge=0, description="GPUs each model replica reserves")
    num_cpus_per_replica: float = Field(1, ge=0, description="CPUs each model replica reserves")
    # An in-place redeploy (a new base, any changed argument) replaces every replica. With a surge
    # a replacement starts, and is ready, before the replica it replaces stops; without one Serve
    # stops first, one replica at a time: the others answer meanwhile, but a lone replica leaves none.
    max_surge_percent: int | None = Field(
        None, ge=0, le=100, description="extra model replicas during an in-place redeploy, in percent of "
        "num_replicas (Ray Serve's max_surge_percent): old replicas answer until their replacements are "
        "ready, which needs room for the extra ones (GPUs); default: 100 with one replica, else 0 (the "
        "others answer while one is replaced). The ingress (no CPU, no GPU) always has 100")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="level of the replicas' logs (Ray Serve's and oppu's): "
        "/tmp/ray/session_latest/logs/serve/ on each node")
    log_encoding: Literal["TEXT", "JSON"] = Field("TEXT", description="TEXT lines or one JSON object a line")
    access_log: bool = Field(True, description="one log line per request (method, route, status, latency)")

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.gpu_slots < self.max_batch_size:
            raise ValueError(f"gpu_slots ({self.gpu_slots}) must be >= max_batch_size "
                             f"({self.max_batch_size}): every row of a batch needs its own slot")
        if self.host_cache_adapters < self.gpu_slots:
            raise ValueError(f"host_cache_adapters ({self.host_cache_adapters}) must be >= "
                             f"gpu_slots ({self.gpu_slots})")
        if self.model_max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"model_max_ongoing_requests ({self.model_max_ongoing_requests}) must be >= "
                             f"max_batch_size ({self.max_batch_size})")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds "
                             f"max_tokens_limit ({self.max_tokens_limit})")
        if ":" in (self.model_id or ""):
            raise ValueError(f"model_id {self.model_id!r} must not contain ':' (it separates the user)")
        return self

    @property
    def model_surge_percent(self) -> int:
        """``max_surge_percent`` of the model deployment: as given, else 100 for a lone replica, 0 for more."""
        if self.max_surge_percent is not None:
            return self.max_surge_percent
        return 100 if self.num_replicas == 1 else 0

    @property
    def token_root(self) -> str:
        return self.tokens or self.store

    @property
    def base_model_id(self) -> str:
        return self.model_id or PurePosixPath(self.model.rstrip("/")).name

    def logging_config(self) -> dict:
        """Ray Serve's ``LoggingConfig`` of every deployment of the app, as a dict."""
        return {"log_level": self.log_level, "encoding": self.log_encoding,
                "enable_access_log": self.access_log}


def load_serve_config(args: dict) -> ServeConfig:
    """Validate builder ``args`` (text values from the command line, or YAML values)."""
    args = dict(args)
    if isinstance(args.get("target_modules"), str):
        args["target_modules"] = [m.strip() for m in args["target_modules"].split(",") if m.strip()]
    try:
        return ServeConfig(**args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']} "
                             f"(got {err.get('input')!r})" for err in exc.errors())
        raise ConfigError(f"bad serve app arguments: {problems}") from None
