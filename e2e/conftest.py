"""Fixtures for tests against a real cluster named by KUBECONFIG (skipped without one): the CRDs
applied server-side, a throw-away namespace, and the operator running in-process.

Nothing here assumes pods run: a control plane without nodes is a valid target."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from trimtab import constants as C
from trimtab.config import Settings
from trimtab.kube.client import KubeClient, KubeError

ROOT = Path(__file__).resolve().parent.parent

# Only an explicit KUBECONFIG: a test run that merely happens to be inside a pod must not
# create CRDs and namespaces in that pod's cluster.
HAVE_CLUSTER = bool(os.environ.get("KUBECONFIG"))
if HAVE_CLUSTER:
    # kopf's login tries the pod's service account before KUBECONFIG: a runner that is itself
    # a pod would run the in-process operator against its own cluster. Without the in-cluster
    # variables kopf takes KUBECONFIG, as trimtab's client does (as `trimtab run` arranges).
    os.environ.pop("KUBERNETES_SERVICE_HOST", None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if HAVE_CLUSTER:
        return
    skip = pytest.mark.skip(reason="no cluster: set KUBECONFIG to run the e2e tests")
    for item in items:
        if "e2e" in item.nodeid.split("/")[0]:
            item.add_marker(skip)


async def wait_until(
    probe: Callable[[], Awaitable[Any]], timeout: float = 60.0, interval: float = 0.5
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s; last value: {last!r}")


async def get_or_none(kube: KubeClient, path: str) -> Any:
    """The object at `path`, or None while it does not exist (yet)."""
    try:
        return await kube.request("GET", path)
    except KubeError as err:
        if err.not_found:
            return None
        raise


async def server_side_apply(
    kube: KubeClient, path: str, doc: dict[str, Any], dry_run: bool = False
) -> Any:
    params = {"fieldManager": "trimtab-e2e", "force": "true"}
    if dry_run:
        params["dryRun"] = "All"
    return await kube.request(
        "PATCH", path, params=params, body=doc, content_type="application/apply-patch+yaml"
    )


async def delete_trimtab_objects(kube: KubeClient, namespace: str, timeout: float = 60.0) -> None:
    """Delete the namespace's ModelDeployments and TrainingJobs and wait until they are gone.
    Past `timeout` their finalizers are removed, so the namespace can still be deleted."""
    kinds = (C.MODELDEPLOYMENT_PLURAL, C.TRAININGJOB_PLURAL)
    base = f"/apis/{C.GROUP}/{C.VERSION}/namespaces/{namespace}"

    async def names(plural: str) -> list[str]:
        with contextlib.suppress(KubeError):
            listing = await kube.request("GET", f"{base}/{plural}")
            return [item["metadata"]["name"] for item in listing.get("items", [])]
        return []

    for plural in kinds:
        for name in await names(plural):
            with contextlib.suppress(KubeError):
                await kube.request("DELETE", f"{base}/{plural}/{name}")

    async def all_gone() -> bool:
        return not any([await names(plural) for plural in kinds])

    with contextlib.suppress(AssertionError):
        await wait_until(all_gone, timeout)
        return
    for plural in kinds:
        for name in await names(plural):
            with contextlib.suppress(KubeError):
                await kube.request(
                    "PATCH",
                    f"{base}/{plural}/{name}",
                    body={"metadata": {"finalizers": None}},
                    content_type="application/merge-patch+json",
                )


async def dry_run_examples(
    kube: KubeClient, namespace: str, pattern: str, path_of: Callable[[str, str], str]
) -> list[dict[str, Any]]:
    """Server-side dry-run apply of every document in examples/`pattern`, as the API server
    answers it; `path_of(namespace, name)` is the object's API path. The real API server runs
    the CRDs' CEL rules, which the unit tests can only mirror."""
    accepted = []
    for path in sorted((ROOT / "examples").glob(pattern)):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            doc["metadata"]["namespace"] = namespace
            name = doc["metadata"]["name"]
            if doc["apiVersion"] == "v1" and doc["kind"] == "ConfigMap":
                # What a trimtab example mounts: the API server holds it to its schema too.
                configmap = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
                await server_side_apply(kube, configmap, doc, dry_run=True)
                continue
            answer = await server_side_apply(kube, path_of(namespace, name), doc, dry_run=True)
            assert answer["spec"]["image"] == doc["spec"]["image"], path.name
            accepted.append(answer)
    assert accepted, f"no examples/{pattern}"
    return accepted


@pytest.fixture
async def kube() -> AsyncIterator[KubeClient]:
    client = KubeClient.from_environment()
    yield client
    await client.close()


@pytest.fixture
async def crds(kube: KubeClient) -> list[str]:
    """Apply every CRD in crds/ and wait until the API server serves them."""
    names = []
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        name = crd["metadata"]["name"]
        names.append(name)
        await server_side_apply(
            kube, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}", crd
        )

    async def established() -> bool:
        for name in names:
            crd = await kube.request(
                "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            )
            conds = {c["type"]: c["status"] for c in crd.get("status", {}).get("conditions", [])}
            if conds.get("Established") != "True":
                return False
        return True

    await wait_until(established, 60)

    # kopf (with scanning off) discovers resources once, at start: the API group must list
    # the plurals by then, which can lag Established on a loaded API server.
    plurals = {C.MODELDEPLOYMENT_PLURAL, C.TRAININGJOB_PLURAL}

    async def discoverable() -> bool:
        group = await get_or_none(kube, f"/apis/{C.GROUP}/{C.VERSION}")
        served = {r["name"] for r in (group or {}).get("resources", [])}
        return plurals <= served

    await wait_until(discoverable, 60)
    return names


@pytest.fixture
async def namespace(kube: KubeClient) -> AsyncIterator[str]:
    name = f"trimtab-e2e-{uuid.uuid4().hex[:6]}"
    # Privileged, so a cluster whose default Pod Security level is restricted still lets the
    # examples' pods be created where nodes can run them (and status is not Degraded for it).
    labels = {"pod-security.kubernetes.io/enforce": "privileged"}
    await kube.request(
        "POST",
        "/api/v1/namespaces",
        body={
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        },
    )
    yield name
    with contextlib.suppress(KubeError):
        await kube.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture
async def operator(crds: list[str], namespace: str) -> AsyncIterator[KubeClient]:
    """The real operator, every handler, watching only the test namespace."""
    import trimtab.handlers  # noqa: F401  # registers the handlers with kopf

    # The operator's INFO log shows in a failed test's captured log.
    for logger_name in ("kopf", "trimtab"):
        logging.getLogger(logger_name).setLevel(logging.INFO)
    client = KubeClient.from_environment()
    stop, ready = asyncio.Event(), asyncio.Event()
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    # An operator that dies on its own must fail the test, not SIGKILL pytest later.
    settings.process.ultimate_exiting_timeout = None
    task = asyncio.create_task(
        kopf.operator(
            namespaces=[namespace],
            standalone=True,
            settings=settings,
            memo=kopf.Memo(kube=client, settings=Settings()),
            stop_flag=stop,
            ready_flag=ready,
        )
    )
    try:
        readiness = asyncio.create_task(ready.wait())
        await asyncio.wait({readiness, task}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        readiness.cancel()
        if task.done():
            task.result()  # the operator's own error (login, discovery) fails the test here
            raise AssertionError("the operator stopped before it was ready")
        if not ready.is_set():
            raise AssertionError("the operator was not ready within 60 s")
        await asyncio.sleep(2)  # let the watches start before the test creates objects
        yield client
    finally:
        # While the operator still runs, so it removes its finalizers: a resource left with
        # one would hold the test namespace in Terminating for good (if the operator died,
        # its finalizers are stripped after the wait).
        await delete_trimtab_objects(client, namespace)
        stop.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        # kopf took over SIGINT and SIGTERM for this loop: give them back to pytest.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signum)
        await client.close()
