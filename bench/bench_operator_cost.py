"""Operator cost: the real kopf operator with every trimtab handler, in one process, against the
API server emulator the tests use (in a child process, so that the measured process holds only
the operator and the bench's small client). Measured for N ModelDeployments:

1. seconds from creating them until every one has status.observedGeneration == generation (and
   until phase Ready, with a small fake Deployment controller marking Deployments ready);
2. API writes per resource for the create reconcile, by request;
3. writes of a no-op reconcile: the operator restarts against the same state (resume handlers);
4. writes per resource for a spec change (a new image: a new revision replaces the old);
5. steady-state writes per resource per minute with autoscaling on, against a real Prometheus
   scraping a vLLM-style exporter (skipped without the prometheus binary);
6. resident memory (VmRSS) of the operator's process before and after, per resource.

Writes are told apart by who sent them: the bench (users and the Deployment controller), kopf's
own client (handler patches, finalizers, annotations, Events) and trimtab's KubeClient. Events
whose reason is kopf's "Logging" are kopf's own; the rest are trimtab's (kopf.event, kopf.warn).
Each N runs in a fresh process so that memory from one size does not hide the next.

    python -m bench operator_cost   (or: python -m bench.bench_operator_cost --sizes 10,50,100)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import multiprocessing as mp
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import kmock
import kopf
import yaml
from kmock._internal import enums  # the action enum kmock dispatches on
from tests.kube_emulator import ApiServerEmulator
from tests.prometheus_fixture import MetricsExporter, PodTarget, PrometheusServer, prometheus_binary

from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.serving import revision_of
from trimtab.config import Settings
from trimtab.kube.client import KubeClient, KubeError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "operator_cost.json"
NS = "bench"
MD_PATH = f"/apis/{C.GROUP}/{C.VERSION}/namespaces/{NS}/{C.MODELDEPLOYMENT_PLURAL}"
DEPLOY_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments"
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
# Who sent a request, from its bearer token (the emulator accepts any).
BENCH, KOPF, TRIMTAB = "bench", "kopf", "trimtab"
POLL_S = 0.25  # how often the bench looks at the cluster (resolution of the times)
RESULT_PREFIX = "RESULT "

_LOGIN: dict[str, str] = {}


@kopf.on.login()
def login_to_emulator(**_: Any) -> kopf.ConnectionInfo:
    """Bench only: kopf connects to this run's emulator, with a token that marks its requests."""
    return kopf.ConnectionInfo(server=_LOGIN["url"], insecure=True, scheme="Bearer", token=KOPF)


# --- the emulator, in its own process --------------------------------------------------------


class Record(NamedTuple):
    """One request the emulator saw: a write, or a watch (kind "watch")."""

    kind: str
    writer: str
    method: str
    plural: str
    subresource: str
    reason: str  # an Event's reason


@attrs.define(kw_only=True)
class RecordingEmulator(ApiServerEmulator):
    """The tests' emulator, reporting every write and watch to the bench's process."""

    sink: Any = None

    async def _handle(self, request: kmock.Request) -> Any:
        res = request.resource
        if res is not None and self.sink is not None:
            method = str(getattr(request.method, "value", request.method))
            if method in WRITE_METHODS:
                auth = next(
                    (str(v) for k, v in request.headers.items() if k.lower() == "authorization"),
                    "",
                )
                data = request.data if isinstance(request.data, dict) else {}
                reason = str(data.get("reason") or "") if res.plural == "events" else ""
                writer = auth.split(" ")[-1] if auth else "?"
                rec = Record(
                    "write", writer, method, str(res.plural), request.subresource or "", reason
                )
                self.sink.put(tuple(rec))
            elif request.action == enums.action.WATCH:
                self.sink.put(tuple(Record("watch", "", "GET", str(res.plural), "", "")))
        # The tests' emulator forgets each request once served (kmock would rescan them all).
        return await super()._handle(request)


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _emulator_main(conn: Connection, sink: Any) -> None:
    asyncio.run(_emulate(conn, sink))


async def _emulate(conn: Connection, sink: Any) -> None:
    async with RecordingEmulator(sink=sink) as api, kmock.Server(api):
        api.declare_resources()
        conn.send(str(api.url).rstrip("/"))
        while await asyncio.to_thread(conn.recv) != "stop":
            pass


class Emulator:
    """The emulator's child process, and the log of what it saw."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._sink = ctx.Queue()
        self.proc = ctx.Process(target=_emulator_main, args=(child, self._sink), daemon=True)
        self.log: list[Record] = []
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> Emulator:
        self.proc.start()
        if not self._conn.poll(timeout_s):
            raise RuntimeError("the emulator did not start")
        self.url = str(self._conn.recv())
        return self

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)

    def drain(self) -> list[Record]:
        while True:
            try:
                self.log.append(Record(*self._sink.get_nowait()))
            except queue.Empty:
                return self.log

    def watches(self, plural: str) -> int:
        return sum(1 for r in self.drain() if r.kind == "watch" and r.plural == plural)

    def writes_since(self, mark: int) -> list[Record]:
        return [r for r in self.drain()[mark:] if r.kind == "write"]

    def mark(self) -> int:
        return len(self.drain())


# --- writes, summarised ----------------------------------------------------------------------


def request_name(r: Record) -> str:
    target = r.plural + (f"/{r.subresource}" if r.subresource else "")
    return f"{r.writer} {r.method} {target}" + (f" ({r.reason})" if r.reason else "")


def summarize_writes(records: Iterable[Record], n: int) -> dict[str, Any]:
    """Operator writes (kopf's client and trimtab's) per resource, split into objects, trimtab's
    Events and kopf's own Events, and every distinct request with its count."""
    ops = [r for r in records if r.writer != BENCH]
    events = [r for r in ops if r.plural == "events"]
    kopf_events = [r for r in events if r.reason == "Logging"]
    objects = len(ops) - len(events)
    return {
        "total": len(ops),
        "objects": objects,
        "trimtab_events": len(events) - len(kopf_events),
        "kopf_events": len(kopf_events),
        "per_resource": round(len(ops) / n, 2),
        "objects_per_resource": round(objects / n, 2),
        "by_request": dict(sorted(Counter(request_name(r) for r in ops).items())),
        "bench_writes": sum(1 for r in records if r.writer == BENCH),
    }


# --- the operator, in this process -----------------------------------------------------------


def reconciles_ok() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "trimtab_reconcile_total", {"kind": C.MODELDEPLOYMENT_KIND, "result": "ok"}
    )
    return float(value or 0.0)


async def wait_until(
    probe: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout_s: float, what: str
) -> float:
    """Poll `probe` every POLL_S; the monotonic time it first held. Raises after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic()
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"{what}: not within {timeout_s}s")


@contextlib.asynccontextmanager
async def run_operator(emu: Emulator, settings: Settings) -> AsyncIterator[None]:
    """kopf.operator with every trimtab handler in this event loop until the block ends, as the
    tests' `run_operator` does; returns once it watches ModelDeployments."""
    import trimtab.handlers  # noqa: F401  # registers the handlers with kopf

    _LOGIN["url"] = emu.url
    kube = KubeClient(emu.url, ssl_context=False, token=lambda: f"Bearer {TRIMTAB}")
    kopf_settings = kopf.OperatorSettings()
    kopf_settings.watching.server_timeout = 30
    kopf_settings.watching.reconnect_backoff = 0.2
    kopf_settings.batching.exit_timeout = 1
    stop, ready = asyncio.Event(), asyncio.Event()
    watches_before = emu.watches(C.MODELDEPLOYMENT_PLURAL)
    task = asyncio.create_task(
        kopf.operator(
            clusterwide=True,
            standalone=True,
            settings=kopf_settings,
            memo=kopf.Memo(kube=kube, settings=settings),
            stop_flag=stop,
            ready_flag=ready,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 30)

        def watching() -> bool:
            if task.done():
                task.result()
            return emu.watches(C.MODELDEPLOYMENT_PLURAL) > watches_before

        await wait_until(watching, 30, "kopf watching ModelDeployments")
        yield
    finally:
        stop.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, 20)
        await kube.close()


class Bench:
    """The bench's own client: it creates and edits ModelDeployments as a user would, and
    plays the Deployment controller."""

    def __init__(self, url: str) -> None:
        self.kube = KubeClient(url, ssl_context=False, token=lambda: f"Bearer {BENCH}")

    async def create_all(self, bodies: list[dict[str, Any]], parallel: int = 8) -> None:
        gate = asyncio.Semaphore(parallel)

        async def one(body: dict[str, Any]) -> None:
            async with gate:
                await self.kube.request("POST", MD_PATH, body=body)

        await asyncio.gather(*(one(b) for b in bodies))

    async def merge_all(self, names: list[str], patch: dict[str, Any], parallel: int = 8) -> None:
        gate = asyncio.Semaphore(parallel)

        async def one(name: str) -> None:
            async with gate:
                await self.kube.request(
                    "PATCH",
                    f"{MD_PATH}/{name}",
                    body=patch,
                    content_type="application/merge-patch+json",
                )

        await asyncio.gather(*(one(n) for n in names))

    async def modeldeployments(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (await self.kube.request("GET", MD_PATH)).get("items", [])
        return items

    async def deployments(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (await self.kube.request("GET", DEPLOY_PATH)).get("items", [])
        return items

    async def deployment_controller(self, stop: asyncio.Event) -> None:
        """Mark every Deployment ready (all replicas up to date) soon after it changes."""
        while not stop.is_set():
            with contextlib.suppress(KubeError):
                for d in await self.deployments():
                    if not _deployment_ready(d):
                        with contextlib.suppress(KubeError):
                            await self._mark_ready(d)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)

    async def _mark_ready(self, d: dict[str, Any]) -> None:
        replicas = d["spec"].get("replicas", 1)
        await self.kube.request(
            "PATCH",
            f"{DEPLOY_PATH}/{d['metadata']['name']}/status",
            body={
                "status": {
                    "observedGeneration": d["metadata"]["generation"],
                    "replicas": replicas,
                    "readyReplicas": replicas,
                    "updatedReplicas": replicas,
                    "availableReplicas": replicas,
                    "conditions": [
                        {
                            "type": "Available",
                            "status": "True",
                            "reason": "MinimumReplicasAvailable",
                        },
                        {
                            "type": "Progressing",
                            "status": "True",
                            "reason": "NewReplicaSetAvailable",
                        },
                    ],
                }
            },
            content_type="application/merge-patch+json",
        )

    async def close(self) -> None:
        await self.kube.close()


def _deployment_ready(d: dict[str, Any]) -> bool:
    status = d.get("status") or {}
    replicas = d["spec"].get("replicas", 1)
    return bool(
        status.get("observedGeneration") == d["metadata"].get("generation")
        and status.get("readyReplicas") == replicas
        and status.get("updatedReplicas") == replicas
    )


def _observed(md: dict[str, Any]) -> bool:
    return bool(
        (md.get("status") or {}).get("observedGeneration") == md["metadata"].get("generation")
    )


@dataclass
class Progress:
    """When each resource first met a condition, from the bench's polls."""

    since: float
    at: dict[str, float] = field(default_factory=dict)

    def note(self, names: Iterable[str], now: float) -> None:
        for name in names:
            self.at.setdefault(name, now - self.since)

    def summary(self) -> dict[str, float]:
        values = sorted(self.at.values())
        return {
            "p50": round(statistics.median(values), 2),
            "p95": round(values[min(len(values) - 1, int(0.95 * len(values)))], 2),
            "all": round(values[-1], 2),
        }


async def track(
    bench: Bench,
    n: int,
    since: float,
    conditions: dict[str, Callable[[dict[str, Any]], bool]],
    timeout_s: float,
) -> dict[str, Progress]:
    """Poll the ModelDeployments until all `n` meet every condition; when each met each."""
    progress = {name: Progress(since) for name in conditions}

    async def done() -> bool:
        items = await bench.modeldeployments()
        now = time.monotonic()
        for name, cond in conditions.items():
            progress[name].note((i["metadata"]["name"] for i in items if cond(i)), now)
        return all(len(p.at) >= n for p in progress.values())

    await wait_until(done, timeout_s, f"{n} ModelDeployments: {', '.join(conditions)}")
    return progress


async def settle(emu: Emulator, quiet_s: float, timeout_s: float) -> float:
    """Wait until the operator has written nothing for `quiet_s`; the seconds that took."""
    started = time.monotonic()
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() - started < timeout_s:
        count = sum(1 for r in emu.drain() if r.kind == "write" and r.writer != BENCH)
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            break
        await asyncio.sleep(0.1)
    return round(time.monotonic() - started, 2)


# --- the resources -----------------------------------------------------------------------------


def example_spec() -> dict[str, Any]:
    body = yaml.safe_load((ROOT / "examples" / "modeldeployment.yaml").read_text())
    return dict(body["spec"])


def reconcile_model(name: str) -> dict[str, Any]:
    """The example's spec with autoscaling and right-sizing off: what one reconcile costs,
    without the control loops (their writes are measured separately)."""
    spec = example_spec()
    spec.pop("autoscaling", None)
    spec["rightsizing"] = {"mode": "Off"}
    return {
        "apiVersion": C.API_VERSION,
        "kind": C.MODELDEPLOYMENT_KIND,
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def autoscaled_spec(prometheus_url: str) -> dict[str, Any]:
    """The example's spec with a short loop and rate window, reading a local Prometheus."""
    spec = example_spec()
    spec["replicas"] = 1
    spec["slo"] = {"p99LatencyMs": 2000, "latency": "e2e"}
    spec["autoscaling"] = {
        "minReplicas": 1,
        "maxReplicas": 8,
        "targetConcurrency": 8,
        "interval": "1s",
        "coldStart": "5s",
        "scaleDownStabilization": "5s",
    }
    # The Prometheus below scrapes every 500 ms: the spec says so, and its rate() window
    # holds four scrapes.
    spec["metrics"] = {
        "prometheusUrl": prometheus_url,
        "rateWindow": "2s",
        "scrapeInterval": "500ms",
    }
    spec["rightsizing"] = {"mode": "Off"}
    return spec


def names(n: int) -> list[str]:
    return [f"model-{i:03d}" for i in range(n)]


# --- one size, in a fresh process -------------------------------------------------------------


async def measure_reconcile(n: int, restart_settle_s: float) -> dict[str, Any]:
    emu = Emulator().start()
    bench = Bench(emu.url)
    stop_controller = asyncio.Event()
    controller = asyncio.create_task(bench.deployment_controller(stop_controller))
    settings = Settings(prometheus_url="http://127.0.0.1:9")
    result: dict[str, Any] = {"n": n}
    rss: dict[str, int] = {"start": rss_kib()}
    try:
        # 1-2: create N, until observed and Ready; writes until the operator goes quiet.
        async with run_operator(emu, settings):
            await asyncio.sleep(0.5)
            rss["operator_ready"] = rss_kib()
            mark = emu.mark()
            t0 = time.monotonic()
            await bench.create_all([reconcile_model(x) for x in names(n)])
            created = time.monotonic() - t0
            cpu = time.process_time()
            progress = await track(
                bench,
                n,
                t0,
                {
                    "observed": _observed,
                    "ready": lambda md: (md.get("status") or {}).get("phase") == "Ready",
                },
                timeout_s=120,
            )
            quiet_after = await settle(emu, quiet_s=1.5, timeout_s=30)
            cpu = time.process_time() - cpu
            result["create"] = {
                "cpu_s_per_resource": round(cpu / n, 4),
                "posting_s": round(created, 2),
                "to_observed_generation_s": progress["observed"].summary(),
                "to_ready_s": progress["ready"].summary(),
                "quiet_after_s": quiet_after,
                "writes": summarize_writes(emu.writes_since(mark), n),
            }
            rss["after_create"] = rss_kib()
            revisions = {
                md["metadata"]["name"]: md["status"]["currentRevision"]
                for md in await bench.modeldeployments()
            }

        # 3: a restart against the same state resumes every resource; nothing changed.
        mark = emu.mark()
        before = reconciles_ok()
        t0 = time.monotonic()
        async with run_operator(emu, settings):
            started = time.monotonic() - t0
            resumed = await wait_until(lambda: reconciles_ok() - before >= n, 120, "resume")
            await asyncio.sleep(restart_settle_s)
            writes = emu.writes_since(mark)
            result["restart"] = {
                "operator_start_s": round(started, 2),
                "resume_all_s": round(resumed - t0, 2),
                "settle_s": restart_settle_s,
                "writes": summarize_writes(writes, n),
            }
            rss["after_restart"] = rss_kib()

            # 4: a new image on every resource: a new revision replaces the old once ready.
            mark = emu.mark()
            t0 = time.monotonic()
            cpu = time.process_time()
            await bench.merge_all(names(n), {"spec": {"image": "vllm/vllm-openai:v0.7.0"}})

            def replaced(md: dict[str, Any]) -> bool:
                status = md.get("status") or {}
                return (
                    status.get("phase") == "Ready"
                    and status.get("currentRevision") != revisions[md["metadata"]["name"]]
                    and _observed(md)
                )

            progress = await track(
                bench, n, t0, {"observed": _observed, "replaced": replaced}, timeout_s=120
            )
            retired = await wait_until(
                lambda: _count_deployments(bench, n), 60, "old revisions retired"
            )
            quiet_after = await settle(emu, quiet_s=1.5, timeout_s=30)
            cpu = time.process_time() - cpu
            result["spec_change"] = {
                "cpu_s_per_resource": round(cpu / n, 4),
                "to_observed_generation_s": progress["observed"].summary(),
                "to_new_revision_ready_s": progress["replaced"].summary(),
                "to_old_retired_s": round(retired - t0, 2),
                "writes": summarize_writes(emu.writes_since(mark), n),
            }
            rss["after_spec_change"] = rss_kib()
        stop_controller.set()
        await controller
        result["rss_kib"] = rss
        result["emulator_rss_kib"] = rss_kib(emu.proc.pid or "self")
        return result
    finally:
        stop_controller.set()
        await bench.close()
        emu.stop()


async def _count_deployments(bench: Bench, n: int) -> bool:
    return len(await bench.deployments()) == n


async def measure_autoscaling(n: int, window_s: float, refresh_s: float) -> dict[str, Any]:
    """N autoscaled ModelDeployments under steady load: writes per resource per minute."""
    binary = prometheus_binary()
    assert binary is not None
    spec = autoscaled_spec("http://127.0.0.1:9")
    revision = revision_of(ModelDeploymentSpec.model_validate(spec))
    exporter = MetricsExporter("vllm", model="m").start()
    exporter.set_queue(0)
    exporter.set_running(1)
    exporter.set_load(1.0, 0.5)
    targets = [
        PodTarget(
            exporter.address,
            namespace=NS,
            pod=f"{name}-{revision}-0",
            labels={C.LABEL_OWNER: name, C.LABEL_REVISION: revision, C.LABEL_MANAGED_BY: "trimtab"},
        )
        for name in names(n)
    ]
    with tempfile.TemporaryDirectory(prefix="trimtab-opcost-") as tmp:
        prometheus = PrometheusServer(targets, Path(tmp), scrape_interval="500ms", binary=binary)
        emu: Emulator | None = None
        bench: Bench | None = None
        stop_controller = asyncio.Event()
        try:
            await asyncio.to_thread(prometheus.start)
            await asyncio.to_thread(prometheus.wait_for_scrapes, 30.0)
            emu = Emulator().start()
            bench = Bench(emu.url)
            controller = asyncio.create_task(bench.deployment_controller(stop_controller))
            settings = Settings(
                prometheus_url=prometheus.url, autoscaling_status_refresh_seconds=refresh_s
            )
            spec = autoscaled_spec(prometheus.url)
            assert revision_of(ModelDeploymentSpec.model_validate(spec)) == revision
            async with run_operator(emu, settings):
                rss_before = rss_kib()
                await bench.create_all(
                    [
                        {
                            "apiVersion": C.API_VERSION,
                            "kind": C.MODELDEPLOYMENT_KIND,
                            "metadata": {"name": x, "namespace": NS},
                            "spec": copy.deepcopy(spec),
                        }
                        for x in names(n)
                    ]
                )

                def deciding(md: dict[str, Any]) -> bool:
                    status = md.get("status") or {}
                    auto = status.get("autoscaling") or {}
                    signals = {s["name"]: s["state"] for s in auto.get("signals") or []}
                    return (
                        status.get("phase") == "Ready"
                        and bool(auto.get("lastDecisionTime"))
                        and signals.get("queueDepth") == "value"
                    )

                await track(bench, n, time.monotonic(), {"deciding": deciding}, timeout_s=60)
                # Steady from here: the Deployments stay ready without the bench's controller,
                # so this process runs only the operator during the window.
                stop_controller.set()
                await controller
                await asyncio.sleep(min(refresh_s, 10.0))
                mark = emu.mark()
                cpu = time.process_time()
                await asyncio.sleep(window_s)
                cpu = time.process_time() - cpu
                writes = emu.writes_since(mark)
                items = await bench.modeldeployments()
                rss_after = rss_kib()
        finally:
            stop_controller.set()
            if bench is not None:
                await bench.close()
            if emu is not None:
                emu.stop()
            await asyncio.to_thread(prometheus.stop)
            exporter.stop()
    summary = summarize_writes(writes, n)
    per_minute = 60.0 / window_s
    return {
        "n": n,
        "loop_interval_s": 1.0,
        "status_refresh_s": refresh_s,
        "scrape_interval_s": 0.5,
        "window_s": window_s,
        "writes": summary,
        "writes_per_resource_per_minute": round(summary["total"] / n * per_minute, 2),
        "status_writes_per_resource_per_minute": round(
            sum(
                c
                for k, c in summary["by_request"].items()
                if k.endswith(f"{C.MODELDEPLOYMENT_PLURAL}/status")
            )
            / n
            * per_minute,
            2,
        ),
        "operator_cpu_s_per_resource_per_minute": round(cpu / n * per_minute, 3),
        "replicas": sorted(
            {
                int((i.get("status") or {}).get("autoscaling", {}).get("desiredReplicas", -1))
                for i in items
            }
        ),
        "rss_kib": {"operator_ready": rss_before, "steady": rss_after},
    }


# --- the driver ---------------------------------------------------------------------------------


def run_worker(args: list[str], timeout_s: float) -> dict[str, Any]:
    """One measurement in a fresh interpreter; its result is the RESULT line it prints."""
    cmd = [sys.executable, "-m", "bench.bench_operator_cost", *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return result
    raise RuntimeError(
        f"worker {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )


def _fmt_requests(by_request: dict[str, int], n: int) -> str:
    return "; ".join(f"{k} {v / n:g}" for k, v in by_request.items()) or "none"


def report(result: dict[str, Any]) -> None:
    rows = result["sizes"]
    print("operator cost: ModelDeployments from examples/modeldeployment.yaml, autoscaling and")
    print("right-sizing off; kopf + trimtab in one process, the API emulator in another")
    print(
        f"{'N':>5}{'->observed p50/all s':>22}{'->Ready all s':>15}{'writes/res':>12}"
        f"{'restart writes':>16}{'resume s':>10}{'change writes/res':>19}{'->new rev s':>13}"
    )
    for r in rows:
        c, s, ch = r["create"], r["restart"], r["spec_change"]
        obs = c["to_observed_generation_s"]
        print(
            f"{r['n']:>5}{str(obs['p50']) + ' / ' + str(obs['all']):>22}"
            f"{c['to_ready_s']['all']:>15}{c['writes']['per_resource']:>12}"
            f"{s['writes']['total']:>16}{s['resume_all_s']:>10}"
            f"{ch['writes']['per_resource']:>19}{ch['to_new_revision_ready_s']['all']:>13}"
        )
    print(
        f"\n{'N':>5}{'RSS ready MiB':>15}{'after MiB':>11}{'KiB/res':>9}"
        f"{'marginal KiB/res':>18}{'CPU ms/res create':>19}{'change':>8}"
    )
    for r in rows:
        m = r["memory"]
        marginal = m.get("marginal_kib_per_resource")
        print(
            f"{r['n']:>5}{m['operator_ready_mib']:>15}{m['after_create_mib']:>11}"
            f"{m['kib_per_resource']:>9}{'' if marginal is None else marginal:>18}"
            f"{round(r['create']['cpu_s_per_resource'] * 1000, 1):>19}"
            f"{round(r['spec_change']['cpu_s_per_resource'] * 1000, 1):>8}"
        )
    last = rows[-1]
    n = last["n"]
    print(f"\nper resource at N={n}, by request (sender, method, resource):")
    print(f"  create:      {_fmt_requests(last['create']['writes']['by_request'], n)}")
    print(f"  restart:     {_fmt_requests(last['restart']['writes']['by_request'], n)}")
    print(f"  spec change: {_fmt_requests(last['spec_change']['writes']['by_request'], n)}")
    auto = result.get("autoscaling")
    if auto is None:
        print("\nautoscaling steady state: skipped (no prometheus binary)")
    else:
        print(
            f"\nautoscaling steady state: N={auto['n']}, loop {auto['loop_interval_s']}s, status "
            f"refresh {auto['status_refresh_s']}s, {auto['window_s']}s window: "
            f"{auto['writes_per_resource_per_minute']} writes/resource/min "
            f"(status {auto['status_writes_per_resource_per_minute']}), operator CPU "
            f"{auto['operator_cpu_s_per_resource_per_minute']} s/resource/min"
        )
        print(f"  by request: {_fmt_requests(auto['writes']['by_request'], auto['n'])}")
    print(f"wrote {RESULTS}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="10,50,100", help="N values, comma-separated")
    parser.add_argument("--restart-settle", type=float, default=3.0, help="seconds")
    parser.add_argument("--autoscaled", type=int, default=10, help="N for the steady state")
    parser.add_argument("--window", type=float, default=60.0, help="steady-state seconds")
    parser.add_argument(
        "--refresh", type=float, default=30.0, help="status refresh seconds (the default)"
    )
    parser.add_argument("--worker", choices=["reconcile", "autoscaling"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv if argv is not None else [])

    if args.worker == "reconcile":
        out = asyncio.run(measure_reconcile(args.n, args.restart_settle))
        print(RESULT_PREFIX + json.dumps(out))
        return 0
    if args.worker == "autoscaling":
        out = asyncio.run(measure_autoscaling(args.n, args.window, args.refresh))
        print(RESULT_PREFIX + json.dumps(out))
        return 0

    started = time.monotonic()
    sizes = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    rows: list[dict[str, Any]] = []
    for n in sizes:
        row = run_worker(
            ["--worker", "reconcile", "--n", str(n), "--restart-settle", str(args.restart_settle)],
            timeout_s=400,
        )
        rss = row["rss_kib"]
        row["memory"] = {
            "operator_ready_mib": round(rss["operator_ready"] / 1024, 1),
            "after_create_mib": round(rss["after_create"] / 1024, 1),
            "after_spec_change_mib": round(rss["after_spec_change"] / 1024, 1),
            "kib_per_resource": round((rss["after_create"] - rss["operator_ready"]) / n, 1),
        }
        if rows:
            prev = rows[-1]
            grown = rss["after_create"] - prev["rss_kib"]["after_create"]
            row["memory"]["marginal_kib_per_resource"] = round(grown / (n - prev["n"]), 1)
        rows.append(row)
        print(f"N={n}: done ({time.monotonic() - started:.0f}s)", flush=True)

    auto = None
    if args.autoscaled > 0 and prometheus_binary() is not None:
        auto = run_worker(
            [
                "--worker",
                "autoscaling",
                "--n",
                str(args.autoscaled),
                "--window",
                str(args.window),
                "--refresh",
                str(args.refresh),
            ],
            timeout_s=400,
        )
    result = {
        "benchmark": "operator cost: reconcile time, API writes and memory for N ModelDeployments",
        "setup": {
            "sizes": sizes,
            "spec": "examples/modeldeployment.yaml, autoscaling and right-sizing off",
            "api_server": "tests/kube_emulator.py (kmock), in a child process",
            "deployment_controller": f"the bench marks Deployments ready, polling every {POLL_S}s",
            "poll_s": POLL_S,
            "restart_settle_s": args.restart_settle,
        },
        "sizes": rows,
        "autoscaling": auto,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    # No targets are set for this benchmark: the numbers are reported, not judged.
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
