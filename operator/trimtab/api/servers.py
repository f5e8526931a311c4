"""What each model-server preset listens on: serving port, metrics port and path, health paths.

Users name a preset and write no ports or probes; every value can still be overridden."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ServerPreset = Literal["vllm", "triton", "tgi", "torchserve", "generic"]


@dataclass(frozen=True)
class ServerDefaults:
    port: int
    metrics_port: int
    metrics_path: str
    readiness_path: str
    liveness_path: str


SERVER_DEFAULTS: dict[str, ServerDefaults] = {
    # vLLM's OpenAI server: one port for API, /health and /metrics.
    "vllm": ServerDefaults(8000, 8000, "/metrics", "/health", "/health"),
    # Triton: HTTP on 8000, Prometheus metrics on 8002; ready means every model is loaded.
    "triton": ServerDefaults(8000, 8002, "/metrics", "/v2/health/ready", "/v2/health/live"),
    # TGI's launcher serves API, /health and /metrics on one port (80 in the image by default).
    "tgi": ServerDefaults(80, 80, "/metrics", "/health", "/health"),
    # TorchServe: inference 8080, metrics 8082; /ping answers on the inference port.
    "torchserve": ServerDefaults(8080, 8082, "/metrics", "/ping", "/ping"),
    # Any HTTP server exporting an http_request_duration_seconds histogram.
    "generic": ServerDefaults(8080, 8080, "/metrics", "/healthz", "/healthz"),
}

# Model servers with GPUs use shared memory for NCCL and tokenizer workers; Docker's 64 MiB
# /dev/shm default makes tensor-parallel vLLM and TGI crash at start.
SHM_SERVERS = frozenset({"vllm", "tgi", "triton"})
