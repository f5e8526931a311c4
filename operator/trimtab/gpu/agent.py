"""`trimtab gpu-agent`: a node agent that reads per-process GPU memory and utilization from NVML
and serves them per namespace/pod/container on /metrics for right-sizing.

Runs as a DaemonSet with hostPID (to read /proc/<pid>/cgroup of GPU processes). Without a GPU or
driver it logs why once and serves an empty /metrics; a GPU that fails later (NVML errors such as
"GPU is lost") is left out and counted while the others are still served, and /healthz answers
without touching NVML: it never exits into a crash loop."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import pynvml
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from trimtab.gpu.cgroup import container_of
from trimtab.gpu.pods import PodDirectory, kubernetes_pod_lister

log = logging.getLogger("trimtab.gpu.agent")

LABELS = (
    "namespace", "pod", "container", "gpu", "gpu_model", "mig_profile", "pod_uid", "container_id"
)
# NVML's "not available" for 64-bit values (NVML_VALUE_NOT_AVAILABLE_ulonglong: all ones).
NVML_VALUE_NOT_AVAILABLE = 2**64 - 1
# Retry NVML initialisation this often when it failed (a driver can be installed after boot).
INIT_RETRY_S = 300.0


@dataclass(frozen=True)
class GpuProcess:
    """One process on one GPU (or MIG device)."""

    pid: int
    gpu: str  # "0" for a whole GPU, "0/mig1" for MIG device 1 of GPU 0
    gpu_model: str  # NVML's device name of the parent GPU
    mig_profile: str  # "3g.40gb", or "" for a whole GPU
    memory_bytes: int | None  # None: NVML cannot say (no per-process accounting, see _memory)
    utilization: float | None  # 0..1 of the (MIG) device over the last interval; None: unknown


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _memory(used: Any) -> int | None:
    """A process's usedGpuMemory, or None where NVML reports NVML_VALUE_NOT_AVAILABLE (vGPU
    guests, Windows WDDM, some MIG and confidential-computing setups): nvidia-ml-py turns that
    into None; an older binding may hand over the raw all-ones value."""
    if not isinstance(used, int) or used >= NVML_VALUE_NOT_AVAILABLE:
        return None
    return used


def _mig_profile(name: str) -> str:
    """ "NVIDIA A100-SXM4-80GB MIG 3g.40gb" -> "3g.40gb"."""
    marker = " MIG "
    return name.split(marker, 1)[1].strip() if marker in name else ""


def _versioned(function: str, handle: Any) -> list[Any]:
    """`function`'s answer through the newest entry point the driver has. pynvml calls the
    newest (_v3, from the R510 drivers) and turns a driver without it into
    NVMLLibraryMismatchError, which is no NVMLError: older drivers get the _v2 they have."""
    try:
        answer: list[Any] = getattr(pynvml, function)(handle)
    except (pynvml.NVMLLibraryMismatchError, pynvml.NVMLError_FunctionNotFound):
        answer = getattr(pynvml, f"{function}_v2")(handle)
    return answer


def running_processes(handle: Any) -> list[Any]:
    """The compute processes on a device, and under MPS its clients: there the MPS server is
    the device's compute process, and each client (with its own memory) is listed apart. A
    process in both lists counts once."""
    processes = _versioned("nvmlDeviceGetComputeRunningProcesses", handle)
    try:
        clients = _versioned("nvmlDeviceGetMPSComputeRunningProcesses", handle)
    except pynvml.NVMLError:
        clients = []  # no MPS on this device or driver
    seen = {int(p.pid) for p in processes}
    return processes + [c for c in clients if int(c.pid) not in seen]


class NvmlReader:
    """Reads GPU processes through pynvml. Keeps, per device, the timestamp of the last
    utilization sample it saw so each read covers the interval since the previous one."""

    def __init__(self) -> None:
        self.ready = False
        self.reason = ""
        self._last_init_try = -1e18
        self._last_seen: dict[str, int] = {}
        # Per device label: whether the last read could read it, and NVML errors so far.
        self.device_up: dict[str, bool] = {}
        self.device_errors: dict[str, int] = {}
        self._device_problem: dict[str, str] = {}  # the last error logged; "" once it recovers
        self._no_memory_logged: set[str] = set()

    def ensure_init(self) -> bool:
        if self.ready:
            return True
        now = time.monotonic()
        if now - self._last_init_try < INIT_RETRY_S:
            return False
        self._last_init_try = now
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as err:
            self.reason = f"NVML unavailable ({err}): no NVIDIA driver or GPU on this node"
            log.warning("%s; serving empty /metrics, retrying every %ds", self.reason, INIT_RETRY_S)
            return False
        if count == 0:
            self.reason = "NVML found no GPU on this node"
            log.warning("%s; serving empty /metrics", self.reason)
            pynvml.nvmlShutdown()
            return False
        self.ready = True
        try:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError as err:
            driver = f"unknown ({err})"
        log.info("NVML ready: %d GPU(s), driver %s", count, driver)
        return True

    def shutdown(self) -> None:
        if self.ready:
            pynvml.nvmlShutdown()
            self.ready = False

    def _device_failed(self, label: str, what: str, err: pynvml.NVMLError) -> None:
        """A device NVML cannot read now ("GPU is lost", a reset pending, ...): left out of this
        read and counted; logged when its problem changes, not on every scrape."""
        self.device_up[label] = False
        self.device_errors[label] = self.device_errors.get(label, 0) + 1
        problem = f"{what}: {err}"
        if self._device_problem.get(label) != problem:
            self._device_problem[label] = problem
            log.warning("GPU %s: %s; leaving it out until it answers again", label, problem)

    def _device_read(self, label: str) -> None:
        self.device_up[label] = True
        if self._device_problem.get(label):
            log.info("GPU %s answers again", label)
        self._device_problem[label] = ""

    def _nvml_failed(self, err: pynvml.NVMLError) -> None:
        """NVML as a whole stopped answering (a driver unloaded or upgraded underneath): serve
        nothing, report NVML down and initialise again later."""
        self.reason = f"NVML stopped answering ({err})"
        log.warning("%s; serving empty /metrics, retrying every %ds", self.reason, INIT_RETRY_S)
        self.ready = False
        self.device_up.clear()
        self._last_init_try = time.monotonic()
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()

    def _devices(self) -> list[tuple[str, Any, str, str]]:
        """(gpu label, handle, parent model, MIG profile) for each GPU, or for each MIG device of
        a GPU in MIG mode (processes and memory live on the MIG devices then). A device NVML
        cannot open is left out (see _device_failed)."""
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as err:
            self._nvml_failed(err)
            return []
        out: list[tuple[str, Any, str, str]] = []
        for i in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                model = _text(pynvml.nvmlDeviceGetName(handle))
            except pynvml.NVMLError as err:
                self._device_failed(str(i), "cannot open it", err)
                continue
            try:
                current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
            except pynvml.NVMLError:
                current = pynvml.NVML_DEVICE_MIG_DISABLE  # GPUs without MIG answer NOT_SUPPORTED
            if current != pynvml.NVML_DEVICE_MIG_ENABLE:
                out.append((str(i), handle, model, ""))
                continue
            try:
                slots = pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)
            except pynvml.NVMLError as err:
                self._device_failed(str(i), "cannot list its MIG devices", err)
                continue
            self._device_read(str(i))  # the parent GPU; its MIG devices are read one by one
            for m in range(slots):
                try:
                    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, m)
                except pynvml.NVMLError as err:
                    if getattr(err, "value", None) != pynvml.NVML_ERROR_NOT_FOUND:
                        self._device_failed(f"{i}/mig{m}", "cannot open it", err)
                    continue  # NOT_FOUND: an empty slot
                try:
                    profile = _mig_profile(_text(pynvml.nvmlDeviceGetName(mig)))
                except pynvml.NVMLError as err:
                    self._device_failed(f"{i}/mig{m}", "cannot open it", err)
                    continue
                out.append((f"{i}/mig{m}", mig, model, profile))
        return out

    def _utilization(self, label: str, handle: Any, mig: bool = False) -> dict[int, float] | None:
        """Mean SM utilization per PID since the last read; None where NVML has none (MIG)."""
        if mig:
            # NVML does not sample processes on MIG devices; which error it answers is not
            # documented, and a NOT_FOUND read as "idle" would suggest the smallest slice.
            return None
        since = self._last_seen.get(label, 0)
        try:
            samples = pynvml.nvmlDeviceGetProcessUtilization(handle, since)
        except pynvml.NVMLError as err:
            if getattr(err, "value", None) == pynvml.NVML_ERROR_NOT_FOUND:
                return {}  # no process ran a kernel since `since`
            return None
        for s in samples:
            self._last_seen[label] = max(self._last_seen.get(label, 0), int(s.timeStamp))
        return process_utilization(
            [(int(s.pid), int(s.timeStamp), float(s.smUtil)) for s in samples]
        )

    def read(self) -> list[GpuProcess]:
        if not self.ensure_init():
            return []
        self.device_up.clear()
        out: list[GpuProcess] = []
        for label, handle, model, profile in self._devices():
            try:
                procs = running_processes(handle)
            except pynvml.NVMLError as err:
                self._device_failed(label, "cannot list its processes", err)
                continue
            self._device_read(label)
            util = self._utilization(label, handle, mig=bool(profile))
            for p in procs:
                if _memory(p.usedGpuMemory) is None and label not in self._no_memory_logged:
                    self._no_memory_logged.add(label)
                    log.warning(
                        "GPU %s: NVML reports no per-process memory (PID %s); exporting no "
                        "memory for its containers rather than 0",
                        label,
                        p.pid,
                    )
                out.append(
                    GpuProcess(
                        pid=int(p.pid),
                        gpu=label,
                        gpu_model=model,
                        mig_profile=profile,
                        memory_bytes=_memory(p.usedGpuMemory),
                        utilization=None if util is None else util.get(int(p.pid), 0.0),
                    )
                )
        return out


def process_utilization(samples: Sequence[tuple[int, int, float]]) -> dict[int, float]:
    """Mean SM utilization (0..1) per PID over the span the samples cover, from NVML's
    process samples (pid, timestamp in microseconds, smUtil in percent).

    NVML returns a sample only for a process that ran a kernel in that sample period, so a
    mean over a process's own samples leaves its idle periods out: a server busy one period in
    twenty at 80% read 0.8. Its idle periods are counted instead, as periods of the device's
    sampling (the median gap between sample times) within the span of all its samples, without
    one of the process's. With one sample time there is no period to count, and the mean of the
    samples is all there is.

    >>> process_utilization([(1, 0, 80.0), (2, 10, 50.0), (2, 20, 50.0), (1, 30, 80.0)])
    {1: 0.4, 2: 0.25}
    >>> process_utilization([(1, 5, 30.0), (1, 5, 50.0)])
    {1: 0.4}
    """
    stamps = sorted({t for _, t, _ in samples})
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    periods = 0.0
    if gaps:
        period = gaps[len(gaps) // 2]
        periods = (stamps[-1] - stamps[0]) / period + 1
    sums: dict[int, list[float]] = {}
    for pid, _, value in samples:
        sums.setdefault(pid, []).append(value)
    return {
        pid: round(min(1.0, sum(v) / max(len(v), periods) / 100.0), 6) for pid, v in sums.items()
    }


class GpuUsageCollector(Collector):
    """A prometheus_client collector: each scrape reads NVML, maps PIDs to containers and sums
    per (container, GPU)."""

    def __init__(
        self,
        reader: NvmlReader,
        pods: PodDirectory | None,
        proc_root: Path = Path("/proc"),
    ) -> None:
        self.reader = reader
        self.pods = pods
        self.proc_root = proc_root
        self._lock = threading.Lock()

    def per_container(
        self, processes: Iterable[GpuProcess]
    ) -> dict[tuple[str, ...], tuple[int | None, float | None]]:
        """Label values -> (memory bytes, utilization), summed over a container's processes.
        Memory is None when NVML could not report it for one of them: a partial sum would look
        like a container that needs less memory than it does. Processes outside Kubernetes
        containers are left out."""
        totals: dict[tuple[str, ...], tuple[int | None, float | None]] = {}
        for proc in processes:
            ref = container_of(proc.pid, self.proc_root)
            if ref is None:
                continue
            name = self.pods.lookup(ref.pod_uid, ref.container_id) if self.pods else None
            key = (
                name.namespace if name else "",
                name.pod if name else "",
                name.container if name else "",
                proc.gpu,
                proc.gpu_model,
                proc.mig_profile,
                ref.pod_uid,
                ref.container_id,
            )
            memory, util = totals.get(key, (0, None))
            if proc.utilization is not None:
                util = min(1.0, (util or 0.0) + proc.utilization)
            if memory is not None and proc.memory_bytes is not None:
                memory += proc.memory_bytes
            else:
                memory = None
            totals[key] = (memory, util)
        return totals

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # one NVML read at a time; the reader's per-device state with it
            processes = self.reader.read()
            nvml_up = self.reader.ready
            device_up = dict(self.reader.device_up)
            device_errors = dict(self.reader.device_errors)
        memory = GaugeMetricFamily(
            "trimtab_gpu_memory_used_bytes",
            "GPU memory used by a container's processes on one GPU or MIG device.",
            labels=LABELS,
        )
        util = GaugeMetricFamily(
            "trimtab_gpu_utilization_ratio",
            "SM utilization (0..1) of one GPU by a container's processes, mean since the last "
            "scrape; absent on MIG devices, where NVML has no per-process samples.",
            labels=LABELS,
        )
        up = GaugeMetricFamily(
            "trimtab_gpu_agent_nvml_up", "1 when NVML is initialised and GPUs are visible."
        )
        devices = GaugeMetricFamily(
            "trimtab_gpu_agent_device_up",
            "1 when this scrape read the GPU or MIG device's processes; 0 when NVML failed on it "
            "(its containers' series are absent then).",
            labels=["gpu"],
        )
        unavailable = GaugeMetricFamily(
            "trimtab_gpu_agent_memory_unavailable_processes",
            "Processes on a GPU or MIG device whose memory NVML does not report (no per-process "
            "accounting: vGPU, some MIG setups); their containers have no memory series.",
            labels=["gpu"],
        )
        errors = CounterMetricFamily(
            "trimtab_gpu_agent_device_errors",
            "NVML errors that left a GPU or MIG device out of a scrape.",
            labels=["gpu"],
        )
        for key, (mem, ratio) in sorted(self.per_container(processes).items()):
            if mem is not None:
                memory.add_metric(list(key), float(mem))
            if ratio is not None:
                util.add_metric(list(key), ratio)
        up.add_metric([], 1.0 if nvml_up else 0.0)
        for label, ok in sorted(device_up.items()):
            devices.add_metric([label], 1.0 if ok else 0.0)
            if ok:
                missing = sum(1 for p in processes if p.gpu == label and p.memory_bytes is None)
                unavailable.add_metric([label], float(missing))
        for label, count in sorted(device_errors.items()):
            errors.add_metric([label], float(count))
        yield memory
        yield util
        yield up
        yield devices
        yield unavailable
        yield errors


def build_registry(collector: GpuUsageCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def build_app(registry: CollectorRegistry) -> WSGIApplication:
    """/healthz answers from the HTTP server alone (the liveness probe: a failing GPU must not
    get the agent restarted); every other path is /metrics, which reads NVML."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        result: Iterable[bytes] = metrics(environ, start_response)
        return result

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log: Prometheus and the kubelet call every few seconds."""


def serve(
    collector: GpuUsageCollector, address: str, port: int
) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics and /healthz in a daemon thread, one thread per request; returns (server,
    thread). Port 0 picks a free port (server.server_port)."""

    class Server(ThreadingWSGIServer):  # prometheus_client's, bound to the address' family
        address_family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]

    server = make_server(
        address, port, build_app(build_registry(collector)), Server, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="gpu-agent-http", daemon=True)
    thread.start()
    return server, thread


def gpu_agent_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `trimtab gpu-agent`. Runs until SIGTERM or SIGINT; returns 0."""
    parser = argparse.ArgumentParser(prog="trimtab gpu-agent", description=__doc__)
    parser.add_argument("--address", default="0.0.0.0", help="listen address")
    parser.add_argument(
        "--port", type=int, default=9835, help="listen port for /metrics and /healthz"
    )
    parser.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME", ""),
        help="this node (downward API spec.nodeName); pods are listed for it",
    )
    parser.add_argument(
        "--no-kube",
        action="store_true",
        help="do not list pods: export pod_uid and container_id with empty names",
    )
    parser.add_argument("--proc-root", type=Path, default=Path("/proc"), help="the host's /proc")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    pods: PodDirectory | None = None
    if not args.no_kube:
        if not args.node_name:
            log.warning("no --node-name or NODE_NAME: exporting pod UIDs and container IDs only")
        else:
            try:
                pods = PodDirectory(kubernetes_pod_lister(args.node_name))
            except Exception as err:  # no config at all: still export UIDs and IDs
                log.warning("no Kubernetes API access (%s): exporting pod UIDs only", err)
    reader = NvmlReader()
    reader.ensure_init()
    collector = GpuUsageCollector(reader, pods, args.proc_root)
    server, _ = serve(collector, args.address, args.port)
    log.info("serving /metrics and /healthz on %s:%d", args.address, server.server_port)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    server.shutdown()
    server.server_close()
    reader.shutdown()
    return 0
