"""Metadata every object trimtab writes carries: labels, owner references, names.

One place decides these so that selectors, clean-up and RBAC all agree."""

from __future__ import annotations

import hashlib
import json
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


def child_name(parent: str, suffix: str, limit: int = 63) -> str:
    """`parent-suffix`, trimming the parent so the result stays a valid DNS label."""
    room = limit - len(suffix) - 1
    return f"{parent[:room].rstrip('-')}-{suffix}"
