"""PrometheusProvider: the MetricsProvider that runs instant PromQL queries on a Prometheus
HTTP API through prometheus-api-client, one concurrent batch per control loop, or one query
for numbers that must come from the same scrapes (`query_together`).

The client is synchronous; each query runs in a worker thread under a deadline, so a slow or
dead Prometheus costs the loop at most `timeout_s` and never blocks the event loop."""

from __future__ import annotations

import ast
import asyncio
import json
import re
from collections.abc import Mapping
from typing import Any

import requests
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from trimtab.metrics.base import LabelValues, QueryResult, in_thread
from trimtab.metrics.connection import NO_SETTINGS, Connection, CredentialsUnreadable, connect

_ERRNO = re.compile(r"\[Errno -?\d+\][^'\")]*")
_BYTES_BODY = re.compile(r"\((b(?P<q>['\"]).*(?P=q))\)\s*$", re.S)


class PrometheusProvider:
    """Reads numbers from one Prometheus server.

    `query_batch` sends every query of a loop at once and waits for all of them; each comes
    back as a value, "no data" (no series, or NaN) or "unavailable" with Prometheus's own
    words: a PromQL parse error, an HTTP status, a refused connection, a timeout."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 1,
        connection: Connection = NO_SETTINGS,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        # One quick retry absorbs a dropped keep-alive connection; more would only delay the
        # "unavailable" answer the loop needs to stop scaling down.
        retry = Retry(
            total=retries,
            connect=retries,
            read=0,
            status=retries,
            backoff_factor=0.05,
            status_forcelist=(502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
        )
        self._client = connect(self.url, connection, timeout_s, retry)

    def __repr__(self) -> str:
        return f"PrometheusProvider({self.url!r})"

    async def query_batch(self, queries: Mapping[str, str]) -> dict[str, QueryResult]:
        """Run all `queries` concurrently; the result has the same keys."""
        keys = list(queries)
        results = await asyncio.gather(*(self._query(queries[k]) for k in keys))
        return dict(zip(keys, results, strict=True))

    async def query_together(self, queries: Mapping[str, str]) -> dict[str, QueryResult]:
        """Every query's value from one snapshot of the data: the queries are sent as one
        PromQL expression (`together_query`), which Prometheus evaluates at one instant over
        one isolated view of its head block. Separate queries may each see a different number
        of scrapes, and counts that must agree (requests beside their errors, a histogram's
        count beside one of its buckets) then differ by a scrape's worth. The result has the
        same keys; a failure of the one query is every key's."""
        if not queries:
            return {}
        result = await self._query_raw(together_query(queries))
        if isinstance(result, QueryResult):
            return dict.fromkeys(queries, result)
        return parse_together(result, queries)

    async def label_values(self, query: str, label: str) -> LabelValues:
        """The distinct values of `label` across the series `query` returns, sorted."""
        data = await self._query_raw(query)
        if isinstance(data, QueryResult):
            return LabelValues(error=data.message)
        if not isinstance(data, list):
            return LabelValues(error=f"unexpected query result {data!r:.200}")
        found = {
            str(s["metric"][label])
            for s in data
            if isinstance(s, dict) and label in (s.get("metric") or {})
        }
        return LabelValues(values=tuple(sorted(found)))

    async def is_online(self) -> bool:
        """Whether Prometheus evaluates a query, as Flagger checks it: `vector(1)` must be 1."""
        result = await self._query("vector(1)")
        return result.has_value and result.value == 1.0

    async def close(self) -> None:
        # prometheus-api-client has no close(); its requests session holds the pooled sockets.
        self._client._session.close()

    async def _query(self, promql: str) -> QueryResult:
        data = await self._query_raw(promql)
        return data if isinstance(data, QueryResult) else parse_result(data)

    async def _query_raw(self, promql: str) -> Any:
        """The `data.result` of an instant query, or why there is none (UNAVAILABLE)."""
        try:
            data = await in_thread(lambda: self._client.custom_query(promql), self.timeout_s)
            if isinstance(data, Exception):
                raise data
        except TimeoutError:
            return QueryResult.unavailable(
                f"Prometheus at {self.url} did not answer within {self.timeout_s:g}s"
            )
        except PrometheusApiClientException as exc:
            return QueryResult.unavailable(_api_error_text(str(exc)))
        except CredentialsUnreadable as exc:
            return QueryResult.unavailable(f"no query sent to {self.url}: {exc}")
        except requests.RequestException as exc:
            return QueryResult.unavailable(f"cannot reach Prometheus at {self.url}: {_reason(exc)}")
        except (ValueError, KeyError) as exc:
            # A 200 answer that is not Prometheus's JSON (a proxy's HTML page, say).
            return QueryResult.unavailable(f"unreadable answer from {self.url}: {exc}")
        return data


# The label `together_query` marks each query's series with.
PART_LABEL = "trimtab_part"


def together_query(queries: Mapping[str, str]) -> str:
    """One PromQL expression with every query's series, each marked with its key.

    >>> together_query({"a": "sum(x)", "b": "vector(1)"})
    'label_replace(sum(x), "trimtab_part", "a", "", "") or label_replace(vector(1), "trimtab_part", "b", "", "")'
    """  # noqa: E501
    return " or ".join(
        f'label_replace({q}, {json.dumps(PART_LABEL)}, {json.dumps(key)}, "", "")'
        for key, q in queries.items()
    )


def parse_together(data: Any, queries: Mapping[str, str]) -> dict[str, QueryResult]:
    """Each key's number from the answer to `together_query(queries)`.

    >>> r = parse_together([{"metric": {"trimtab_part": "a"}, "value": [1.0, "4"]}], {"a": "", "b": ""})
    >>> r["a"].value, r["b"].message
    (4.0, 'no series matched')
    """  # noqa: E501
    if not isinstance(data, list):
        return dict.fromkeys(
            queries, QueryResult.unavailable(f"unexpected query result {data!r:.200}")
        )
    parts: dict[str, list[Any]] = {}
    for sample in data:
        if isinstance(sample, dict):
            parts.setdefault(str(sample.get("metric", {}).get(PART_LABEL, "")), []).append(sample)
    return {key: parse_result(parts.get(key, [])) for key in queries}


def parse_result(data: Any) -> QueryResult:
    """One number from the `data.result` of an instant query.

    >>> parse_result([{"metric": {}, "value": [1700000000.0, "4"]}])
    QueryResult(state=<ResultState.VALUE: 'Value'>, value=4.0, message='')
    >>> parse_result([]).state.value
    'NoData'
    >>> parse_result([1700000000.0, "NaN"]).message
    'NaN: no samples in the window'
    """
    if isinstance(data, list) and len(data) == 2 and isinstance(data[0], int | float):
        return _number(data[1])  # a scalar: [time, "value"]
    if not isinstance(data, list):
        return QueryResult.unavailable(f"unexpected query result {data!r:.200}")
    if not data:
        return QueryResult.no_data("no series matched")
    if len(data) > 1:
        labels = ", ".join(json.dumps(s.get("metric", {}), sort_keys=True) for s in data[:3])
        return QueryResult.unavailable(
            f"query returned {len(data)} series ({labels}...); aggregate it to one number, "
            "e.g. with sum(...) or max(...)"
        )
    sample = data[0]
    if "value" not in sample:
        return QueryResult.unavailable("query returned a range vector; use an instant vector")
    return _number(sample["value"][1])


def _number(text: Any) -> QueryResult:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return QueryResult.unavailable(f"not a number: {text!r:.100}")
    return QueryResult.of(value)


def _api_error_text(message: str) -> str:
    """Prometheus's own error from prometheus-api-client's exception text.

    The client wraps the body as `HTTP Status Code 400 (b'{"status":"error",...}')`; the
    useful part is `errorType: error`, e.g. `bad_data: ... parse error: unexpected <EOF>`."""
    match = _BYTES_BODY.search(message)
    if match:
        try:
            body = json.loads(ast.literal_eval(match.group(1)))
            status = message.split("(", 1)[0].strip()
            return f"{status}: {body.get('errorType', 'error')}: {body.get('error', '')}".strip()
        except (ValueError, SyntaxError, AttributeError):
            pass
    return message


def _reason(exc: requests.RequestException) -> str:
    """The cause of a connection failure without urllib3's object reprs."""
    text = str(exc)
    if isinstance(exc, requests.Timeout):
        return f"timed out ({type(exc).__name__})"
    match = _ERRNO.search(text)
    return match.group(0).strip() if match else text[:300]
