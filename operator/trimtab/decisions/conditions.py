"""Kubernetes-style conditions: setting one keeps lastTransitionTime unless its status changes.

Pure: the caller passes the current time as an RFC 3339 string."""

from __future__ import annotations

from collections.abc import Iterable

from trimtab.api.common import Condition, ConditionStatus


def set_condition(
    conditions: Iterable[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: str,
    observed_generation: int | None = None,
) -> list[Condition]:
    """Return `conditions` with `type_` set. Its lastTransitionTime is `now` only when the status
    flips (or the condition is new), so a steady state produces an identical list."""
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type_:
            out.append(cond)
            continue
        found = True
        moved = cond.status != status
        out.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=now if moved else cond.last_transition_time or now,
                observed_generation=observed_generation,
            )
        )
    if not found:
        out.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=now,
                observed_generation=observed_generation,
            )
        )
    return out


def get_condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def remove_condition(conditions: Iterable[Condition], type_: str) -> list[Condition]:
    """`conditions` without `type_` (one that no longer applies, rather than one set False)."""
    return [c for c in conditions if c.type != type_]


def is_news(conditions: Iterable[Condition], type_: str, status: str, reason: str) -> bool:
    """Whether setting `type_` to `status` with `reason` changes what it says: for an Event once
    per change (a refusal, a failure) rather than once per loop that finds it unchanged.

    >>> old = set_condition([], "RouteAccepted", "False", "NotAllowedByListeners", "", "t")
    >>> is_news(old, "RouteAccepted", "False", "NotAllowedByListeners")
    False
    >>> is_news(old, "RouteAccepted", "False", "BackendNotFound"), is_news([], "X", "False", "Y")
    (True, True)
    """
    before = get_condition(conditions, type_)
    return before is None or before.status != status or before.reason != reason
