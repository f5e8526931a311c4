"""Metadata every object trimtab writes carries: labels, owner references, names.

One place decides these so that selectors, clean-up and RBAC all agree."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trimtab import constants as C

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns what a builder makes."""

    api_version: str
    kind: str
    name: str
    namespace: str
    uid: str

    def reference(self) -> Manifest:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def owner_labels(owner: Owner) -> dict[str, str]:
    """Labels that select everything trimtab made for one custom resource."""
    return {
        C.LABEL_MANAGED_BY: C.MANAGED_BY,
        C.LABEL_OWNER: owner.name,
    }


def object_meta(
    owner: Owner,
    name: str,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> Manifest:
    meta: Manifest = {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**owner_labels(owner), **(labels or {})},
        "ownerReferences": [owner.reference()],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def content_hash(data: Any, length: int = 10) -> str:
    """A short, stable hash of JSON-able data: key order and whitespace never change it."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


# Kubernetes cuts a generateName to this many characters before adding 5 random ones, so a
# controller's pod names (`<replicaset>-`, `<job>-<index>-`) lose their tail past it.
GENERATE_NAME_LIMIT = 58


def literal_regex(text: str) -> str:
    r"""`text` matched literally in a PromQL (RE2) label regex: escaped, but not the '-' that
    Python escapes and a name holds everywhere.

    >>> literal_regex("llama-3.1")
    'llama-3\\.1'
    """
    return re.escape(text).replace("\\-", "-")


def child_name(parent: str, suffix: str, limit: int = 63) -> str:
    """`parent-suffix`, trimming the parent so the result stays a valid DNS label."""
    room = limit - len(suffix) - 1
    return f"{parent[:room].rstrip('-')}-{suffix}"


def _same_scalar(want: Any, have: Any, quantity: bool) -> bool:
    if want == have:
        return True
    if quantity:
        from trimtab.api.quantity import is_quantity, parse_quantity

        if is_quantity(want) and is_quantity(have):
            return parse_quantity(want) == parse_quantity(have)
    # The API server writes ints where we wrote numeric strings only for IntOrString fields.
    return (
        isinstance(want, int | str)
        and isinstance(have, int | str)
        and str(want) == str(have)
        and (isinstance(want, bool) == isinstance(have, bool))
    )


def with_applied_hash(manifest: Manifest) -> Manifest:
    """`manifest` with the `trimtab.io/applied` annotation set to a hash of the rest of it.

    `is_applied` checks only the fields a manifest has, so a field trimtab stopped sending (a
    hostname dropped from spec.rollout.router, an Istio gateway, a label) would leave the object
    looking applied, and the server-side apply that removes it would never be sent. The hash
    changes whenever a field is added, changed or removed.

    >>> m = {"metadata": {"name": "r"}, "spec": {"hostnames": ["a.example"], "rules": []}}
    >>> with_applied_hash(m)["metadata"]["annotations"]
    {'trimtab.io/applied': 'eeb901bfdc47f212'}
    >>> del m["spec"]["hostnames"]
    >>> is_applied(with_applied_hash(m), with_applied_hash({**m, "spec": {"hostnames": ["a.example"], "rules": []}}))
    False
    """  # noqa: E501
    meta = dict(manifest.get("metadata") or {})
    annotations = {
        k: v for k, v in (meta.pop("annotations", None) or {}).items() if k != C.ANNOTATION_APPLIED
    }
    if annotations:
        meta["annotations"] = annotations
    digest = content_hash({**manifest, "metadata": meta}, 16)
    return {
        **manifest,
        "metadata": {**meta, "annotations": {**annotations, C.ANNOTATION_APPLIED: digest}},
    }


def _controller(meta: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def claim_problem(manifest: Manifest, current: Manifest | None, adopt: bool = False) -> str | None:
    """Why trimtab must not apply `manifest` over `current`, the object of that name already
    there; None when it may. Only a manifest with a controller reference claims its object.

    The rule is the ReplicaSet controller's for its pods: an object controlled by the same
    owner (by uid) is trimtab's to update; one controlled by anything else, or by an earlier
    resource of the same name that the garbage collector has not removed yet, is not taken
    over; an object without a controller is adopted when its labels say it was made for this
    owner (what `kubectl delete --cascade=orphan` leaves), or with `adopt` (a route the
    rollout names, which the user asked trimtab to write), and otherwise left alone. Applying
    over another controller's object would swap its selector or its route for ours, and two
    resources of different kinds with one name (a ModelDeployment and a TrainingJob `llama`
    both want Service `llama`) would take it from each other on every pass.

    >>> me = Owner("trimtab.io/v1alpha1", "ModelDeployment", "llama", "ml", "u1")
    >>> svc = {"kind": "Service", "metadata": object_meta(me, "llama")}
    >>> claim_problem(svc, None) is None, claim_problem(svc, svc) is None
    (True, True)
    >>> job = Owner("trimtab.io/v1alpha1", "TrainingJob", "llama", "ml", "u2")
    >>> claim_problem(svc, {"kind": "Service", "metadata": object_meta(job, "llama")})
    'Service llama belongs to TrainingJob llama, not to this ModelDeployment'
    >>> claim_problem(svc, {"kind": "Service", "metadata": {"name": "llama"}})
    'Service llama exists and was not made by trimtab for this ModelDeployment'
    """
    want = _controller(manifest.get("metadata") or {})
    if current is None or want is None:
        return None
    meta = current.get("metadata") or {}
    kind, name = manifest.get("kind", "object"), meta.get("name", "")
    have = _controller(meta)
    if have is not None:
        if have.get("uid") == want.get("uid"):
            return None
        if (have.get("kind"), have.get("name")) == (want.get("kind"), want.get("name")):
            return (
                f"{kind} {name} still belongs to an earlier {want.get('kind')} of this name "
                "that the garbage collector has not removed yet"
            )
        return (
            f"{kind} {name} belongs to {have.get('kind')} {have.get('name')}, "
            f"not to this {want.get('kind')}"
        )
    labels = meta.get("labels") or {}
    made_for_owner = (
        labels.get(C.LABEL_MANAGED_BY) == C.MANAGED_BY
        and labels.get(C.LABEL_OWNER) == want.get("name")
    )
    if adopt or made_for_owner:
        return None
    return f"{kind} {name} exists and was not made by trimtab for this {want.get('kind')}"


_OMITTED_WHEN_EMPTY: tuple[Any, ...] = ("", [], {})


def is_applied(desired: Any, current: Any, _quantity: bool = False) -> bool:
    """True when every field of `desired` already has that value in `current`.

    The API server adds defaults and canonicalises quantities ("0.5" -> "500m"), so an applied
    object is a superset of what we sent; lists must match item by item in order. It also leaves
    out empty values of built-in kinds (`value: ""`, `command: []`: Go's omitempty), so an empty
    value is applied when its key is absent.
    """
    if isinstance(desired, dict):
        if not isinstance(current, dict):
            return False
        return all(
            is_applied(value, current[key], _quantity or key in ("requests", "limits"))
            if key in current
            else value in _OMITTED_WHEN_EMPTY
            for key, value in desired.items()
        )
    if isinstance(desired, list):
        if not isinstance(current, list) or len(desired) != len(current):
            return False
        return all(is_applied(d, c, _quantity) for d, c in zip(desired, current, strict=True))
    return _same_scalar(desired, current, _quantity)


def merge_patch(
    current: Mapping[str, Any], desired: Mapping[str, Any], remove_missing: bool = False
) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns the `desired` keys of `current` into `desired`.
    Keys only in `current` are left alone, or with `remove_missing` removed (null), at every
    depth; an empty result means nothing to write."""
    patch: dict[str, Any] = {k: None for k in current if k not in desired} if remove_missing else {}
    for key, want in desired.items():
        have = current.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            sub = merge_patch(have, want, remove_missing)
            if sub:
                patch[key] = sub
        elif want != have:
            patch[key] = want
    return patch


def container_resources(
    cpu: str | None,
    memory: str | None,
    cpu_limit: str | None,
    memory_limit: str | None,
    gpu_name: str,
    gpus: int,
) -> Manifest:
    """A container's resources. No CPU limit unless asked (a throttled model server or trainer
    is slower, never safer); the memory limit defaults to the request, since memory cannot be
    compressed and a limit above the request only defers the OOM kill to a worse moment; GPUs
    as an extended resource, whose request must equal its limit."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if cpu:
        requests["cpu"] = cpu
    if cpu_limit:
        limits["cpu"] = cpu_limit
    if memory:
        requests["memory"] = memory
    if memory_limit or memory:
        limits["memory"] = memory_limit or memory or ""
    if gpus:
        requests[gpu_name] = str(gpus)
        limits[gpu_name] = str(gpus)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
