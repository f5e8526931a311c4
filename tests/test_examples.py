"""Every file in examples/ is valid: trimtab's kinds against the generated CRDs (schema, unknown
fields and CEL rules), and the operator would accept them (parse and feasibility)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.validation import ROOT, validate_custom
from trimtab import constants as C

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
# Kinds of other projects that examples may show, with no CRD bundled to check them against.
FOREIGN = {("argoproj.io/v1alpha1", "Application")}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_there_are_examples() -> None:
    kinds = {d["kind"] for p in EXAMPLES for d in _docs(p)}
    assert C.MODELDEPLOYMENT_KIND in kinds


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    for doc in _docs(path):
        api_version, kind = doc["apiVersion"], doc["kind"]
        if api_version == C.API_VERSION:
            plural = {
                C.MODELDEPLOYMENT_KIND: C.MODELDEPLOYMENT_PLURAL,
                C.TRAININGJOB_KIND: C.TRAININGJOB_PLURAL,
            }[kind]
            validate_custom(doc, ROOT / "crds" / f"{C.GROUP}_{plural}.yaml")
            if kind == C.MODELDEPLOYMENT_KIND:
                from trimtab.render import render_modeldeployment

                assert render_modeldeployment(doc)
        else:
            assert (api_version, kind) in FOREIGN, f"{path.name}: unexpected {api_version} {kind}"
