"""Operator-wide kopf settings and shared clients, set once at start-up and closed at exit.

kopf keeps its bookkeeping in trimtab.io annotations so nothing lands in the CRDs' status."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from trimtab import constants as C
from trimtab.config import Settings
from trimtab.kube.client import KubeClient
from trimtab.metrics.factory import ProviderPool


@kopf.on.startup()
async def configure_operator(
    settings: kopf.OperatorSettings,
    memo: Any,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=C.KOPF_ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=C.KOPF_ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{C.GROUP}/finalizer"
    # Only explicit Events (kopf.event: scale actions, rollbacks, bad specs) and warnings reach
    # users as Events, not kopf's info-level log lines.
    settings.posting.level = logging.WARNING
    settings.networking.request_timeout = 60
    # A resource's timers stop when it is deleted; kopf holds its finalizer until they have
    # returned. Wait a moment for a timer to return (the right-sizing passes stop at once, see
    # handlers/stopping.py) and, for one that has not, look again in seconds, not a minute.
    settings.background.instant_exit_timeout = 2.0
    settings.background.cancellation_polling = 5.0
    if getattr(memo, "settings", None) is None:
        memo.settings = Settings.from_env()
    if getattr(memo, "kube", None) is None:
        memo.kube = KubeClient.from_environment()
    if getattr(memo, "metrics_pool", None) is None:
        memo.metrics_pool = ProviderPool(
            memo.settings.prometheus_url, connection=memo.settings.prometheus_connection()
        )
    if getattr(memo, "metrics", None) is None:
        # The operator's default source, for loops that name no Prometheus of their own.
        memo.metrics = memo.metrics_pool.get()
    logger.info(
        "trimtab configured; Prometheus at %s (%s)",
        memo.settings.prometheus_url,
        memo.settings.prometheus_connection().describe(),
    )


@kopf.on.cleanup()
async def close_clients(memo: Any, **_: Any) -> None:
    kube = getattr(memo, "kube", None)
    if kube is not None:
        await kube.close()
    pool = getattr(memo, "metrics_pool", None)
    if pool is not None:
        await pool.close()
