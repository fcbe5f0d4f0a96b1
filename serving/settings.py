"""The server's settings: environment variables ``NTU_SERVE_<NAME>`` (or a ``Settings(...)`` in code).

Every value is checked when the app is built: a mistyped or out-of-range value stops the server with a
message naming the variable, and so does an unknown ``NTU_SERVE_*`` variable (a typo would otherwise
be ignored in silence). ``create_app(Settings(bundle_dir=..., api_key=...))`` builds an app with
explicit values (tests); ``serving.app:app`` reads the environment.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

KiB = 1024
MiB = 1 << 20


_WITHOUT_ENVIRONMENT = contextvars.ContextVar("settings_without_environment", default=False)


class Settings(BaseSettings):
    """Server configuration; each field is the variable ``NTU_SERVE_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="NTU_SERVE_", frozen=True, extra="forbid")

    # -- the model --
    bundle_dir: Path = Field(
        Path("data/export/bundle"), description="the export stage's bundle directory (checksummed)"
    )
    model_uri: str | None = Field(
        None,
        description="load from MLflow instead of bundle_dir, e.g. models:/ntu120-ctrgcn@champion "
        "(store: MLFLOW_TRACKING_URI, default sqlite:///mlflow.db); the downloaded bundle is verified "
        "exactly like a local one",
    )
    runtime: Literal["auto", "fp32", "int8", "tensorrt"] = Field(
        "auto",
        description="auto: the bundle's TensorRT engine when there is one and CUDA works, else the fp32 "
        "ONNX model on the best ONNX Runtime provider (TensorRT, CUDA, CPU); fp32 / int8: that ONNX "
        "model; tensorrt: the engine or nothing",
    )
    workers: int = Field(
        0,
        ge=0,
        description="model calls run at once (0 = one per core with the CPU provider, else 1; a TensorRT "
        "engine always runs one call at a time)",
    )
    threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads per model call (0 = cores / workers, at least 1)"
    )
    solo: bool = Field(
        True,
        description="run clips whose second person is absent through the bundle's one-person graph "
        "(model.solo.onnx: the same scores from half the work; fp32 runtime only)",
    )
    tensorrt_cache_dir: str = Field(
        "~/.cache/ntu-serve/tensorrt",
        description="where ONNX Runtime's TensorRT provider keeps the engines and timing caches it builds "
        "(a restart reuses them instead of building for minutes); used only when that provider is there",
    )

    # -- security --
    api_key: SecretStr | None = Field(
        None,
        description="when set, /v1/* require it in the X-API-Key header (the WebSocket also takes the "
        "api_key query parameter); /health, /ready and /metrics stay open",
    )
    host: str = Field("127.0.0.1", description="`python -m serving` binds here (loopback only by default)")
    port: int = Field(8000, ge=1, le=65535, description="`python -m serving` listens here")

    # -- input limits --
    max_body_bytes: int = Field(16 * MiB, ge=1024, description="largest JSON body")
    max_message_bytes: int = Field(
        64 * KiB,
        ge=1024,
        description="largest WebSocket message (a two-person frame is about 4 KiB of JSON; parsing a "
        "16 MiB message held the event loop, every client's requests, for 1.5 s)",
    )
    max_upload_bytes: int = Field(32 * MiB, ge=1024, description="largest /v1/predict/file multipart body")
    max_frames: int = Field(1200, ge=1, description="longest clip accepted, in frames (NTU: <= 300)")
    max_batch: int = Field(32, ge=1, description="most clips in one /v1/predict/batch request")
    top_k: int = Field(5, ge=1, description="labels listed per prediction (capped at the class count)")

    # -- streaming (WS /v1/stream) --
    stream_window: int = Field(90, ge=1, description="frames kept per connection (a sliding window)")
    stream_stride: int = Field(
        8, ge=1, description="a prediction every this many frames, once the window is full"
    )

    # -- video (POST /v1/predict/video) --
    pose_dir: Path = Field(
        Path("data/export_pose"),
        description="the export_pose stage's output (checksummed); without it only the video endpoint "
        "answers 503",
    )
    video_bundle_dir: Path | None = Field(
        Path("data/export_video/bundle"),
        description="the export_video stage's bundle: the action model fine-tuned on the pose estimator's "
        "skeletons, used for videos (checksummed like bundle_dir; when the directory does not exist, "
        "videos get the clip model, as when it is set empty; when it fails verification, the video "
        "endpoint answers 503)",
    )
    max_video_bytes: int = Field(50 * MiB, ge=1024, description="largest /v1/predict/video upload")
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request whose body stops arriving for this long (before its first part or between "
        "two) is answered 408 (uvicorn itself would wait for ever)",
    )
    video_max_frames: int = Field(900, ge=1, description="longest video analysed, in frames")
    video_min_frames: int = Field(16, ge=1, description="shortest video analysed, in frames")
    video_fps: float = Field(
        30.0,
        ge=0,
        description="frame rate videos are analysed at (the action model's, NTU's 30): a 60 fps video "
        "gives every other frame, a 25 fps one repeats every fifth; 0 keeps every decoded frame",
    )
    video_window: int = Field(
        150, ge=0, description="frames per action window of a long video (0: the whole video at once)"
    )
    video_stride: int = Field(75, ge=1, description="frames between the starts of action windows")
    video_threshold: float = Field(0.3, gt=0, lt=1, description="person-centre probability a detection needs")
    video_flip_test: bool = Field(
        False, description="average each person crop with its mirror (better joints, twice the cost)"
    )

    # -- micro-batching --
    micro_batching: bool | None = Field(
        None,
        description="group concurrent requests into one model call; unset: on when the model runs on a "
        "GPU (where a batch costs little more than one clip), off on CPU (where a batch costs the sum of "
        "its clips and the wait only adds latency: benchmarks/serve_load.py)",
    )
    batch_window_ms: float = Field(
        3.0, ge=0, le=1000, description="how long a batch waits for more requests after its first"
    )
    max_batch_size: int = Field(32, ge=1, description="most clips in one grouped model call")
    inline_when_alone: bool = Field(
        True,
        description="while one client is the only one served (its request the only one in flight, no "
        "other connection active within 100 ms, no stream open), run its clip's model call on the event "
        "loop instead of a worker thread: no hand-off there and back (serving/activity.py)",
    )

    @classmethod
    def without_environment(cls, **values) -> Settings:
        """These values over the defaults, no ``NTU_SERVE_*`` variable read: for the pipeline's stages,
        whose outputs must not depend on a server's environment that DVC cannot see (an exported
        ``NTU_SERVE_MODEL_URI`` made evaluate_video score the registry's champion instead of its
        bundles). Validated as the environment's values are."""
        token = _WITHOUT_ENVIRONMENT.set(True)
        try:
            return cls.model_validate({**cls.model_construct().model_dump(), **values})
        finally:
            _WITHOUT_ENVIRONMENT.reset(token)

    @field_validator("video_bundle_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key", mode="before")
    @classmethod
    def _no_empty_key(cls, value):
        # An empty key made every HTTP /v1/* request a 401 while a WebSocket sending an empty
        # api_key was let in: refuse it rather than guess whether it meant "no key"
        if isinstance(value, str | SecretStr):
            text = value.get_secret_value() if isinstance(value, SecretStr) else value
            if not text.strip():
                raise ValueError("the API key is empty: unset NTU_SERVE_API_KEY to serve without one")
            # HTTP header values are Latin-1 bytes and the WebSocket's query parameter is UTF-8: a
            # key beyond visible ASCII matched on one and never on the other
            if not all("!" <= c <= "~" for c in text):
                raise ValueError("the API key must be visible ASCII characters (no spaces or accents)")
        return value

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> Settings:
        if _WITHOUT_ENVIRONMENT.get():
            return self
        prefix = self.model_config["env_prefix"]
        fields = type(self).model_fields
        unknown = sorted(
            k for k in os.environ if k.upper().startswith(prefix) and k[len(prefix) :].lower() not in fields
        )
        if unknown:
            valid = ", ".join(prefix + name.upper() for name in fields)
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; valid: {valid}")
        return self
