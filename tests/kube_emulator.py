"""A kmock KubernetesEmulator that behaves enough like an API server for kopf and trimtab:
it stamps uid, resourceVersion, generation, timestamps, apiVersion and kind, and implements
the PATCH flavours (merge, JSON patch with `test`, server-side apply) and the status and scale
subresources.

An object with finalizers is marked for deletion (deletionTimestamp) when deleted, and goes
when its last finalizer is removed, so kopf's deletion handlers run as against a cluster.

It is a test fixture, not an API server: server-side apply is approximated by a merge of the
applied object (lists replaced) that also removes the fields the same field manager applied
last time and has left out now, which is what a single field manager sees."""

from __future__ import annotations

import asyncio
import copy
import datetime
import functools
import itertools
import uuid
from pathlib import Path
from typing import Any

import attrs
import jsonschema
import kmock
from kmock._internal import enums  # the action enum kmock dispatches on

from tests.validation import (
    ROOT,
    closed_schema,
    crd_schema,
    thirdparty,
    undeclared_fields,
    validate_custom,
)
from trimtab import constants as C

_rv = itertools.count(1000)

# (group/version/plural) -> kind, namespaced, verbs, subresources
RESOURCES: dict[str, tuple[str, bool, set[str], set[str]]] = {
    f"{C.GROUP}/{C.VERSION}/{C.MODELDEPLOYMENT_PLURAL}": (
        C.MODELDEPLOYMENT_KIND,
        True,
        {"list", "watch", "get", "patch", "create", "delete"},
        {"status", "scale"},
    ),
    f"{C.GROUP}/{C.VERSION}/{C.TRAININGJOB_PLURAL}": (
        C.TRAININGJOB_KIND,
        True,
        {"list", "watch", "get", "patch", "create", "delete"},
        {"status"},
    ),
    "apps/v1/deployments": (
        "Deployment",
        True,
        {"list", "watch", "get", "patch", "create", "delete"},
        {"status", "scale"},
    ),
    "v1/services": ("Service", True, {"list", "watch", "get", "patch", "create", "delete"}, set()),
    "batch/v1/jobs": (
        "Job",
        True,
        {"list", "watch", "get", "patch", "create", "delete"},
        {"status"},
    ),
    "policy/v1/poddisruptionbudgets": (
        "PodDisruptionBudget",
        True,
        {"list", "watch", "get", "patch", "create", "delete"},
        {"status"},
    ),
    "v1/pods": (
        "Pod",
        True,
        {"list", "watch", "get", "patch", "create", "delete"},
        {"status", "resize"},
    ),
    "v1/events": ("Event", True, {"list", "watch", "get", "create", "patch"}, set()),
    "gateway.networking.k8s.io/v1/httproutes": (
        "HTTPRoute",
        True,
        {"list", "watch", "get", "patch", "create", "delete"},
        {"status"},
    ),
    "networking.istio.io/v1/virtualservices": (
        "VirtualService",
        True,
        {"list", "watch", "get", "patch", "create", "delete"},
        {"status"},
    ),
    "scheduling.x-k8s.io/v1alpha1/podgroups": (
        "PodGroup",
        True,
        {"list", "watch", "get", "patch", "create", "delete"},
        {"status"},
    ),
}


def _now() -> str:
    return (
        datetime.datetime.now(datetime.UTC)
        .replace(microsecond=0)
        .isoformat()
        .replace("+00:00", "Z")
    )


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def left_out(before: Any, now: Any) -> Any:
    """`now` as a merge patch that also removes (None) the keys of `before` it leaves out, at
    every depth of nested objects (lists are replaced whole anyway).

    >>> left_out({"spec": {"a": 1, "b": 2}, "x": 1}, {"spec": {"a": 1}})
    {'x': None, 'spec': {'b': None, 'a': 1}}
    """
    if not isinstance(before, dict) or not isinstance(now, dict):
        return now
    out = {k: None for k in before if k not in now}
    out.update({k: left_out(before.get(k), v) for k, v in now.items()})
    return out


def diff(old: Any, new: Any) -> Any:
    """The merge patch that turns `old` into `new` (keys removed become None)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    out: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        out[key] = None
    for key, value in new.items():
        if key not in old:
            out[key] = copy.deepcopy(value)
        elif old[key] != value:
            out[key] = (
                diff(old[key], value)
                if isinstance(value, dict) and isinstance(old[key], dict)
                else copy.deepcopy(value)
            )
    return out


def _pointer(path: str) -> list[str]:
    return (
        [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
        if path
        else []
    )


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 add/remove/replace/test; a failed test is a 422, as on an API server."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1] if parts else None
        kind = op["op"]
        if kind == "test":
            actual = parent[int(last)] if isinstance(parent, list) else parent.get(last)  # type: ignore[arg-type]  # last is set for tests
            if actual != op.get("value"):
                # As the API server (a generic 422): the JSON patch library's words are
                # only in the details' causes.
                raise kmock.KubernetesError(
                    status=422,
                    reason="Invalid",
                    message="the server rejected our request due to an error in our request",
                    details={"causes": [{
                        "type": "UnexpectedServerResponse",
                        "message": f"testing value {op['path']} failed: test failed",
                    }]},
                )  # fmt: skip
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                idx = len(parent) if last == "-" else int(last)  # type: ignore[arg-type]  # list paths carry an index
                if kind == "add":
                    parent.insert(idx, op["value"])
                else:
                    parent[idx] = op["value"]
            else:
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))  # type: ignore[arg-type]  # list paths carry an index
            else:
                parent.pop(last, None)
        else:
            raise kmock.KubernetesError(
                status=422, reason="Invalid", message=f"unsupported op {kind}"
            )
    return doc


def _key(res: Any) -> str:
    """RESOURCES' key of a kmock resource: group/version/plural ("v1/pods" for the core API)."""
    return f"{res.group + '/' if res.group else ''}{res.version}/{res.plural}"


def _without_resources(pod: dict[str, Any]) -> dict[str, Any]:
    """A pod without its containers' resources: what a resize may not change."""
    out = copy.deepcopy(pod)
    for container in (out.get("spec") or {}).get("containers") or []:
        container.pop("resources", None)
    return out


# Fields the API server refuses to change once an object exists (422 "field is immutable"), per
# resource: (path, a predicate on the stored object that makes the field mutable after all).
def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _suspended_job(job: dict[str, Any]) -> bool:
    """A Job that is suspended and has never started: Kueue sets its pods' scheduling fields
    before it admits it (apps/job validation: mutable scheduling directives)."""
    return bool(_get(job, ("spec", "suspend"))) and not _get(job, ("status", "startTime"))


# What of a suspended Job's pod template may change: its scheduling directives, labels and
# annotations; the rest (containers, volumes, restart policy...) stays immutable.
_JOB_TEMPLATE_SCHEDULING = (
    ("metadata", "labels"), ("metadata", "annotations"), ("spec", "nodeSelector"),
    ("spec", "tolerations"), ("spec", "affinity"), ("spec", "schedulingGates"),
)  # fmt: skip


def _job_template_rest(template: Any) -> Any:
    out = copy.deepcopy(template) if isinstance(template, dict) else {}
    for section, field in _JOB_TEMPLATE_SCHEDULING:
        if isinstance(out.get(section), dict):
            out[section].pop(field, None)
    return out


# Pod fields a pod update may change (apps' ValidatePodUpdate): images, the active deadline and
# added tolerations; everything else in spec needs a new pod (resources: the resize subresource).
def _pod_spec_rest(spec: Any) -> Any:
    out = copy.deepcopy(spec) if isinstance(spec, dict) else {}
    for key in ("containers", "initContainers"):
        for container in out.get(key) or []:
            container.pop("image", None)
    for key in ("activeDeadlineSeconds", "tolerations"):
        out.pop(key, None)
    return out


def immutable_change(plural: str, current: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The field an update changes that the API server would refuse to change, or None.

    >>> immutable_change("deployments", {"spec": {"selector": {"a": 1}}},
    ...                  {"spec": {"selector": {"a": 2}}})
    'spec.selector'
    """
    fixed: list[tuple[str, ...]] = []
    if plural == "deployments":
        fixed = [("spec", "selector")]
    elif plural == "jobs":
        fixed = [
            ("spec", "selector"), ("spec", "manualSelector"), ("spec", "completionMode"),
            ("spec", "completions"), ("spec", "podFailurePolicy"),
            ("spec", "backoffLimitPerIndex"),
        ]  # fmt: skip
        before, after = _get(current, ("spec", "template")), _get(new, ("spec", "template"))
        if _suspended_job(current):
            before, after = _job_template_rest(before), _job_template_rest(after)
        if before != after:
            return "spec.template"
    elif plural == "services":
        if _get(current, ("spec", "clusterIP")):
            fixed = [("spec", "clusterIP")]
    elif plural == "pods":
        if _pod_spec_rest(current.get("spec")) != _pod_spec_rest(new.get("spec")):
            return "spec"
        added = _get(new, ("spec", "tolerations")) or []
        if any(t not in added for t in _get(current, ("spec", "tolerations")) or []):
            return "spec.tolerations"
    for path in fixed:
        if _get(current, path) != _get(new, path):
            return ".".join(path)
    return None


# The published CRDs of the kinds trimtab writes, as the API server would hold writes to them.
THIRDPARTY_CRDS = {
    ("gateway.networking.k8s.io", "httproutes"):
        thirdparty("gateway-api", "standard", "gateway.networking.k8s.io_httproutes.yaml"),
    ("networking.istio.io", "virtualservices"):
        thirdparty("istio", "virtualservices.networking.istio.io.yaml"),
    ("scheduling.x-k8s.io", "podgroups"):
        thirdparty("scheduler-plugins", "scheduling.x-k8s.io_podgroups.yaml"),
}  # fmt: skip


@functools.cache
def _status_schema(plural: str, version: str) -> dict[str, Any]:
    """The status schema of a trimtab CRD, closed: an undeclared field is an error here."""
    schema = crd_schema(ROOT / "crds" / f"{C.GROUP}_{plural}.yaml", version)
    result: dict[str, Any] = closed_schema(schema["properties"]["status"])
    return result


def _alter(request: kmock.Request, **changes: Any) -> kmock.Request:
    """Change the parsed request in place: kmock matches reactions against this very object."""
    for key, value in changes.items():
        object.__setattr__(request, key, value)
    return request


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock plus the parts of API-server behaviour kopf and trimtab rely on."""

    # Writes as (method, path, content type): tests count them.
    writes: list[tuple[str, str, str]] = attrs.field(factory=list)
    # Who each write says it is, as (fieldManager parameter, User-Agent).
    writers: list[tuple[str | None, str | None]] = attrs.field(factory=list)
    # Watch requests as (group, plural): kopf is ready once it watches.
    watches: list[tuple[str, str]] = attrs.field(factory=list)
    # Reads of one object, by path: tests count the requests a loop makes.
    reads: list[str] = attrs.field(factory=list)
    # What each field manager applied last, per object: server-side apply removes the fields
    # a manager applied before and leaves out now.
    applied: dict[tuple[Any, ...], dict[str, Any]] = attrs.field(factory=dict)
    # Writes the real API server would not keep as written: a status of trimtab's resources,
    # or an object of a third-party CRD trimtab writes (HTTPRoute, VirtualService, PodGroup),
    # with a field the CRD does not declare (pruned without a word), a value of the wrong type
    # or one its CEL rules refuse (refused). The `api` fixture fails a test that made any.
    schema_problems: list[str] = attrs.field(factory=list)
    # The CRD each third-party kind is held to, by (group, plural): a test of a cluster with
    # another channel of a CRD (Gateway API's experimental HTTPRoute) replaces one.
    crds: dict[tuple[str, str], Path] = attrs.field(factory=lambda: dict(THIRDPARTY_CRDS))

    def declare_resources(self) -> None:
        self.resources.load_bundled()
        for key, (kind, namespaced, verbs, subresources) in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=verbs, subresources=subresources
            )

    def _kind(self, request: kmock.Request) -> tuple[str, str]:
        res = request.resource
        assert res is not None
        api_version = f"{res.group}/{res.version}" if res.group else str(res.version)
        key = _key(res)
        kind = RESOURCES.get(key, ("",))[0] or str(
            getattr(self.resources.get(key), "kind", "") or ""
        )
        return api_version, kind

    def _current(self, request: kmock.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _stamp_new(self, request: kmock.Request, data: dict[str, Any]) -> dict[str, Any]:
        data = copy.deepcopy(data)
        api_version, kind = self._kind(request)
        data.setdefault("apiVersion", api_version)
        data.setdefault("kind", kind)
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace:
            meta["namespace"] = request.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(_rv))
        meta["generation"] = 1
        meta["creationTimestamp"] = _now()
        meta.setdefault("labels", {})
        data.pop("status", None) if kind not in (
            "Event",
        ) and request.resource and request.resource.plural != "events" else None
        return data

    async def _handle(self, request: kmock.Request) -> Any:
        try:
            return await self._handle_one(request)
        finally:
            self._forget(request)

    def _forget(self, request: kmock.Request) -> None:
        """Keep only the requests in flight. kmock matches each request to its reactions by
        scanning every request served so far, so a long test gets slower with every request
        (a GET costs about 85 ms after 600 requests, 1 ms without the history); tests count
        what they need in `writes` and `watches` instead."""
        served = self._requests
        for i in range(len(served) - 1, -1, -1):
            if served[i] is request:
                del served[i]
                break
        for payload in self._payloads:
            payload._requests.clear()

    async def _handle_one(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.action == enums.action.WATCH:
            self.watches.append((str(request.resource.group), str(request.resource.plural)))
        if request.resource is not None and request.action == enums.action.FETCH:
            self.reads.append(str(request.url.path))
        if request.resource is not None and request.action == enums.action.DELETE:
            current = self._current(request)
            if current is not None and current.get("metadata", {}).get("finalizers"):
                # As the API server: an object with finalizers is only marked for deletion,
                # and goes when the last finalizer is removed (see below).
                return await super()._handle(self._mark_deleted(request, current))
        if request.resource is None or request.action not in (
            enums.action.CREATE,
            enums.action.UPDATE,
        ):
            return await super()._handle(request)
        declared = self.resources.get(_key(request.resource))
        if request.subresource and request.subresource not in (
            getattr(declared, "subresources", None) or ()
        ):
            # As the API server: a subresource it does not serve is not found.
            return await self._render_error(
                kmock.KubernetesError(
                    status=404,
                    reason="NotFound",
                    message="the server could not find the requested resource",
                )
            )
        content_type = str(request.headers.get("Content-Type", ""))
        self.writes.append((str(request.method), str(request.url.path), content_type))
        self.writers.append(
            (request.params.get("fieldManager"), request.headers.get("User-Agent"))
        )
        try:
            request = self._prepare(request, content_type)
        except kmock.KubernetesError as err:
            return await self._render_error(err)
        response = await super()._handle(request)
        crd = self.crds.get((str(request.resource.group), str(request.resource.plural)))
        if crd is not None and (stored := self._stored(request)) is not None:
            # In a thread: CEL over a route takes milliseconds, and the operator shares this loop.
            version = str(request.resource.version)
            await asyncio.to_thread(self._check_object, stored, crd, version)
        after = self._current(request) if request.action == enums.action.UPDATE else None
        meta = (after or {}).get("metadata") or {}
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            await super()._handle(_alter(request, action=enums.action.DELETE, data=None))
        return response

    def _check_status(self, request: kmock.Request, status: dict[str, Any]) -> None:
        res = request.resource
        assert res is not None
        schema = _status_schema(str(res.plural), str(res.version))
        for error in jsonschema.Draft202012Validator(schema).iter_errors(status):
            where = f"{res.plural}/{request.name} status{error.json_path.removeprefix('$')}"
            self.schema_problems.append(f"{where}: {error.message}")

    def _stored(self, request: kmock.Request) -> dict[str, Any] | None:
        name = request.name or ((request.data or {}).get("metadata") or {}).get("name")
        key = (request.resource, request.namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _check_object(self, obj: dict[str, Any], crd: Path, version: str) -> None:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if "apiVersion" not in crd_schema(crd, version).get("properties", {}):
            # Istio's CRDs list no apiVersion or kind: the API server sets both.
            obj = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        try:
            validate_custom(obj, crd, version)
        except (jsonschema.ValidationError, AssertionError) as err:
            self.schema_problems.append(f"{where}: {str(err).splitlines()[0]}")

    def _refuse_undeclared(self, request: kmock.Request) -> None:
        """As the API server: a server-side apply that sets a field the kind's CRD does not
        declare is refused whole, as a 500 naming each such field (a create or a merge patch
        would have the field pruned instead; the `api` fixture counts those as problems)."""
        res = request.resource
        assert res is not None
        crd = self.crds.get((str(res.group), str(res.plural)))
        if crd is None or not isinstance(request.data, dict):
            return
        fields = list(undeclared_fields(crd_schema(crd, str(res.version)), request.data))
        if not fields:
            return
        api_version, kind = self._kind(request)
        group, _, version = api_version.rpartition("/")
        errors = (
            f"{fields[0]}: field not declared in schema"
            if len(fields) == 1
            else "errors:\n" + "\n".join(f"  {f}: field not declared in schema" for f in fields)
        )
        raise kmock.KubernetesError(
            status=500,
            reason=None,  # the API server gives none: the error is not a Status of its own
            message=f"failed to create typed patch object ({request.namespace}/{request.name}; "
            f"{group}/{version}, Kind={kind}): {errors}",
        )

    def _mark_deleted(self, request: kmock.Request, current: dict[str, Any]) -> kmock.Request:
        """The update that marks `current` for deletion: deletionTimestamp set once."""
        meta = current["metadata"]
        if meta.get("deletionTimestamp"):
            return _alter(request, action=enums.action.FETCH, data=None)
        new = copy.deepcopy(current)
        new["metadata"]["deletionTimestamp"] = _now()
        new["metadata"]["resourceVersion"] = str(next(_rv))
        return _alter(request, action=enums.action.UPDATE, data=diff(current, new))

    def _prepare(self, request: kmock.Request, content_type: str) -> kmock.Request:
        if request.action == enums.action.CREATE:
            data = self._stamp_new(request, request.data or {})
            name = data["metadata"]["name"]
            return _alter(request, data=data, name=None if request.name is None else name)

        current = self._current(request)
        applying = "apply-patch" in content_type and request.subresource is None
        if applying:
            self._refuse_undeclared(request)
        manager = (request.resource, request.namespace, request.name)
        manager += (request.params.get("fieldManager"),)
        if current is None:
            if applying:
                self.applied[manager] = copy.deepcopy(request.data or {})
                data = self._stamp_new(request, request.data or {})
                return _alter(request, action=enums.action.CREATE, data=data, name=None)
            raise kmock.KubernetesObjectNotFoundError()

        wanted_rv = (
            ((request.data or {}).get("metadata") or {}).get("resourceVersion")
            if (isinstance(request.data, dict))
            else None
        )
        if wanted_rv and wanted_rv != current.get("metadata", {}).get("resourceVersion"):
            # As the API server: a resourceVersion in a patch is a precondition.
            raise kmock.KubernetesError(
                status=409, reason="Conflict", message="the object has been modified"
            )
        if "json-patch" in content_type:
            new = json_patch(current, request.data)
        elif request.subresource == "scale":
            replicas = (request.data or {}).get("spec", {}).get("replicas")
            new = merge(current, {"spec": {"replicas": replicas}})
        elif applying:  # a merge of what was sent, less what this manager no longer sends
            new = merge(current, left_out(self.applied.get(manager) or {}, request.data or {}))
            self.applied[manager] = copy.deepcopy(request.data or {})
        else:  # merge and strategic merge (approximated): a merge of what was sent
            new = merge(current, request.data or {})

        changed = request.subresource is None and immutable_change(
            str(request.resource.plural), current, new
        )
        if changed:
            raise kmock.KubernetesError(
                status=422, reason="Invalid", message=f"{changed}: field is immutable"
            )
        if request.subresource == "resize" and _without_resources(new) != _without_resources(
            current
        ):
            # As the API server: the resize subresource changes container resources only.
            raise kmock.KubernetesError(
                status=422, reason="Invalid", message="only resources may change in a resize"
            )
        if request.subresource == "status":
            # A copy of metadata: the resourceVersion bump below must differ from `current`, or
            # the diff leaves it out and status writes never move the resourceVersion.
            new = {
                **current,
                "metadata": copy.deepcopy(current.get("metadata", {})),
                "status": new.get("status", {}),
            }
        elif request.subresource is None and "status" in current:
            # The main resource ignores status, as with a status subresource.
            new["status"] = current["status"]
        elif request.subresource is None:
            new.pop("status", None) if "status" not in current else None

        if request.resource.group == C.GROUP and new.get("status") != current.get("status"):
            self._check_status(request, new.get("status") or {})

        meta = new.setdefault("metadata", {})
        for key in ("uid", "creationTimestamp", "generation"):
            if key in current.get("metadata", {}):
                meta[key] = current["metadata"][key]
        if new == current:
            return _alter(request, data={}, subresource=None)
        body_changed = {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
            k: v for k, v in current.items() if k not in ("metadata", "status")
        }
        if body_changed:
            meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
        meta["resourceVersion"] = str(next(_rv))
        return _alter(request, data=diff(current, new), subresource=None)
