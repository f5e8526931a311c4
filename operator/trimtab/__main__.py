"""The `trimtab` command: `run` the operator, `simulate` a policy on a trace, `demo`,
`gpu-agent` for GPU nodes, and `render` to show what the operator would create (a dry run).

Each subcommand imports only what it needs, so `trimtab demo` starts without kopf."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path

import yaml


def _run(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    import trimtab.handlers  # noqa: F401  # registers every handler with kopf
    from trimtab.config import Settings

    settings = Settings.from_env()
    prefer_kubeconfig(os.environ)
    namespace = args.namespace if args.namespace is not None else settings.namespace
    metrics_port = args.metrics_port if args.metrics_port is not None else settings.metrics_port
    health_port = args.health_port if args.health_port is not None else settings.health_port
    peering = args.peering if args.peering is not None else settings.peering
    kopf.configure(verbose=settings.log_level == "DEBUG", log_format=kopf.LogFormat.FULL)
    logging.getLogger().setLevel(settings.log_level)
    if metrics_port:
        from trimtab import __version__
        from trimtab.observability import BUILD_INFO

        BUILD_INFO.labels(version=__version__).set(1)
        start_http_server(metrics_port, addr=settings.listen_address)
    memo = kopf.Memo(settings=settings)
    liveness = liveness_url(settings.listen_address, health_port)
    clusterwide = args.all_namespaces or not namespace
    priority = args.priority if args.priority is not None else peer_priority()
    if peering:
        asyncio.run(_ensure_peering(peering, None if clusterwide else namespace))
    asyncio.run(
        kopf.operator(
            clusterwide=clusterwide,
            namespaces=() if clusterwide else (namespace,),
            standalone=not peering,
            peering_name=peering or None,
            priority=priority,
            liveness_endpoint=liveness,
            memo=memo,
        )
    )
    return 0


def prefer_kubeconfig(env: MutableMapping[str, str]) -> None:
    """A KUBECONFIG set explicitly names the cluster, even inside a pod. trimtab's client
    honours it first (KubeClient.from_environment); kopf's login tries the pod's service account
    first, so without the in-cluster variables it takes the same kubeconfig, and both clients
    act on one cluster as one identity.

    >>> env = {"KUBECONFIG": "/k", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    >>> prefer_kubeconfig(env); env
    {'KUBECONFIG': '/k'}
    >>> env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    >>> prefer_kubeconfig(env); env
    {'KUBERNETES_SERVICE_HOST': '10.0.0.1'}
    """
    if env.get("KUBECONFIG"):
        env.pop("KUBERNETES_SERVICE_HOST", None)


def liveness_url(address: str, port: int) -> str | None:
    """kopf's liveness endpoint on `address` (an IPv6 one in brackets); None without a port.

    >>> liveness_url("0.0.0.0", 8081), liveness_url("::", 8081), liveness_url("::", 0)
    ('http://0.0.0.0:8081/healthz', 'http://[::]:8081/healthz', None)
    """
    if not port:
        return None
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/healthz"


def peer_priority() -> int:
    """A priority distinct per replica: kopf pauses every peer that shares the top priority, so
    two replicas at the same priority would both stand still, and nothing would say so. Drawn
    from the pod's name over 2**31 - 1 values: two live pods share one with a chance of about
    5e-10."""
    import zlib

    identity = os.environ.get("POD_ID") or os.environ.get("HOSTNAME") or str(os.getpid())
    return 1 + zlib.crc32(identity.encode()) % (2**31 - 1)


async def _ensure_peering(name: str, namespace: str | None) -> None:
    """kopf watches its peering object but never creates it; without one, replicas would not
    see each other and would both act. Without kopf's peering CRDs there is nothing to create
    it in: the process exits, saying which CRD to install, and the pod restarts until it is
    there (the chart installs it unless crds.install is false)."""
    from trimtab.kube.client import KubeClient, KubeError

    kube = KubeClient.from_environment()
    try:
        if namespace is None:
            manifest = {
                "apiVersion": "kopf.dev/v1",
                "kind": "ClusterKopfPeering",
                "metadata": {"name": name},
            }
        else:
            manifest = {
                "apiVersion": "kopf.dev/v1",
                "kind": "KopfPeering",
                "metadata": {"name": name, "namespace": namespace},
            }
        try:
            await kube.ensure(manifest)
        except KubeError as err:
            if not err.not_found:
                raise
            plural = "clusterkopfpeerings" if namespace is None else "kopfpeerings"
            where = "" if namespace is None else f" in namespace {namespace}"
            missing = f"kopf's peering CRD {plural}.kopf.dev" + (
                "" if namespace is None else " (or the namespace)"
            )
            raise SystemExit(
                f"trimtab run: cannot create the {manifest['kind']} {name}{where} that keeps "
                f"one replica active: 404 {err.message}. Install {missing} (the chart's "
                "templates/kopf-peering-crds.yaml), or run one replica without peering "
                "(peering.enabled=false)."
            ) from None
    finally:
        await kube.close()


def _render(args: argparse.Namespace) -> int:
    """What the reconciles would apply for the ModelDeployments and TrainingJobs in a file: a
    real dry run of the builders. Other documents (a ConfigMap they mount) are the user's to
    apply and are left out; a resource the operator would refuse is named, with why, and
    nothing is printed."""
    from trimtab import constants as C
    from trimtab.render import RenderError, render

    try:
        docs = [d for d in yaml.safe_load_all(Path(args.file).read_text()) if d]
    except (OSError, yaml.YAMLError) as err:
        print(f"trimtab render: {args.file}: {err}", file=sys.stderr)
        return 1
    out, refused, ours = [], [], 0
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("apiVersion") != C.API_VERSION:
            continue
        ours += 1
        name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        try:
            out.extend(render(doc))
        except RenderError as err:
            refused.append(f"trimtab render: {args.file}: {name}: {err}")
    for line in refused:
        print(line, file=sys.stderr)
    if ours == 0:
        print(
            f"trimtab render: {args.file}: no {C.API_VERSION} ModelDeployment or TrainingJob",
            file=sys.stderr,
        )
    if refused or ours == 0:
        return 1
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(yaml.safe_dump_all(out, sort_keys=False), end="")
    return 0


def _simulate(argv: Sequence[str]) -> int:
    from trimtab.simulate.cli import simulate_main

    return simulate_main(list(argv))


def _demo(argv: Sequence[str]) -> int:
    from trimtab.simulate.cli import demo_main

    return demo_main(list(argv))


def _gpu_agent(argv: Sequence[str]) -> int:
    from trimtab.gpu.agent import gpu_agent_main

    return gpu_agent_main(list(argv))


PASSTHROUGH = {"simulate": _simulate, "demo": _demo, "gpu-agent": _gpu_agent}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return PASSTHROUGH[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="trimtab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator against the current cluster")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", help="watch only this namespace")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch all namespaces")
    run.add_argument("--metrics-port", type=int, help="port for /metrics (0: off)")
    run.add_argument("--health-port", type=int, help="port for the kopf liveness probe (0: off)")
    run.add_argument("--peering", help="kopf peering name, for several replicas (one is active)")
    run.add_argument(
        "--priority", type=int, help="kopf peering priority (default: derived from POD_ID)"
    )
    render = sub.add_parser("render", help="print the objects the operator would create")
    render.add_argument(
        "-f", "--file", required=True, help="a YAML file of ModelDeployments and TrainingJobs"
    )
    render.add_argument("--json", action="store_true")
    for name, help_ in (
        ("simulate", "replay a trace through trimtab's autoscaler and the baselines"),
        ("demo", "the example ModelDeployment on the bundled trace, no cluster needed"),
        ("gpu-agent", "export per-pod GPU usage from NVML on /metrics"),
    ):
        sub.add_parser(name, help=help_, add_help=False)
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    return _render(args)


if __name__ == "__main__":
    raise SystemExit(main())
