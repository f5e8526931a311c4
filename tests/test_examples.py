"""Every file in examples/ is valid: trimtab's kinds against the generated CRDs (schema, unknown
fields and CEL rules), and the operator would accept them (parse and feasibility)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.validation import ROOT, validate_builtin, validate_custom
from trimtab import constants as C

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
# Kinds of other projects that examples may show, with no CRD bundled to check them against.
FOREIGN = {("argoproj.io/v1alpha1", "Application")}
# Kubernetes kinds an example needs beside its ModelDeployment (a server's config file), held to
# the Kubernetes schema; the e2e suite dry-runs them on the API server too.
BUILTIN = {("v1", "ConfigMap")}


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
        elif (api_version, kind) in BUILTIN:
            validate_builtin(doc)
        else:
            assert (api_version, kind) in FOREIGN, f"{path.name}: unexpected {api_version} {kind}"


def test_torchserve_example_makes_torchserve_export_what_its_preset_reads() -> None:
    """TorchServe exports Prometheus metrics only in prometheus mode and, by default, only on
    127.0.0.1 (and ignores TS_* variables unless enable_envvars_config is set): the example's
    config.properties turns both on at the ports the preset scrapes and probes, and the pods
    mount it where the image's entrypoint reads it."""
    from urllib.parse import urlsplit

    from trimtab.api.servers import SERVER_DEFAULTS
    from trimtab.render import render_modeldeployment

    docs = _docs(ROOT / "examples" / "modeldeployment-torchserve.yaml")
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    model = next(d for d in docs if d["kind"] == C.MODELDEPLOYMENT_KIND)
    assert model["spec"]["server"] == "torchserve"
    lines = configmap["data"]["config.properties"].splitlines()
    props = dict(line.strip().split("=", 1) for line in lines if not line.lstrip().startswith("#"))
    defaults = SERVER_DEFAULTS["torchserve"]
    assert props["metrics_mode"] == "prometheus"
    addresses = (("metrics_address", defaults.metrics_port), ("inference_address", defaults.port))
    for key, port in addresses:
        url = urlsplit(props[key])
        assert (url.hostname, url.port) == ("0.0.0.0", port), key

    deployment = next(o for o in render_modeldeployment(model) if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("configMap"))
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    mount = mounts["/home/model-server/config.properties"]
    assert (mount["name"], mount["subPath"]) == (volume["name"], "config.properties")
