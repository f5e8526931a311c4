"""The per-revision count queries the rollout loop reads, the status patch it writes, and the
rollout conditions it sets; the loop itself runs in tests/test_rollout_operator.py."""

from __future__ import annotations

import re
from typing import Any

import pytest

from trimtab.api.rollout import RolloutStatus
from trimtab.decisions.rollout import Hold, Pause, Rollback, rollout_conditions
from trimtab.handlers.rollout import missing_data_note, replace_patch
from trimtab.metrics.presets import (
    COUNT_NAMES,
    PRESETS,
    PresetOptions,
    QueryTarget,
    count_queries,
    le_matcher,
)


@pytest.mark.parametrize(
    ("bound", "matches", "misses"),
    [
        pytest.param(0.5, ["0.5"], ["0.55", "5", "0.25"], id="fraction"),
        pytest.param(2.0, ["2", "2.0"], ["2.5", "20", "12"], id="whole-go-and-python"),
        pytest.param(1e6, ["1e+06", "1000000.0"], ["1e+07"], id="exponent"),
    ],
)
def test_le_matcher_finds_the_bucket_however_it_is_spelled(
    bound: float, matches: list[str], misses: list[str]
) -> None:
    body = le_matcher(bound).removeprefix('le=~"').removesuffix('"')
    # PromQL string escapes: "\\." is the regex \. ; Prometheus anchors label regexes.
    regex = re.compile(body.replace("\\\\", "\\"))
    assert all(regex.fullmatch(m) for m in matches)
    assert not any(regex.fullmatch(m) for m in misses)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_count_queries_select_one_revision_over_the_window(preset: str) -> None:
    target = QueryTarget("ns", "chat", revision="r1", window="42s")
    queries = count_queries(preset, target, 0.5, PresetOptions())
    assert set(queries) == set(COUNT_NAMES)
    assert queries["requests"] and queries["errors"]
    for query in filter(None, queries.values()):
        assert 'trimtab_io_revision="r1"' in query and "[42s]" in query
        assert query.count("(") == query.count(")")
    # Without a histogram there is no latency count, never a made-up one.
    has_histogram = preset in ("vllm", "tgi", "generic")
    assert (queries["latencyFast"] is not None) == has_histogram
    if has_histogram:
        assert "le=~" in (queries["latencyFast"] or "")
        assert count_queries(preset, target, None, PresetOptions())["latencyFast"] is None


@pytest.mark.parametrize(
    ("current", "desired", "patch"),
    [
        pytest.param({"a": 1}, {"a": 1}, {}, id="same-nothing"),
        pytest.param({"a": 1, "b": 2}, {"a": 1}, {"b": None}, id="removed-key-nulled"),
        pytest.param({"w": {"x": 1, "y": 2}}, {"w": {"x": 1}}, {"w": {"y": None}}, id="nested"),
        pytest.param({"l": [1, 2]}, {"l": [1]}, {"l": [1]}, id="list-replaced"),
    ],
)
def test_replace_patch(current: dict[str, Any], desired: dict[str, Any], patch: Any) -> None:
    assert replace_patch(current, desired) == patch


def test_conditions_say_frozen_paused_and_rolled_back() -> None:
    in_flight = RolloutStatus.model_validate(
        {
            "stableRevision": "a",
            "candidateRevision": "b",
            "stepIndex": 0,
            "phase": "Canary",
            "weights": {"stable": 90, "candidate": 10},
            "reason": "metrics unavailable: weights frozen at 10%",
        }
    )
    conds = rollout_conditions([], in_flight, Hold("x"), "connection refused", "", "T")
    by_type = {c.type: c for c in conds}
    assert by_type["RolloutProgressing"].status == "False"
    assert by_type["RolloutProgressing"].reason == "MetricsUnavailable"
    assert "frozen at 10%" in by_type["RolloutProgressing"].message
    assert "connection refused" in by_type["RolloutProgressing"].message

    paused = in_flight.model_copy(update={"phase": "Paused"})
    by_type = {c.type: c for c in rollout_conditions(conds, paused, Pause("held"), "", "", "T")}
    assert by_type["RolloutPaused"].status == "True"

    rolled = RolloutStatus.model_validate(
        {"stableRevision": "a", "failedRevision": "b", "phase": "RolledBack", "reason": "bad"}
    )
    conds = rollout_conditions(conds, rolled, Rollback("analysis failed: bad"), "", "", "T")
    later = rolled.model_copy(update={"reason": "revision b failed and is not retried"})
    conds = rollout_conditions(conds, later, Hold("not retried"), "", "", "T2")
    by_type = {c.type: c for c in conds}
    assert by_type["RolledBack"].status == "True"
    assert by_type["RolledBack"].message == "bad"  # why it rolled back, kept while it holds
    assert by_type["FallbackApplied"].status == "False"


@pytest.mark.parametrize(
    ("missing", "baseline", "parts"),
    [
        pytest.param(
            ("latency/slo", "latency/stable"),
            "a",
            ["no data for latency/slo, latency/stable", "le=0.5s", "of b or a", "step holds"],
            id="no-bucket-at-the-bound",
        ),
        pytest.param(
            ("errorRate/slo",),
            None,
            ["no data for errorRate/slo", "no request counter series for b;"],
            id="no-request-counter",
        ),
    ],
)
def test_missing_data_note_names_the_check_and_why(
    missing: tuple[str, ...], baseline: str | None, parts: list[str]
) -> None:
    note = missing_data_note(missing, "vllm", 0.5, "b", baseline, window_s=45, scrape_s=15)
    assert all(p in note for p in parts), note


def test_missing_data_note_in_a_window_of_under_two_scrapes_blames_the_window() -> None:
    """At the start of every step increase() has fewer than two samples: that is not a missing
    series, and the note must not send the user looking for one."""
    note = missing_data_note(("errorRate/slo",), "vllm", 0.5, "b", "a", window_s=20, scrape_s=15)
    assert note.startswith("no data yet for errorRate/slo")
    assert "20s counted so far" in note and "scrapeInterval 15s" in note
    assert "no request counter series" not in note
