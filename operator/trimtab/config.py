"""Operator settings from the environment (the Helm chart sets them): TRIMTAB_PROMETHEUS_URL,
TRIMTAB_NAMESPACE, TRIMTAB_METRICS_PORT, TRIMTAB_HEALTH_PORT, TRIMTAB_LOG_LEVEL,
TRIMTAB_AUTOSCALING_STATUS_REFRESH_SECONDS, ...

Every setting has a default that works for `make run` against a local kubeconfig."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prometheus_url: str = Field(
        default="http://prometheus-operated.monitoring.svc:9090",
        description="Where model-server and usage metrics are queried.",
    )
    namespace: str = Field(default="", description="Watch only this namespace; empty: all.")
    metrics_port: int = Field(default=8080, ge=0, le=65535, description="/metrics; 0 disables.")
    health_port: int = Field(default=8081, ge=0, le=65535, description="kopf liveness /healthz.")
    listen_address: str = Field(
        default="0.0.0.0",
        pattern=r"^[0-9A-Fa-f.:]+$",
        description="Address /metrics and /healthz listen on: 0.0.0.0 (IPv4), or :: where the "
        "kubelet probes and Prometheus scrape pods over IPv6.",
    )
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    # How long a status may go without a resync even when no watch event arrives.
    resync_seconds: float = Field(default=60.0, gt=0)
    # How long status.autoscaling may go unwritten while nothing in it matters changes: the loop
    # still decides every spec.autoscaling.interval, but writes only what changed its meaning.
    autoscaling_status_refresh_seconds: float = Field(default=30.0, gt=0)
    peering: str = Field(default="", description="kopf peering name; empty: standalone.")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values = {
            name: env[f"TRIMTAB_{name.upper()}"]
            for name in cls.model_fields
            if f"TRIMTAB_{name.upper()}" in env
        }
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise SystemExit(f"invalid TRIMTAB_* setting: {err}") from err
