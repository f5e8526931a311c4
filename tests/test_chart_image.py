"""The operator image, checked without a Docker engine: the Dockerfile's structure (multi-stage,
pinned base images and tools, non-root numeric user matching the chart, no remote ADD) and the
dependency lock (every runtime dependency of pyproject.toml pinned, transitively)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.chart_render import render
from tests.validation import ROOT

DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"


@dataclass
class Instruction:
    op: str
    args: str


def instructions() -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        op, _, args = full.partition(" ")
        out.append(Instruction(op.upper(), args.strip()))
    assert not pending, "Dockerfile ends in a line continuation"
    return out


def stages() -> list[list[Instruction]]:
    out: list[list[Instruction]] = []
    for ins in instructions():
        if ins.op == "FROM":
            out.append([])
        elif ins.op != "ARG":
            assert out, f"{ins.op} before the first FROM"
        if out:
            out[-1].append(ins)
    return out


def lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"requirements.lock: not an exact pin: {line!r}"
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_multi_stage_with_pinned_bases() -> None:
    froms = [ins.args for ins in instructions() if ins.op == "FROM"]
    assert len(froms) >= 2, "build and runtime should be separate stages"
    for args in froms:
        image = args.split()[0]
        assert "$" not in image, "base images are literal, so they are reviewed and pinned"
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and tag != "latest"
        # A full patch version (3.11.11-slim-bookworm) or a digest: never a moving tag.
        assert "@sha256:" in image or re.match(r"\d+\.\d+\.\d+", tag), image
    runtime = stages()[-1]
    assert runtime[0].args.split()[0] == froms[0].split()[0], "same base: the venv's python"


def test_runtime_runs_as_numeric_non_root_matching_the_chart() -> None:
    runtime = stages()[-1]
    users = [ins.args for ins in runtime if ins.op == "USER"]
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid"
    assert gid.isdigit() and int(gid) != 0
    after_user = runtime[[i.op for i in runtime].index("USER") :]
    # The image is complete before it drops root: nothing is installed as (or after) USER.
    assert not any(i.op == "RUN" for i in after_user)
    for doc in render({"gpuAgent": {"enabled": True}}):
        if doc["kind"] in ("Deployment", "DaemonSet"):
            ctx = doc["spec"]["template"]["spec"]["securityContext"]
            assert (ctx["runAsUser"], ctx["runAsGroup"]) == (int(uid), int(gid))
    entry = [ins.args for ins in runtime if ins.op == "ENTRYPOINT"]
    assert entry == ['["trimtab"]'], "the chart runs `trimtab run` and `trimtab gpu-agent`"


def test_no_remote_add_and_only_pinned_installs() -> None:
    for ins in instructions():
        assert ins.op != "ADD", "use COPY; ADD fetches URLs and unpacks archives implicitly"
        if ins.op == "RUN":
            assert not re.search(r"\b(curl|wget)\b", ins.args), "no downloads outside pip"
            for cmd in re.split(r"&&|;", ins.args):
                if re.search(r"\bpip install\b", cmd):
                    packages = [
                        a
                        for a in cmd.split("pip install", 1)[1].split()
                        if not a.startswith("-") and a != "requirements.lock"
                    ]
                    for pkg in packages:
                        assert "==" in pkg or pkg.startswith("/wheels/"), f"unpinned: {pkg}"
                    if "-r" in cmd.split():
                        assert "requirements.lock" in cmd


def test_dockerignore_admits_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "exclude everything, then admit what the image needs"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for ins in instructions():
        if ins.op == "COPY" and "--from=" not in ins.args:
            *sources, _dest = ins.args.split()
            for src in sources:
                assert src.rstrip("/") in admitted, f"{src} is excluded by .dockerignore"
                assert (ROOT / src).exists(), src


def test_lock_pins_every_runtime_dependency() -> None:
    pins = lock()
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock: refresh it (see its header)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside {req.specifier}"
        )


def test_lock_is_closed_under_dependencies() -> None:
    """Every package a pinned package needs is pinned too (read from the installed metadata)."""
    pins = lock()
    env = default_environment()
    missing = set()
    for name in pins:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # not in this venv: its own requirements cannot be read here
        for spec in requires:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            if canonicalize_name(req.name) not in pins:
                missing.add(f"{req.name} (needed by {name})")
    assert not missing, f"requirements.lock lacks {sorted(missing)}: refresh it"
