"""The GPU agent: cgroup parsing, pod naming, and /metrics over real HTTP with NVML faked at the
pynvml boundary; plus a `gpu` test against a real NVIDIA GPU when there is one."""

from __future__ import annotations

import contextlib
import ctypes.util
import logging
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trimtab.gpu import agent as agent_mod
from trimtab.gpu.agent import GpuUsageCollector, NvmlReader, process_utilization, serve
from trimtab.gpu.cgroup import parse_cgroup
from trimtab.gpu.pods import PodDirectory

CID_A = "a" * 64
CID_B = "b" * 64
CID_C = "c" * 64
UID_A = "1b2c3d4e-0000-1111-2222-333344445555"
UID_B = "99999999-8888-7777-6666-555544443333"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{UID_A.replace('-', '_')}.slice/cri-containerd-{CID_A}.scope\n",
            (UID_A, CID_A),
            id="v2-systemd-containerd",
        ),
        pytest.param(
            f"0::/kubepods.slice/kubepods-pod{UID_A.replace('-', '_')}.slice/crio-{CID_A}.scope",
            (UID_A, CID_A),
            id="v2-systemd-crio-guaranteed",
        ),
        pytest.param(
            f"0::/kubepods/besteffort/pod{UID_A}/{CID_A}", (UID_A, CID_A), id="v2-cgroupfs"
        ),
        pytest.param(
            f"12:pids:/kubepods/burstable/pod{UID_A}/{CID_A}\n"
            f"11:memory:/kubepods/burstable/pod{UID_A}/{CID_A}\n1:name=systemd:/\n",
            (UID_A, CID_A),
            id="v1-cgroupfs",
        ),
        pytest.param(
            f"4:memory:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
            f"{UID_A.replace('-', '_')}.slice/docker-{CID_A}.scope",
            (UID_A, CID_A),
            id="v1-systemd-docker",
        ),
        pytest.param(
            f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{UID_A.replace('-', '_')}.slice/"
            f"cri-containerd-{CID_A}.scope",
            (UID_A, CID_A),
            id="kind-kubelet-slice-root",
        ),
        pytest.param(
            f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod"
            f"{UID_A.replace('-', '_')}.slice/cri-containerd-{CID_A}.scope",
            (UID_A, CID_A),
            id="kind-kubelet-slice-root-guaranteed",
        ),
        pytest.param(
            f"0::/kubelet.slice/kubelet-kubepods-besteffort-pod{UID_A.replace('-', '_')}.slice/"
            f"cri-containerd-{CID_A}.scope",
            (UID_A, CID_A),
            id="systemd-custom-root-pod-slice-only",
        ),
        pytest.param(
            f"0::/custom-root/kubepods/burstable/pod{UID_A}/{CID_A}",
            (UID_A, CID_A),
            id="cgroupfs-custom-root",
        ),
        pytest.param(
            f"7:memory:/custom-root/kubepods/pod{UID_A}/crio-{CID_A}",
            (UID_A, CID_A),
            id="v1-cgroupfs-custom-root-crio-guaranteed",
        ),
        pytest.param(
            f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{UID_A.replace('-', '_')}.slice",
            None,
            id="kind-pod-slice-is-not-a-container",
        ),
        pytest.param(
            f"0::/system.slice/mypod{UID_A}.service/{CID_A}",
            None,
            id="pod-uid-lookalike-outside-kubepods",
        ),
        pytest.param(
            f"0::/kubepods.slice/kubepods-pod{UID_A.replace('-', '_')}.slice/"
            f"crio-conmon-{CID_A}.scope",
            None,
            id="crio-conmon-is-not-a-container",
        ),
        pytest.param(
            f"0::/kubepods.slice/kubepods-pod{UID_A.replace('-', '_')}.slice", None, id="pod-slice"
        ),
        pytest.param("0::/system.slice/containerd.service", None, id="host-process"),
        pytest.param("", None, id="empty"),
    ],
)
def test_parse_cgroup(text: str, expected: tuple[str, str] | None) -> None:
    ref = parse_cgroup(text)
    assert (None if ref is None else (ref.pod_uid, ref.container_id)) == expected


def test_pod_directory_refreshes_on_miss_and_survives_api_errors() -> None:
    calls: list[int] = []
    pods: list[dict[str, Any]] = []

    def lister() -> list[dict[str, Any]]:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("API down")
        return pods

    directory = PodDirectory(lister, ttl=60, miss_interval=0)
    assert directory.lookup(UID_A, CID_A) is None
    pods.append(_pod("ml", "llm-abc", UID_A, {"server": CID_A}))
    found = directory.lookup(UID_A, CID_A)
    assert found is not None and (found.namespace, found.pod, found.container) == (
        "ml",
        "llm-abc",
        "server",
    )
    # An API failure keeps what was known.
    assert directory.lookup(UID_B, CID_B) is None
    assert directory.lookup(UID_A, CID_A) is not None


def _pod(ns: str, name: str, uid: str, containers: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": name, "uid": uid},
        "status": {
            "containerStatuses": [
                {"name": n, "containerID": f"containerd://{cid}"} for n, cid in containers.items()
            ]
        },
    }


# --- a fake NVML, patched over pynvml's functions only ----------------------------------------


class FakeNvml:
    """Two GPUs: GPU 0 whole (an H100), GPU 1 an A100-80GB in MIG mode with two MIG devices."""

    def __init__(self) -> None:
        self.gpus: dict[int, dict[str, Any]] = {
            0: {"name": "NVIDIA H100 80GB HBM3", "mig": False},
            1: {"name": "NVIDIA A100-SXM4-80GB", "mig": True},
        }
        self.migs = {
            (1, 0): "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
            (1, 2): "NVIDIA A100-SXM4-80GB MIG 1g.10gb",
        }
        # handle -> [(pid, bytes)]
        self.processes: dict[Any, list[tuple[int, int | None]]] = {
            ("gpu", 0): [(101, 3 * 2**30), (102, 1 * 2**30), (999, 2**30)],
            ("mig", 1, 0): [(201, 20 * 2**30)],
            ("mig", 1, 2): [],
        }
        self.samples: dict[Any, list[tuple[int, int, int]]] = {  # pid, timestamp, smUtil
            ("gpu", 0): [(101, 10, 40), (101, 20, 60), (102, 15, 10)],
        }
        # handle -> MPS clients [(pid, bytes)]: under MPS the server is the compute process.
        self.mps: dict[Any, list[tuple[int, int | None]]] = {}
        # A driver before R510: no _v3 entry points, which pynvml's unversioned calls use.
        self.old_driver = False
        self.since: list[int] = []
        self.fail_init: int | None = None
        # (NVML function, handle) -> the NVML error it raises from now on; handle None: any.
        self.failing: dict[tuple[str, Any], int] = {}
        self.calls = 0

    def fails(self, function: str, handle: Any = None) -> None:
        self.calls += 1
        error = self.failing.get((function, handle), self.failing.get((function, None)))
        if error is not None:
            raise pynvml.NVMLError(error)

    def patch(self, mp: pytest.MonkeyPatch) -> None:
        def init() -> None:
            if self.fail_init is not None:
                raise pynvml.NVMLError(self.fail_init)

        def proc_util(handle: Any, since: int) -> list[Any]:
            if handle[0] == "mig":
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            self.since.append(since)
            found = [
                SimpleNamespace(pid=p, timeStamp=ts, smUtil=u, memUtil=0)
                for p, ts, u in self.samples.get(handle, [])
                if ts > since
            ]
            if not found:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return found

        def mig_mode(handle: Any) -> tuple[int, int]:
            on = self.gpus[handle[1]]["mig"]
            return (pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE) if on else (0, 0)

        def mig_handle(handle: Any, index: int) -> Any:
            self.fails("mig_handle", ("mig", handle[1], index))
            if (handle[1], index) not in self.migs:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return ("mig", handle[1], index)

        def count() -> int:
            self.fails("count")
            return len(self.gpus)

        def handle_by_index(i: int) -> Any:
            self.fails("handle", ("gpu", i))
            return ("gpu", i)

        def name(handle: Any) -> str:
            self.fails("name", handle)
            if handle[0] == "mig":
                return self.migs[(handle[1], handle[2])]
            return str(self.gpus[handle[1]]["name"])

        def listing(table: dict[Any, list[tuple[int, int | None]]], handle: Any) -> list[Any]:
            return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in table.get(handle, [])]

        def newest(v2: Any) -> Any:
            def call(handle: Any) -> list[Any]:
                if self.old_driver:  # as pynvml's throwOnVersionMismatch answers
                    raise pynvml.NVMLLibraryMismatchError("Unversioned function called ...")
                return list(v2(handle))

            return call

        def running(handle: Any) -> list[Any]:
            self.fails("processes", handle)
            return listing(self.processes, handle)

        def mps_clients(handle: Any) -> list[Any]:
            return listing(self.mps, handle)

        mp.setattr(pynvml, "nvmlInit", init)
        mp.setattr(pynvml, "nvmlShutdown", lambda: None)
        mp.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "570.00")
        mp.setattr(pynvml, "nvmlDeviceGetCount", count)
        mp.setattr(pynvml, "nvmlDeviceGetHandleByIndex", handle_by_index)
        mp.setattr(pynvml, "nvmlDeviceGetName", name)
        mp.setattr(pynvml, "nvmlDeviceGetMigMode", mig_mode)
        mp.setattr(pynvml, "nvmlDeviceGetMaxMigDeviceCount", lambda h: 7)
        mp.setattr(pynvml, "nvmlDeviceGetMigDeviceHandleByIndex", mig_handle)
        mp.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", newest(running))
        mp.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses_v2", running)
        mp.setattr(pynvml, "nvmlDeviceGetMPSComputeRunningProcesses", newest(mps_clients))
        mp.setattr(pynvml, "nvmlDeviceGetMPSComputeRunningProcesses_v2", mps_clients)
        mp.setattr(pynvml, "nvmlDeviceGetProcessUtilization", proc_util)


def _proc(root: Path, pid: int, cgroup: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cgroup").write_text(cgroup)


def _systemd(uid: str, cid: str) -> str:
    return (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope\n"
    )


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    _proc(root, 101, _systemd(UID_A, CID_A))  # two processes of one container
    _proc(root, 102, _systemd(UID_A, CID_A))
    _proc(root, 201, f"0::/kubepods/besteffort/pod{UID_B}/{CID_B}")  # on a MIG device
    _proc(root, 999, "0::/system.slice/some-host-daemon.service")  # not in a pod
    return root


def _scrape(port: int) -> dict[str, list[Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(body)}


@pytest.fixture
def served(
    monkeypatch: pytest.MonkeyPatch, proc_root: Path
) -> Iterator[tuple[FakeNvml, int, GpuUsageCollector]]:
    fake = FakeNvml()
    fake.patch(monkeypatch)
    pods = PodDirectory(
        lambda: [_pod("ml", "llm-0", UID_A, {"server": CID_A})], ttl=60, miss_interval=0
    )
    collector = GpuUsageCollector(NvmlReader(), pods, proc_root)
    server, thread = serve(collector, "127.0.0.1", 0)
    try:
        yield fake, server.server_port, collector
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_metrics_per_container_over_http(served: tuple[FakeNvml, int, GpuUsageCollector]) -> None:
    fake, port, _ = served
    families = _scrape(port)
    memory = {
        (s.labels["namespace"], s.labels["pod"], s.labels["container"], s.labels["gpu"]): s
        for s in families["trimtab_gpu_memory_used_bytes"]
    }
    # Processes 101 and 102 are one container: their memory adds up. 999 is not in a pod.
    assert memory[("ml", "llm-0", "server", "0")].value == 4 * 2**30
    assert memory[("ml", "llm-0", "server", "0")].labels["gpu_model"] == "NVIDIA H100 80GB HBM3"
    # Pod B is not in the pod list: exported by UID and container ID, names empty.
    mig = memory[("", "", "", "1/mig0")]
    assert mig.value == 20 * 2**30
    assert (mig.labels["pod_uid"], mig.labels["container_id"]) == (UID_B, CID_B)
    assert mig.labels["mig_profile"] == "3g.40gb"
    assert len(memory) == 2

    util = {s.labels["gpu"]: s.value for s in families["trimtab_gpu_utilization_ratio"]}
    # Sample times 10, 15, 20: three periods of 5. 101 ran in two (40%, 60%) and 102 in one
    # (10%); a period without a sample is an idle one, so (100 + 10) / 3 periods. None for MIG
    # (NVML has no samples there).
    assert util == {"0": pytest.approx(1.1 / 3, abs=1e-5)}
    assert families["trimtab_gpu_agent_nvml_up"][0].value == 1.0

    # The next scrape asks only for samples newer than the last one seen.
    _scrape(port)
    assert fake.since[-1] == 20
    util2 = {s.labels["gpu"]: s.value for s in _scrape(port)["trimtab_gpu_utilization_ratio"]}
    assert util2 == {"0": 0.0}


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, id="no-library"),
        pytest.param(pynvml.NVML_ERROR_DRIVER_NOT_LOADED, id="driver-not-loaded"),
    ],
)
def test_no_driver_serves_empty_metrics(
    monkeypatch: pytest.MonkeyPatch,
    proc_root: Path,
    error: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeNvml()
    fake.fail_init = error
    fake.patch(monkeypatch)
    reader = NvmlReader()
    collector = GpuUsageCollector(reader, None, proc_root)
    server, thread = serve(collector, "127.0.0.1", 0)
    try:
        families = _scrape(server.server_port)
    finally:
        server.shutdown()
        thread.join(timeout=5)
    assert families["trimtab_gpu_memory_used_bytes"] == []
    assert families["trimtab_gpu_agent_nvml_up"][0].value == 0.0
    assert "no NVIDIA driver or GPU" in caplog.text


def _by_gpu(samples: list[Any]) -> dict[str, float]:
    return {s.labels["gpu"]: s.value for s in samples}


@pytest.mark.parametrize(
    ("function", "handle", "lost"),
    [
        pytest.param("handle", ("gpu", 1), "1", id="handle-of-a-lost-gpu"),
        pytest.param("name", ("gpu", 1), "1", id="name-of-a-lost-gpu"),
        pytest.param("name", ("mig", 1, 0), "1/mig0", id="name-of-a-lost-mig-device"),
        pytest.param("processes", ("mig", 1, 0), "1/mig0", id="processes-of-a-lost-mig-device"),
        # Only NOT_FOUND is an empty slot; any other error is a device that does not answer.
        pytest.param("mig_handle", ("mig", 1, 0), "1/mig0", id="handle-of-a-lost-mig-device"),
    ],
)
def test_a_lost_gpu_is_left_out_counted_and_logged_once(
    served: tuple[FakeNvml, int, GpuUsageCollector],
    caplog: pytest.LogCaptureFixture,
    function: str,
    handle: Any,
    lost: str,
) -> None:
    """NVML_ERROR_GPU_IS_LOST on one device: /metrics still answers 200 with the other GPU's
    series, the lost device is down and counted, and it is logged once, not once a scrape."""
    caplog.set_level(logging.INFO, logger="trimtab.gpu.agent")
    fake, port, _ = served
    fake.failing[(function, handle)] = pynvml.NVML_ERROR_GPU_IS_LOST
    for scrape in (1, 2):
        families = _scrape(port)
        memory = _by_gpu(families["trimtab_gpu_memory_used_bytes"])
        assert memory == {"0": 4 * 2**30}, "GPU 0's container is still exported"
        assert families["trimtab_gpu_agent_nvml_up"][0].value == 1.0
        up = _by_gpu(families["trimtab_gpu_agent_device_up"])
        assert up["0"] == 1.0 and up[lost] == 0.0
        errors = _by_gpu(families["trimtab_gpu_agent_device_errors"])
        assert errors == {lost: scrape}
    assert caplog.text.count("GPU is lost") == 1

    del fake.failing[(function, handle)]
    families = _scrape(port)
    assert _by_gpu(families["trimtab_gpu_memory_used_bytes"]) == {
        "0": 4 * 2**30,
        "1/mig0": 20 * 2**30,
    }
    assert _by_gpu(families["trimtab_gpu_agent_device_up"])[lost] == 1.0
    assert _by_gpu(families["trimtab_gpu_agent_device_errors"]) == {lost: 2}
    assert f"GPU {lost} answers again" in caplog.text


@pytest.mark.parametrize(
    "not_available",
    [
        pytest.param(None, id="nvidia-ml-py-none"),
        pytest.param(2**64 - 1, id="raw-nvml-value-not-available"),
    ],
)
def test_memory_nvml_cannot_report_is_left_out_not_zero(
    served: tuple[FakeNvml, int, GpuUsageCollector], not_available: int | None
) -> None:
    """usedGpuMemory "not available" (vGPU, WDDM, some MIG setups) for one of a container's two
    processes: no memory series for that container (0 or a partial sum would read as a container
    that needs less), its utilization still exported, and the process counted."""
    fake, port, _ = served
    fake.processes[("gpu", 0)] = [(101, not_available), (102, 2**30), (999, not_available)]
    fake.processes[("mig", 1, 0)] = [(201, not_available)]
    families = _scrape(port)
    assert families["trimtab_gpu_memory_used_bytes"] == []
    assert _by_gpu(families["trimtab_gpu_utilization_ratio"]) == {
        "0": pytest.approx(1.1 / 3, abs=1e-5)
    }
    # 999 is no pod's process but counts: NVML cannot report memory on that GPU at all.
    assert _by_gpu(families["trimtab_gpu_agent_memory_unavailable_processes"]) == {
        "0": 2,
        "1": 0,
        "1/mig0": 1,
        "1/mig2": 0,
    }

    fake.processes[("gpu", 0)] = [(101, 3 * 2**30), (102, 2**30)]
    families = _scrape(port)
    assert _by_gpu(families["trimtab_gpu_memory_used_bytes"]) == {"0": 4 * 2**30}
    assert _by_gpu(families["trimtab_gpu_agent_memory_unavailable_processes"])["0"] == 0


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        # A server busy one period in ten, at 80%, beside a process sampled every period.
        pytest.param([(1, t, 80.0) for t in (0, 90)] + [(2, t, 5.0) for t in range(0, 100, 10)],
                     {1: 0.16, 2: 0.05}, id="bursty-process-counts-its-idle-periods"),
        pytest.param([(1, t, 50.0) for t in range(0, 100, 10)], {1: 0.5},
                     id="busy-every-period-is-its-mean"),
        pytest.param([(1, 7, 60.0)], {1: 0.6}, id="one-sample-time-is-its-mean"),
        pytest.param([], {}, id="no-samples"),
    ],
)  # fmt: skip
def test_process_utilization_counts_idle_periods(
    samples: list[tuple[int, int, float]], expected: dict[int, float]
) -> None:
    """NVML returns a sample only for a process that ran in that period; averaging only those
    read a server busy one period in ten at 80% as 0.8, which kept MIG and time-slicing
    suggestions from the very workloads they are for."""
    assert process_utilization(samples) == pytest.approx(expected)


def test_a_driver_before_r510_is_read_through_the_v2_calls(
    served: tuple[FakeNvml, int, GpuUsageCollector],
) -> None:
    """pynvml's unversioned process calls need the _v3 entry points and raise
    NVMLLibraryMismatchError (no NVMLError) without them: the agent falls back to _v2 rather
    than failing every scrape."""
    fake, port, _ = served
    fake.old_driver = True
    families = _scrape(port)
    assert _by_gpu(families["trimtab_gpu_memory_used_bytes"]) == {
        "0": 4 * 2**30,
        "1/mig0": 20 * 2**30,
    }
    assert families["trimtab_gpu_agent_nvml_up"][0].value == 1.0


def test_mps_clients_are_attributed_not_the_mps_server(
    served: tuple[FakeNvml, int, GpuUsageCollector],
) -> None:
    """Under MPS the device's compute process is the MPS server (here 999, a host daemon in
    no pod); the clients, with their own memory, come from the MPS list, once each."""
    fake, port, _ = served
    fake.processes[("gpu", 0)] = [(999, 2**29), (101, 3 * 2**30)]
    fake.mps[("gpu", 0)] = [(101, 3 * 2**30), (102, 2**30)]
    families = _scrape(port)
    assert _by_gpu(families["trimtab_gpu_memory_used_bytes"]) == {
        "0": 4 * 2**30,
        "1/mig0": 20 * 2**30,
    }


def test_nvml_failing_as_a_whole_reports_down_and_serves_empty_metrics(
    served: tuple[FakeNvml, int, GpuUsageCollector], caplog: pytest.LogCaptureFixture
) -> None:
    """The driver goes away after a good start: nvml_up 0 and no usage series, still HTTP 200;
    NVML is initialised again later, not on every scrape."""
    fake, port, collector = served
    assert _scrape(port)["trimtab_gpu_agent_nvml_up"][0].value == 1.0
    fake.failing[("count", None)] = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    for _ in range(2):
        families = _scrape(port)
        assert families["trimtab_gpu_agent_nvml_up"][0].value == 0.0
        assert families["trimtab_gpu_memory_used_bytes"] == []
        assert families["trimtab_gpu_agent_device_up"] == []
    assert caplog.text.count("NVML stopped answering") == 1
    assert collector.reader.ready is False


def test_healthz_answers_without_reading_nvml(
    served: tuple[FakeNvml, int, GpuUsageCollector],
) -> None:
    """The liveness probe's endpoint: it must answer while NVML fails, without calling it."""
    fake, port, _ = served
    fake.failing[("count", None)] = pynvml.NVML_ERROR_GPU_IS_LOST
    fake.failing[("handle", None)] = pynvml.NVML_ERROR_GPU_IS_LOST
    calls = fake.calls
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert (resp.status, resp.read()) == (200, b"ok\n")
    assert fake.calls == calls


def test_gpu_agent_main_runs_without_a_driver_until_stopped(tmp_path: Path) -> None:
    """The real entry point in a child process, with the real (absent or present) driver:
    it must keep serving, not exit, and stop cleanly on SIGTERM."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import sys; from trimtab.gpu.agent import gpu_agent_main; "
        f"sys.exit(gpu_agent_main(['--address', '127.0.0.1', '--port', '{port}', '--no-kube']))"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        families: dict[str, list[Any]] | None = None
        while time.monotonic() < deadline and families is None:
            try:
                families = _scrape(port)
            except OSError:
                time.sleep(0.1)
        assert families is not None, "agent did not serve /metrics"
        assert child.poll() is None
        assert "trimtab_gpu_agent_nvml_up" in families
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=5)
    assert child.stderr is not None
    log = child.stderr.read()
    assert "serving /metrics" in log


def _have_gpu() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    try:
        return int(pynvml.nvmlDeviceGetCount()) > 0
    finally:
        pynvml.nvmlShutdown()


ALLOCATE = textwrap.dedent(
    """
    import ctypes, sys, time
    cuda = ctypes.CDLL(sys.argv[1])
    def check(rc, what):
        if rc != 0:
            raise SystemExit(f"{what} failed: {rc}")
    check(cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    check(cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev), "cuCtxCreate")
    ptr = ctypes.c_uint64()
    check(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(int(sys.argv[2]))), "cuMemAlloc")
    print("allocated", flush=True)
    time.sleep(60)
    """
)


@contextlib.contextmanager
def nvml_reader() -> Iterator[NvmlReader]:
    reader = NvmlReader()
    try:
        yield reader
    finally:
        reader.shutdown()


@contextlib.contextmanager
def allocating_child(size: int) -> Iterator[subprocess.Popen[str]]:
    """A child process holding `size` bytes of GPU memory (CUDA driver API through ctypes, no
    framework needed) until the block ends; skips without a GPU."""
    if not _have_gpu():
        pytest.skip("no NVIDIA GPU or driver")
    libcuda = ctypes.util.find_library("cuda") or "libcuda.so.1"
    child = subprocess.Popen(
        [sys.executable, "-c", ALLOCATE, libcuda, str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "allocated", child.stderr.read() if child.stderr else line
        yield child
    finally:
        child.kill()
        child.wait(timeout=10)


@pytest.mark.gpu
def test_real_gpu_attributes_memory_to_the_allocating_process() -> None:
    """A child process allocates 512 MiB through the CUDA driver API (libcuda via ctypes, no
    framework needed); the agent's NVML reader must list that PID with at least that much."""
    size = 512 * 2**20
    with allocating_child(size) as child, nvml_reader() as reader:
        deadline = time.monotonic() + 15
        mine: list[agent_mod.GpuProcess] = []
        while time.monotonic() < deadline and not mine:
            mine = [p for p in reader.read() if p.pid == child.pid]
            if not mine:
                time.sleep(0.2)
        print("NVML processes of the child:", mine)
        assert mine, f"PID {child.pid} not among {reader.read()}"
        assert all(p.memory_bytes is not None for p in mine), "NVML reports no process memory"
        assert sum(p.memory_bytes or 0 for p in mine) >= size
        assert all(p.gpu_model for p in mine)


@pytest.mark.gpu
def test_real_gpu_agent_exports_the_allocating_container(tmp_path: Path) -> None:
    """The whole agent on a real GPU: NVML -> the process's cgroup -> /metrics. The child is not
    in a pod here, so a /proc stand-in gives its PID the cgroup line a containerd pod would have
    (the only thing faked); the agent must export its memory under that pod UID and container ID,
    and report NVML up."""
    size = 768 * 2**20
    with allocating_child(size) as child, nvml_reader() as reader:
        proc = tmp_path / "proc" / str(child.pid)
        proc.mkdir(parents=True)
        proc.joinpath("cgroup").write_text(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{UID_A.replace('-', '_')}.slice/cri-containerd-{CID_A}.scope\n"
        )
        assert reader.ensure_init()
        collector = GpuUsageCollector(reader, None, tmp_path / "proc")
        server, _ = serve(collector, "127.0.0.1", 0)
        try:
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            deadline = time.monotonic() + 15
            memory: list[Any] = []
            up: list[Any] = []
            while time.monotonic() < deadline and not memory:
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
                families = {f.name: f for f in text_string_to_metric_families(text)}
                memory = [
                    s
                    for s in families["trimtab_gpu_memory_used_bytes"].samples
                    if s.labels.get("pod_uid") == UID_A
                ]
                up = families["trimtab_gpu_agent_nvml_up"].samples
                if not memory:
                    time.sleep(0.5)
        finally:
            server.shutdown()
    print("exported for the child's container:", memory, "nvml_up:", up)
    assert memory, text
    assert memory[0].labels["container_id"] == CID_A
    assert memory[0].labels["gpu_model"]
    assert sum(s.value for s in memory) >= size
    assert up and up[0].value == 1.0
