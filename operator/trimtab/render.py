"""A dry run of the reconciles: the manifests the operator would apply first for a
ModelDeployment or a TrainingJob, without a cluster (used by `trimtab render` and to check
examples).

It goes through the same parse, feasibility check, decision and builders as the operator."""

from __future__ import annotations

import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.trainingjob import TrainingJobSpec, TrainingJobStatus
from trimtab.builders.autoscaling import replicas_for_revision
from trimtab.builders.common import Owner
from trimtab.builders.serving import (
    build_deployment,
    build_disruption_budget,
    build_service,
    revision_of,
)
from trimtab.builders.training import build_job, build_podgroup
from trimtab.builders.training import build_service as build_training_service
from trimtab.decisions.serving import find_spec_problems
from trimtab.decisions.training import TrainingInputs, decide_training
from trimtab.decisions.training import find_spec_problems as find_training_problems

S = TypeVar("S", bound=BaseModel)


class RenderError(ValueError):
    """The resource would be rejected or marked Degraded by the operator."""


def _parse(model: type[S], doc: dict[str, Any]) -> S:
    """The spec as the operator parses it; a spec it would refuse raises, naming each field."""
    try:
        return model.model_validate(doc.get("spec") or {})
    except ValidationError as err:
        fields = [f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise RenderError("; ".join(fields)) from err


def _owner(doc: dict[str, Any], kind: str) -> Owner:
    meta = doc.get("metadata") or {}
    return Owner(
        C.API_VERSION,
        kind,
        meta.get("name", "example"),
        meta.get("namespace", "default"),
        meta.get("uid", "00000000-0000-0000-0000-000000000000"),
    )


def render(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """What the operator would apply first for a ModelDeployment or TrainingJob document."""
    kind = doc.get("kind")
    if doc.get("apiVersion") != C.API_VERSION or kind not in RENDERERS:
        raise RenderError(f"not a {' or a '.join(RENDERERS)}: {doc.get('apiVersion')} {kind}")
    return RENDERERS[kind](doc)


def render_modeldeployment(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") != C.MODELDEPLOYMENT_KIND:
        raise RenderError(f"not a ModelDeployment: kind {doc.get('kind')!r}")
    spec = _parse(ModelDeploymentSpec, doc)
    problems = find_spec_problems(spec)
    if problems:
        raise RenderError("; ".join(problems))
    owner = _owner(doc, C.MODELDEPLOYMENT_KIND)
    revision = revision_of(spec)
    replicas = replicas_for_revision(spec, {})  # what the first reconcile applies
    rendered = [build_deployment(owner, spec, revision, replicas), build_service(owner, spec)]
    if spec.disruption_budget.enabled:
        rendered.append(build_disruption_budget(owner, spec))
    return rendered


def render_trainingjob(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The first attempt's objects, as the reconcile creates them for a new TrainingJob: its
    headless Service, its PodGroup (gang scheduling) and its Indexed Job; none for a TrainingJob
    created suspended, which starts no attempt."""
    if doc.get("kind") != C.TRAININGJOB_KIND:
        raise RenderError(f"not a TrainingJob: kind {doc.get('kind')!r}")
    spec = _parse(TrainingJobSpec, doc)
    problems = find_training_problems(spec)
    if problems:
        raise RenderError("; ".join(problems))
    owner = _owner(doc, C.TRAININGJOB_KIND)
    now = datetime.datetime.now(datetime.UTC)
    decision = decide_training(TrainingInputs(spec, TrainingJobStatus(), None, None, now, 1))
    if not decision.create_job:
        return []
    restarts = decision.status.restarts
    rendered = [build_training_service(owner, spec)]
    if spec.scheduling.gang.enabled:
        rendered.append(build_podgroup(owner, spec, restarts))
    rendered.append(build_job(owner, spec, restarts, decision.active_deadline_seconds))
    return rendered


RENDERERS = {
    C.MODELDEPLOYMENT_KIND: render_modeldeployment,
    C.TRAININGJOB_KIND: render_trainingjob,
}
