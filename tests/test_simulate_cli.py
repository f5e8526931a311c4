"""`trimtab simulate` and `trimtab demo`: the JSON shape, the readable output, errors, and the
example ModelDeployment (valid against the CRD, identical to its packaged copy)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tests.validation import validate_custom
from trimtab.simulate.cli import default_plot_path, demo_main, simulate_main
from trimtab.simulate.compare import POLICIES
from trimtab.simulate.traces import Trace

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "modeldeployment.yaml"
PACKAGED = ROOT / "operator" / "trimtab" / "data" / "modeldeployment.yaml"
CRD = ROOT / "crds" / "trimtab.io_modeldeployments.yaml"
KEYS = {"slo_violation_seconds", "requests_over_slo", "replica_seconds", "scale_actions"}
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`trimtab simulate` writes its PNG to the working directory by default: keep it out of
    the checkout."""
    monkeypatch.chdir(tmp_path)


def _trace(path: Path, n: int = 400, gap: float = 0.05) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(n):
        t = i * gap * (0.2 if 150 <= i < 300 else 1.0)
        lines.append(
            f"2023-11-16 18:{int(t // 60):02d}:{t % 60:010.7f},{500 + i % 7 * 100},{10 + i % 5}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_simulate_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = simulate_main(
        [
            "-f",
            str(EXAMPLE),
            "--trace",
            str(_trace(tmp_path / "t.csv")),
            "--time-scale",
            "2",
            "--seed",
            "3",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace"] == "t.csv x2" and out["slo_p99_ms"] == 2000
    assert set(out["policies"]) == set(POLICIES)
    for policy in out["policies"].values():
        assert set(policy) >= KEYS
        assert 0.0 <= policy["requests_over_slo"] <= 1.0 and policy["replica_seconds"] > 0


def test_simulate_table_and_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate_main(["-f", str(EXAMPLE), "--trace", str(_trace(tmp_path / "t.csv"))]) == 0
    out = capsys.readouterr().out
    assert "SLO-viol s" in out and "timeline:" in out
    for name in POLICIES:
        assert name in out


def test_simulate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert simulate_main(["-f", str(EXAMPLE), "--trace", str(bad)]) == 2
    no_slo = tmp_path / "m.yaml"
    no_slo.write_text(yaml.safe_dump({"kind": "ModelDeployment", "spec": {"image": "x:1"}}))
    assert simulate_main(["-f", str(no_slo), "--trace", str(_trace(tmp_path / "t.csv"))]) == 2
    assert "no slo" in capsys.readouterr().err


def test_plot_without_matplotlib_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        code = simulate_main(
            [
                "-f",
                str(EXAMPLE),
                "--trace",
                str(_trace(tmp_path / "t.csv")),
                "--plot",
                str(tmp_path / "p.png"),
            ]
        )
        assert code == 1 and "matplotlib" in capsys.readouterr().err
    else:
        code = simulate_main(
            [
                "-f",
                str(EXAMPLE),
                "--trace",
                str(_trace(tmp_path / "t.csv")),
                "--plot",
                str(tmp_path / "p.png"),
            ]
        )
        assert code == 0 and (tmp_path / "p.png").stat().st_size > 0


def test_demo_shows_decisions_and_baselines(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_main([]) == 0
    out = capsys.readouterr().out
    assert "What trimtab decided" in out and "demand" in out and "replicas" in out
    for name in POLICIES:
        assert name in out


def test_demo_json_uses_bundled_trace(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_main(["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 8819 and set(out["policies"]) == set(POLICIES)


def test_example_is_valid_and_packaged_copy_identical() -> None:
    for doc in yaml.safe_load_all(EXAMPLE.read_text()):
        if doc and doc.get("kind") == "ModelDeployment":
            validate_custom(doc, CRD)
            assert "slo" in doc["spec"] and "autoscaling" in doc["spec"]
    assert PACKAGED.read_text() == EXAMPLE.read_text(), (
        "copy examples/modeldeployment.yaml to data/"
    )


def test_bundled_trace_has_attribution() -> None:
    text = (ROOT / "operator" / "trimtab" / "data" / "ATTRIBUTION.md").read_text()
    assert "CC-BY 4.0" in text and "Splitwise" in text and "AzurePublicDataset" in text


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs matplotlib (the 'plot' extra)")
def test_simulate_writes_a_png_named_after_the_trace_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = _trace(tmp_path / "t.csv")
    code = simulate_main(["-f", str(EXAMPLE), "--trace", str(trace), "--time-scale", "2"])
    assert code == 0
    assert (tmp_path / "t-x2.png").stat().st_size > 0
    assert "wrote t-x2.png" in capsys.readouterr().out
    # --json keeps stdout one JSON object; where the PNG went goes to stderr.
    assert simulate_main(["-f", str(EXAMPLE), "--trace", str(trace), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["trace"] == "t.csv" and "wrote t.png" in err


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs matplotlib (the 'plot' extra)")
def test_simulate_plot_chooses_the_file_and_no_plot_writes_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = _trace(tmp_path / "t.csv")
    chosen = tmp_path / "out" / "chosen.png"
    chosen.parent.mkdir()
    assert simulate_main(["-f", str(EXAMPLE), "--trace", str(trace), "--plot", str(chosen)]) == 0
    assert chosen.stat().st_size > 0 and not (tmp_path / "t.png").exists()
    assert f"wrote {chosen}" in capsys.readouterr().out
    assert simulate_main(["-f", str(EXAMPLE), "--trace", str(trace), "--no-plot"]) == 0
    assert list(tmp_path.glob("*.png")) == [] and "wrote" not in capsys.readouterr().out


def test_default_plot_path_is_named_after_the_trace() -> None:
    assert default_plot_path(Trace("azure-code.csv x4", ())) == Path("azure-code-x4.png")
    assert default_plot_path(Trace("../x y.csv", ())) == Path("x-y.png")
