"""Operator settings from the environment (the Helm chart sets them): TRIMTAB_PROMETHEUS_URL,
TRIMTAB_NAMESPACE, TRIMTAB_METRICS_PORT, TRIMTAB_HEALTH_PORT, TRIMTAB_LOG_LEVEL,
TRIMTAB_AUTOSCALING_STATUS_REFRESH_SECONDS, how to reach Prometheus (TRIMTAB_PROMETHEUS_*:
bearer token or basic auth from files, headers as a JSON object, CA, client certificate), ...

Every setting has a default that works for `make run` against a local kubeconfig."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trimtab.api.common import header_problem
from trimtab.metrics.connection import Connection


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
    # How requests to prometheus_url authenticate and check its certificate (empty: not set).
    # They go to that URL's origin only: a ModelDeployment's own Prometheus elsewhere gets none.
    prometheus_bearer_token_file: str = ""
    prometheus_basic_auth_username: str = ""
    prometheus_basic_auth_password_file: str = ""
    prometheus_headers: dict[str, str] = Field(
        default_factory=dict, description='A JSON object, e.g. {"X-Scope-OrgID": "team-a"}.'
    )
    prometheus_ca_file: str = ""
    prometheus_cert_file: str = ""
    prometheus_key_file: str = ""
    prometheus_insecure_skip_verify: bool = False

    @field_validator("prometheus_headers", mode="before")
    @classmethod
    def _headers_from_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        return value

    @field_validator("prometheus_headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if problem := header_problem(name, text):
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _connection_holds_together(self) -> Settings:
        self.prometheus_connection()
        return self

    def prometheus_connection(self) -> Connection:
        """What requests to prometheus_url carry besides the query."""
        return Connection(
            headers=dict(self.prometheus_headers),
            bearer_token_file=self.prometheus_bearer_token_file,
            basic_auth_username=self.prometheus_basic_auth_username,
            basic_auth_password_file=self.prometheus_basic_auth_password_file,
            ca_file=self.prometheus_ca_file,
            cert_file=self.prometheus_cert_file,
            key_file=self.prometheus_key_file,
            insecure_skip_verify=self.prometheus_insecure_skip_verify,
        )

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
            # Without the input values: a header may carry a secret.
            problems = "; ".join(
                f"TRIMTAB_{'_'.join(str(p) for p in e['loc']).upper() or 'PROMETHEUS_*'}: "
                f"{e['msg']}"
                for e in err.errors(include_url=False, include_input=False)
            )
            raise SystemExit(f"invalid TRIMTAB_* setting: {problems}") from err
