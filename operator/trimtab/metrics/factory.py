"""The registry of metrics providers by name, after Flagger's provider factory: the spec
names a provider, this module builds it, and an unknown name is an error, never a fallback."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from trimtab.metrics.base import MetricsProvider
from trimtab.metrics.prometheus import PrometheusProvider


class UnknownProviderError(ValueError):
    """A provider name with no implementation behind it."""


@dataclass(frozen=True)
class ProviderConfig:
    """Where and how to reach a metrics source."""

    url: str
    timeout_s: float = 5.0
    headers: Mapping[str, str] = field(default_factory=dict)
    verify_tls: bool = True


def _prometheus(config: ProviderConfig) -> MetricsProvider:
    return PrometheusProvider(
        config.url,
        timeout_s=config.timeout_s,
        headers=config.headers or None,
        verify_tls=config.verify_tls,
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
