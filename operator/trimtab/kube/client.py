"""An async client for the Kubernetes REST API on aiohttp: get, list, server-side apply that
skips no-op writes, status and scale patches, delete.

Credentials come from the pod's service account or the kubeconfig, through the kubernetes
package."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

from trimtab import __version__
from trimtab import constants as C
from trimtab.builders.common import claim_problem, is_applied, with_applied_hash
from trimtab.kube.resources import REGISTRY, SUBRESOURCE_VERBS, Resource, for_manifest
from trimtab.observability import API_REQUESTS

log = logging.getLogger(__name__)

USER_AGENT = f"trimtab/{__version__}"
# How long an apply that the API server stored otherwise than sent counts as done while the
# object stays as that apply left it (see KubeClient.apply): then it is sent again, so a
# CRD upgraded meanwhile (which does not rewrite stored objects) gets the fields it now keeps.
SETTLED_S = 600.0
Json = dict[str, Any]
# A path in structured-merge-diff's notation: `.spec.rules[0].retry`, `.ports[port=80,...]`.
UNDECLARED = re.compile(r"(\.[^\s:]+): field not declared in schema")
_STEP = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]|\[([^\]]*)\]")
# How many rounds of refused fields an apply drops before it gives up.
DROP_ROUNDS = 4


class KubeError(Exception):
    """A non-2xx answer from the API server, with its Status message."""

    def __init__(self, status: int, reason: str, message: str, body: Any = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def invalid(self) -> bool:
        return self.status == 422

    def _causes(self) -> list[dict[str, Any]]:
        """The Status' details.causes: where the API server says what went wrong when its
        message is generic (a JSON patch that failed: "the server rejected our request due to
        an error in our request"), each with a `reason` and a `message`."""
        details = self.body.get("details") if isinstance(self.body, dict) else None
        causes = details.get("causes") if isinstance(details, dict) else None
        return [c for c in causes or [] if isinstance(c, dict)]

    @property
    def causes(self) -> list[str]:
        """The messages of the Status' details.causes."""
        return [str(c["message"]) for c in self._causes() if c.get("message")]

    @property
    def namespace_terminating(self) -> bool:
        """Refused because the namespace is being deleted (the NamespaceLifecycle admission
        plugin: "unable to create new content in namespace ... because it is being
        terminated"): everything in it goes, so there is nothing to create there."""
        return self.status == 403 and (
            any(c.get("reason") == "NamespaceTerminating" for c in self._causes())
            or "because it is being terminated" in self.message
        )

    @property
    def test_failed(self) -> bool:
        """A JSON patch refused because its `test` operation did not hold (the object changed
        since it was read): a 422 whose cause says so."""
        return self.invalid and any(
            "test failed" in m or "testing value" in m for m in (self.message, *self.causes)
        )

    @property
    def undeclared(self) -> list[str]:
        """The fields a server-side apply was refused for because the kind's schema does not
        declare them (a CRD older than the object written). The API server refuses such an
        apply whole, as 500 (400 where that is fixed), rather than pruning the fields as it
        does for a create or a merge patch."""
        if self.status not in (400, 500):
            return []
        return UNDECLARED.findall(self.message)

    @property
    def rejected(self) -> bool:
        """The API server refused the request as written: sending it again changes nothing."""
        return self.invalid or self.status == 400 or bool(self.undeclared)


def drop_field(doc: Json, path: str) -> bool:
    """Remove the field at `path`, in structured-merge-diff's notation (what the API server
    names in "field not declared in schema"), from `doc`; False when it leads to no field.

    >>> route = {"spec": {"rules": [{"retry": {"attempts": 2}, "backendRefs": []}]}}
    >>> drop_field(route, ".spec.rules[0].retry"), route
    (True, {'spec': {'rules': [{'backendRefs': []}]}})
    >>> svc = {"spec": {"ports": [{"port": 80, "protocol": "TCP", "x": 1}]}}
    >>> drop_field(svc, '.spec.ports[port=80,protocol="TCP"].x'), svc
    (True, {'spec': {'ports': [{'port': 80, 'protocol': 'TCP'}]}})
    >>> drop_field(route, ".spec.rules[3].retry"), drop_field(route, "spec.rules")
    (False, False)
    """
    steps = list(_STEP.finditer(path))
    if not steps or "".join(m.group(0) for m in steps) != path or steps[-1].group(1) is None:
        return False
    node: Any = doc
    for step in steps[:-1]:
        field, index, key = step.groups()
        if field is not None:
            node = node.get(field) if isinstance(node, dict) else None
        elif index is not None:
            i = int(index)
            node = node[i] if isinstance(node, list) and i < len(node) else None
        else:
            node = _keyed(node, key)
        if node is None:
            return False
    if not isinstance(node, dict) or steps[-1].group(1) not in node:
        return False
    del node[steps[-1].group(1)]
    return True


def _keyed(items: Any, key: str) -> Any:
    """The element of an associative list that `key` (`port=80,protocol="TCP"`) names."""
    if not isinstance(items, list):
        return None
    wanted = {}
    for name, raw in re.findall(r'([^=,]+)=("(?:[^"\\]|\\.)*"|[^,]*)', key):
        try:
            wanted[name] = json.loads(raw)
        except ValueError:
            return None
    if not wanted:
        return None
    for item in items:
        if isinstance(item, dict) and all(item.get(k) == v for k, v in wanted.items()):
            return item
    return None


class NameTaken(KubeError):
    """An object of the name trimtab would apply exists and is not this resource's to change
    (see `builders.common.claim_problem`); nothing was written. A 409, like AlreadyExists."""

    def __init__(self, message: str) -> None:
        super().__init__(409, "NameTaken", message)

    @property
    def conflict(self) -> bool:
        # Not a race over a resourceVersion: a fresh read finds the same owner.
        return False


class ForbiddenCall(RuntimeError):
    """trimtab tried a verb that its RBAC registry (kube/resources.py) does not list."""


def _check(res: Resource, verb: str, sub: str | None = None) -> None:
    if res not in REGISTRY:
        raise ForbiddenCall(f"{res.plural} is not in trimtab's resource registry")
    if sub is not None:
        if sub not in res.subresources or verb not in SUBRESOURCE_VERBS[sub]:
            raise ForbiddenCall(
                f"verb {verb} on {res.plural}/{sub} is not in trimtab's resource registry"
            )
    elif verb not in res.verbs:
        raise ForbiddenCall(f"verb {verb} on {res.plural} is not in trimtab's resource registry")


class KubeClient:
    """One aiohttp session per event loop; every method is a single API call (apply: two)."""

    def __init__(
        self,
        host: str,
        *,
        ssl_context: ssl.SSLContext | bool = True,
        token: Callable[[], str | None] | None = None,
        timeout: float = 30.0,
        keepalive: bool = True,
        server_hostname: str | None = None,
        proxy: str | None = None,
    ) -> None:
        self.host = host.rstrip("/")
        self._keepalive = keepalive
        self._ssl = ssl_context
        # A kubeconfig's tls-server-name (SNI and the name the certificate is checked against)
        # and proxy-url, as kubectl and kopf honour them.
        self._server_hostname = server_hostname
        self._proxy = proxy
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Writes sent, by (verb, kind): tests and the bench count them.
        self.writes: Counter[tuple[str, str]] = Counter()
        # Applies stored otherwise than sent, by object path: (applied hash, resourceVersion
        # of the object as stored, when). Time from `clock`.
        self._settled: dict[str, tuple[str, str, float]] = {}
        self.clock: Callable[[], float] = time.monotonic

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> KubeClient:
        """The cluster KUBECONFIG names when it is set (even inside a pod: a CI runner's pod
        must not act on its own cluster); else, in a pod, its service account; else the
        current context of ~/.kube/config."""
        import os

        from kubernetes import client as k8s_client
        from kubernetes import config as k8s_config

        env = os.environ if env is None else env
        cfg = k8s_client.Configuration()
        if env.get("KUBECONFIG"):
            # Named here: the package reads KUBECONFIG once, when it is imported.
            k8s_config.load_kube_config(config_file=env["KUBECONFIG"], client_configuration=cfg)  # type: ignore[no-untyped-call]  # untyped in the kubernetes package
        else:
            try:
                k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]  # untyped in the kubernetes package
            except k8s_config.ConfigException:
                k8s_config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]  # untyped in the kubernetes package
        context: ssl.SSLContext | bool
        if cfg.verify_ssl:
            context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.cert_file:
                context.load_cert_chain(cfg.cert_file, cfg.key_file)
        else:
            context = False

        def token() -> str | None:
            # get_api_key_with_prefix calls the refresh hook, so rotated tokens are picked up.
            # The kubernetes package keeps the token under "BearerToken" (in-cluster, kubeconfig
            # tokens and exec plugins alike); releases before 2024 under "authorization".
            value = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
            return str(value) if value else None

        return cls(
            cfg.host,
            ssl_context=context,
            token=token,
            server_hostname=getattr(cfg, "tls_server_name", None) or None,
            proxy=getattr(cfg, "proxy", None) or None,
        )

    async def _get_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(force_close=not self._keepalive)
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector)
            self._loop = loop
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Json:
        session = await self._get_session()
        # The API server names a write's field manager after the User-Agent when a call does not
        # name one; either way managedFields then say trimtab, not aiohttp.
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if body is not None:
            headers["Content-Type"] = content_type
        if self._token is not None and (token := self._token()):
            headers["Authorization"] = token if " " in token else f"Bearer {token}"
        data = json.dumps(body) if body is not None else None
        extra: dict[str, Any] = {}
        if self._server_hostname:
            extra["server_hostname"] = self._server_hostname
        if self._proxy:
            extra["proxy"] = self._proxy
        async with session.request(
            method,
            self.host + path,
            params=params,
            data=data,
            headers=headers,
            ssl=self._ssl,
            **extra,
        ) as resp:
            text = await resp.text()
            API_REQUESTS.labels(method=method, code=str(resp.status)).inc()
            if resp.status >= 400:
                try:
                    status = json.loads(text)
                    message = status.get("message", text)
                except ValueError:
                    status, message = None, text
                raise KubeError(resp.status, resp.reason or "", str(message), status)
            return json.loads(text) if text else {}

    # --- reads -----------------------------------------------------------------------------

    async def get(self, res: Resource, namespace: str, name: str) -> Json | None:
        _check(res, "get")
        try:
            return await self.request("GET", res.path(namespace, name))
        except KubeError as err:
            if err.not_found:
                return None
            raise

    async def list(
        self, res: Resource, namespace: str | None, labels: Mapping[str, str] | None = None
    ) -> list[Json]:
        _check(res, "list")
        params = {}
        if labels:
            params["labelSelector"] = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        result = await self.request("GET", res.path(namespace), params=params)
        items: list[Json] = result.get("items") or []
        # Filter here too: the selector is an optimisation, the check is ours.
        if labels:
            items = [
                i
                for i in items
                if all(
                    (i.get("metadata", {}).get("labels") or {}).get(k) == v
                    for k, v in labels.items()
                )
            ]
        return items

    # --- writes ----------------------------------------------------------------------------

    def _count(self, verb: str, kind: str) -> None:
        self.writes[(verb, kind)] += 1
        from trimtab.observability import API_WRITES

        API_WRITES.labels(verb=verb, kind=kind).inc()

    async def apply(
        self,
        manifest: Json,
        adopt: bool = False,
        before_write: Callable[[Json | None], None] | None = None,
        drop_undeclared: bool = False,
    ) -> Json:
        """Server-side apply as field manager `trimtab`, unless the object already holds every
        field we would set and was last applied from this same manifest (the
        `trimtab.io/applied` hash): then nothing is written and the current object is returned.
        A field left out since the last apply is removed by the apply that the changed hash
        sends. An object of that name that another resource controls, or that trimtab did not
        make for this one (unless `adopt`), raises NameTaken and is left as it is.
        `before_write` sees the object as read, before anything is written over it.

        The API server refuses a whole apply that sets a field the kind's schema does not
        declare (a rule's `retry` under a Gateway API CRD before v1.7): "field not declared in
        schema", as a 500. With `drop_undeclared`, the fields it names are left out and the
        rest is applied (a few rounds at most); the object stored then lacks them, which the
        caller can see and report. Such an object never holds every field sent, and every
        loop would apply it again, to the same result; the API server also stores some
        objects otherwise than sent. So an apply stored otherwise is not sent again while the
        object keeps the resourceVersion that apply left (nothing has changed it since) and
        the manifest is the same, for SETTLED_S; an edit by anyone else changes the
        resourceVersion, and is undone at once."""
        manifest = with_applied_hash(manifest)
        res = for_manifest(manifest)
        _check(res, "patch")
        meta = manifest["metadata"]
        path = res.path(meta.get("namespace"), meta["name"])
        applied_hash = meta["annotations"][C.ANNOTATION_APPLIED]
        current = await self.get(res, meta.get("namespace", ""), meta["name"])
        problem = claim_problem(manifest, current, adopt)
        if problem is not None:
            raise NameTaken(problem)
        if before_write is not None:
            before_write(current)
        if current is not None and (
            is_applied(manifest, current) or self._settled_as(path, applied_hash, current)
        ):
            return current
        sent = manifest
        for round_ in range(DROP_ROUNDS + 1):
            self._count("apply", res.kind)
            try:
                stored = await self.request(
                    "PATCH",
                    path,
                    params={"fieldManager": C.FIELD_MANAGER, "force": "true"},
                    body=sent,
                    content_type="application/apply-patch+yaml",
                )
                break
            except KubeError as err:
                if not drop_undeclared or round_ == DROP_ROUNDS or not err.undeclared:
                    raise
                sent = json.loads(json.dumps(sent))
                if not all([drop_field(sent, field) for field in err.undeclared]):
                    raise
                log.info("%s: left out %s, which the API server does not declare",
                         path, ", ".join(err.undeclared))  # fmt: skip
        self._settle(path, applied_hash, manifest, stored)
        return stored

    def _settled_as(self, path: str, applied_hash: str, current: Json) -> bool:
        """Whether `current` is the object as an apply of the manifest hashed `applied_hash`
        left it (stored otherwise than sent), no more than SETTLED_S ago."""
        settled = self._settled.get(path)
        version = (current.get("metadata") or {}).get("resourceVersion")
        return (
            settled is not None
            and bool(version)
            and settled[:2] == (applied_hash, version)
            and self.clock() - settled[2] < SETTLED_S
        )

    def _settle(self, path: str, applied_hash: str, manifest: Json, stored: Json) -> None:
        """Remember an apply the API server stored otherwise than sent (see `apply`)."""
        version = (stored.get("metadata") or {}).get("resourceVersion")
        if is_applied(manifest, stored) or not version:
            self._settled.pop(path, None)
            return
        now = self.clock()
        if len(self._settled) >= 4096:  # objects deleted since: forget the expired
            self._settled = {p: s for p, s in self._settled.items() if now - s[2] < SETTLED_S}
        self._settled[path] = (applied_hash, str(version), now)

    async def patch(
        self, res: Resource, namespace: str, name: str, patch: Json, subresource: str | None = None
    ) -> Json:
        """A JSON merge patch, of the object or of its status/scale subresource."""
        _check(res, "patch", subresource)
        self._count("patch" if subresource is None else f"patch/{subresource}", res.kind)
        return await self.request(
            "PATCH",
            res.path(namespace, name, subresource),
            params={"fieldManager": C.FIELD_MANAGER},
            body=patch,
            content_type="application/merge-patch+json",
        )

    async def json_patch(
        self,
        res: Resource,
        namespace: str,
        name: str,
        operations: Sequence[Json],
        subresource: str | None = None,
    ) -> Json:
        """An RFC 6902 JSON patch of the object (or of a subresource: a pod's resize): with a
        `test` operation first, the write happens only if the object still holds that value
        (422 otherwise)."""
        _check(res, "patch", subresource)
        self._count("patch" if subresource is None else f"patch/{subresource}", res.kind)
        return await self.request(
            "PATCH",
            res.path(namespace, name, subresource),
            params={"fieldManager": C.FIELD_MANAGER},
            body=list(operations),
            content_type="application/json-patch+json",
        )

    async def patch_status(
        self,
        res: Resource,
        namespace: str,
        name: str,
        status: Json,
        resource_version: str | None = None,
    ) -> Json:
        """Merge-patch status. With `resource_version`, the API server refuses (409) a patch
        computed from an object that has changed since: several loops write the conditions
        list, which a merge patch replaces whole, so none may write from a stale read."""
        body: Json = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self.patch(res, namespace, name, body, subresource="status")

    async def scale(self, res: Resource, namespace: str, name: str, replicas: int) -> Json:
        """Set replicas through the scale subresource, as `kubectl scale` does."""
        return await self.patch(res, namespace, name, {"spec": {"replicas": replicas}}, "scale")

    async def ensure(self, manifest: Json) -> bool:
        """Create unless it exists; True when this call created it."""
        try:
            await self.create(manifest)
        except KubeError as err:
            if err.conflict:
                return False
            raise
        return True

    async def create(self, manifest: Json) -> Json:
        res = for_manifest(manifest)
        _check(res, "create")
        self._count("create", res.kind)
        return await self.request(
            "POST",
            res.path(manifest["metadata"].get("namespace")),
            params={"fieldManager": C.FIELD_MANAGER},
            body=manifest,
        )

    async def delete(
        self, res: Resource, namespace: str, name: str, propagation: str = "Background"
    ) -> bool:
        """Delete; False when it was already gone."""
        _check(res, "delete")
        self._count("delete", res.kind)
        try:
            await self.request(
                "DELETE",
                res.path(namespace, name),
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": propagation,
                },
            )
        except KubeError as err:
            if err.not_found:
                return False
            raise
        return True


async def patch_status_from(
    kube: KubeClient,
    res: Resource,
    body: Json,
    compute: Callable[[Json], Json | None],
    attempts: int = 3,
) -> bool:
    """Write the status patch `compute` makes from `body`, with body's resourceVersion as a
    precondition, so it never lands over a change it did not see (a merge patch replaces a
    list such as status.conditions whole). A refusal (409) re-reads the object and asks
    `compute` again, `attempts` times in all; the last refusal is raised.

    `compute` returns the patch ({} when nothing needs writing) or None to give up (what it
    was computed for has changed). True when status holds the patch; False when `compute`
    gave up or the object is gone."""
    current = body
    for attempt in range(attempts):
        patch = compute(current)
        if patch is None:
            return False
        if not patch:
            return True
        meta = current["metadata"]
        namespace, name = meta.get("namespace", ""), meta["name"]
        try:
            await kube.patch_status(res, namespace, name, patch, meta.get("resourceVersion"))
            return True
        except KubeError as err:
            if not err.conflict or attempt == attempts - 1:
                raise
        fresh = await kube.get(res, namespace, name)
        if fresh is None:
            return False
        current = fresh
    return False
