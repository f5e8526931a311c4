"""A dry run of the ModelDeployment reconcile: the manifests it would apply for a resource,
without a cluster (used by `trimtab render` and to check examples).

It goes through the same parse, feasibility check and builders as the operator."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.autoscaling import replicas_for_revision
from trimtab.builders.common import Owner
from trimtab.builders.serving import (
    build_deployment,
    build_disruption_budget,
    build_service,
    revision_of,
)
from trimtab.decisions.serving import find_spec_problems


class RenderError(ValueError):
    """The resource would be rejected or marked Degraded by the operator."""


def render_modeldeployment(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") != C.MODELDEPLOYMENT_KIND:
        raise RenderError(f"not a ModelDeployment: kind {doc.get('kind')!r}")
    meta = doc.get("metadata") or {}
    try:
        spec = ModelDeploymentSpec.model_validate(doc.get("spec") or {})
    except ValidationError as err:
        raise RenderError(str(err)) from err
    problems = find_spec_problems(spec)
    if problems:
        raise RenderError("; ".join(problems))
    owner = Owner(
        C.API_VERSION,
        C.MODELDEPLOYMENT_KIND,
        meta.get("name", "example"),
        meta.get("namespace", "default"),
        meta.get("uid", "00000000-0000-0000-0000-000000000000"),
    )
    revision = revision_of(spec)
    replicas = replicas_for_revision(spec, {})  # what the first reconcile applies
    rendered = [build_deployment(owner, spec, revision, replicas), build_service(owner, spec)]
    if spec.disruption_budget.enabled:
        rendered.append(build_disruption_budget(owner, spec))
    return rendered
