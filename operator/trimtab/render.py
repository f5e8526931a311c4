"""A dry run of the reconciles: the manifests the operator would apply first for a
ModelDeployment or a TrainingJob, without a cluster (used by `trimtab render` and to check
examples).

It goes through the same parse, feasibility check, decision and builders as the operator."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from trimtab import constants as C
from trimtab.api.trainingjob import TrainingJobStatus
from trimtab.builders.autoscaling import replicas_for_revision
from trimtab.builders.common import Owner
from trimtab.builders.serving import (
    build_deployment,
    build_disruption_budget,
    build_service,
    revision_of,
)
from trimtab.builders.training import build_attempt
from trimtab.decisions.serving import checked_spec as checked_serving_spec
from trimtab.decisions.training import TrainingInputs, decide_training
from trimtab.decisions.training import checked_spec as checked_training_spec

S = TypeVar("S")


class RenderError(ValueError):
    """The resource would be rejected or marked Degraded by the operator."""


def _checked(
    doc: dict[str, Any],
    kind: str,
    check: Callable[[Mapping[str, Any]], tuple[S | None, list[str]]],
) -> tuple[S, Owner]:
    """The document's spec as the operator's reconcile reads it (the same check), and its
    owner; a spec the operator would refuse raises, naming each field."""
    if doc.get("kind") != kind:
        raise RenderError(f"not a {kind}: kind {doc.get('kind')!r}")
    spec, problems = check(doc.get("spec") or {})
    if spec is None or problems:
        raise RenderError("; ".join(problems))
    meta = doc.get("metadata") or {}
    owner = Owner(
        C.API_VERSION,
        kind,
        meta.get("name", "example"),
        meta.get("namespace", "default"),
        meta.get("uid", "00000000-0000-0000-0000-000000000000"),
    )
    return spec, owner


def render(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """What the operator would apply first for a ModelDeployment or TrainingJob document."""
    kind = doc.get("kind")
    if doc.get("apiVersion") != C.API_VERSION or kind not in RENDERERS:
        raise RenderError(f"not a {' or a '.join(RENDERERS)}: {doc.get('apiVersion')} {kind}")
    return RENDERERS[kind](doc)


def render_modeldeployment(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec, owner = _checked(doc, C.MODELDEPLOYMENT_KIND, checked_serving_spec)
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
    spec, owner = _checked(doc, C.TRAININGJOB_KIND, checked_training_spec)
    now = datetime.datetime.now(datetime.UTC)
    decision = decide_training(TrainingInputs(spec, TrainingJobStatus(), None, None, now, 1))
    if not decision.create_job:
        return []
    attempt = build_attempt(
        owner, spec, decision.status.restarts, decision.active_deadline_seconds
    )
    return attempt.manifests()


RENDERERS = {
    C.MODELDEPLOYMENT_KIND: render_modeldeployment,
    C.TRAININGJOB_KIND: render_trainingjob,
}
