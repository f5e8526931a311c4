"""Rendering the Helm chart offline (helm-python-sdk, Helm v4 as a library) into manifests that the
chart tests and the e2e test check; no helm binary and no cluster needed."""

from __future__ import annotations

import functools
from typing import Any

import helm_python as helm
import yaml

from tests.validation import ROOT

CHART = ROOT / "charts" / "trimtab"
RELEASE = "trimtab"
NAMESPACE = "trimtab-system"


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(str(CHART))


def render_files(
    values: dict[str, Any] | None = None, release: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` prints them (NOTES.txt included)."""
    return chart().render(values or {}, name=release, namespace=namespace)


def render(
    values: dict[str, Any] | None = None, release: str = RELEASE, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """Every object the release would install, in template order."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render_files(values, release, namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    metas = [d["metadata"] for d in found]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {metas}"
    return found[0]
