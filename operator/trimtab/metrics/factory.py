"""The registry of metrics providers by name, after Flagger's provider factory: the spec
names a provider, this module builds it, and an unknown name is an error, never a fallback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trimtab.metrics.base import MetricsProvider
from trimtab.metrics.connection import NO_SETTINGS, Connection, settings_for
from trimtab.metrics.prometheus import PrometheusProvider


class UnknownProviderError(ValueError):
    """A provider name with no implementation behind it."""


@dataclass(frozen=True)
class ProviderConfig:
    """Where and how to reach a metrics source."""

    url: str
    timeout_s: float = 5.0
    connection: Connection = NO_SETTINGS


def _prometheus(config: ProviderConfig) -> MetricsProvider:
    return PrometheusProvider(
        config.url, timeout_s=config.timeout_s, connection=config.connection
    )


ProviderFactory = Callable[[ProviderConfig], MetricsProvider]

PROVIDERS: dict[str, ProviderFactory] = {
    "prometheus": _prometheus,
}


def create_provider(kind: str, config: ProviderConfig) -> MetricsProvider:
    """The provider registered as `kind`, built for `config`.

    >>> create_provider("prometheus", ProviderConfig("http://prometheus:9090"))
    PrometheusProvider('http://prometheus:9090')
    """
    factory = PROVIDERS.get(kind)
    if factory is None:
        raise UnknownProviderError(
            f"unknown metrics provider {kind!r}; known: {', '.join(sorted(PROVIDERS))}"
        )
    return factory(config)


class ProviderPool:
    """One provider per source URL, shared by every loop of the operator: a ModelDeployment
    may name its own Prometheus, and each source keeps one connection pool. `connection` (auth,
    headers, TLS) goes with requests to the default source's origin only (see
    `connection.settings_for`)."""

    def __init__(
        self,
        default_url: str,
        kind: str = "prometheus",
        timeout_s: float = 5.0,
        connection: Connection = NO_SETTINGS,
    ) -> None:
        self.default_url = default_url
        self.kind = kind
        self.timeout_s = timeout_s
        self.connection = connection
        self._providers: dict[str, MetricsProvider] = {}

    def get(self, url: str | None = None) -> MetricsProvider:
        key = (url or self.default_url).rstrip("/")
        if key not in self._providers:
            config = ProviderConfig(
                url=key,
                timeout_s=self.timeout_s,
                connection=settings_for(key, self.default_url, self.connection),
            )
            self._providers[key] = create_provider(self.kind, config)
        return self._providers[key]

    async def close(self) -> None:
        for provider in self._providers.values():
            await provider.close()
        self._providers.clear()
