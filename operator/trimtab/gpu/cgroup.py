"""Which Kubernetes pod and container a process belongs to, from /proc/<pid>/cgroup.

Understands kubepods paths of cgroup v1 and v2, with the cgroupfs and systemd drivers, under the
default or a custom cgroup root (kubelet --cgroup-root, e.g. kind's kubelet.slice), for
containerd, CRI-O and Docker (cri-dockerd) container IDs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The pod segment, wherever the kubelet's cgroup root puts it: "pod<uid>" (cgroupfs, under
# "/kubepods/..." or "/<root>/kubepods/...") or "<parents>kubepods[-<qos>]-pod<uid>.slice"
# (systemd, which spells the UID's "-" as "_" and prefixes each slice with its parents' names:
# "kubepods-burstable-pod..." by default, "kubelet-kubepods-besteffort-pod..." under kind's
# kubelet.slice).
_POD = re.compile(
    r"(?:^|/)(?:[\w.@-]*kubepods(?:-[a-z]+)?-)?pod(?P<uid>[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}"
    r"[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?(?:/|$)"
)
# The container segment after it: "<64 hex>" (cgroupfs) or "<runtime>-<64 hex>.scope" (systemd).
_CONTAINER = re.compile(
    r"^(?:(?P<runtime>cri-containerd|crio|docker|containerd)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?$"
)


@dataclass(frozen=True)
class ContainerRef:
    """A container as the kubelet knows it: the pod's UID and the runtime's container ID."""

    pod_uid: str
    container_id: str


def parse_cgroup(text: str) -> ContainerRef | None:
    """The pod UID and container ID in the content of /proc/<pid>/cgroup, or None for a process
    outside any Kubernetes container (the host, the kubelet, a pod's sandbox "pause").

    >>> ref = parse_cgroup("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-"
    ...     "pod1b2c3d4e_0000_1111_2222_333344445555.slice/cri-containerd-" + "a" * 64 + ".scope")
    >>> ref.pod_uid, ref.container_id == "a" * 64
    ('1b2c3d4e-0000-1111-2222-333344445555', True)
    >>> parse_cgroup("0::/user.slice/user-1000.slice/session-2.scope") is None
    True
    """
    for line in text.splitlines():
        # hierarchy-ID:controllers:path; v2 has one "0::" line, v1 one line per controller.
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2]
        pod = _POD.search(path)
        if pod is None:
            continue
        rest = path[pod.end() :].strip("/")
        segment = rest.split("/")[0] if rest else ""
        container = _CONTAINER.match(segment)
        if container is None:
            # The pod's own slice or a CRI-O "crio-conmon-<id>.scope": not a container process.
            continue
        return ContainerRef(
            pod_uid=pod.group("uid").replace("_", "-"), container_id=container.group("id")
        )
    return None


def container_of(pid: int, proc_root: Path = Path("/proc")) -> ContainerRef | None:
    """parse_cgroup of a live process; None when it is gone or unreadable."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    return parse_cgroup(text)
