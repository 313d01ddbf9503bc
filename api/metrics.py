"""`/metrics` in Prometheus' text format.

Request latencies are measured in this process; everything else (trials by state, studies
by state, live workers, trial durations) is read from the database at each scrape, so every
API replica reports the same numbers and a restart loses nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hpsearch.storage import DATABASE_ERRORS, Store, grace_period_s, records
from hpsearch.storage.engine import driver_reason
from hpsearch.storage.models import STUDY_STATES
from hpsearch.storage.queries import finished_trial_seconds, trial_counts_by_study_name

TRIAL_SECONDS_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = logging.getLogger("hpsearch.api")


class DatabaseCollector(Collector):
    """Gauges and a histogram read from the database when Prometheus scrapes.

    A database that cannot be read gives `hpsearch_database_up 0` and no figures, not an
    error: the scrape still carries the request latencies, and an alert can watch the gauge.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        try:
            figures = self._read()
        except DATABASE_ERRORS as exc:
            log.warning("metrics: the database cannot be read: %s", driver_reason(exc))
            figures = None
        yield _gauge(
            "hpsearch_database_up",
            "Whether the database could be read.",
            [],
            [(int(figures is not None),)],
        )
        if figures is not None:
            yield from figures.families()

    def _read(self) -> DatabaseFigures:
        with self.store.session() as session:
            trials = trial_counts_by_study_name(session)
            studies = dict.fromkeys(STUDY_STATES, 0)
            studies.update(records.study_counts_by_state(session))
            now = records.database_now(session)  # the database's clock, as for trials
            alive_after = now - timedelta(seconds=grace_period_s())
            workers = records.alive_workers_by_device(session, alive_after)
            under, total = finished_trial_seconds(session, TRIAL_SECONDS_BUCKETS)
        return DatabaseFigures(trials, list(studies.items()), workers, under, total)


@dataclass(frozen=True)
class DatabaseFigures:
    """One scrape's reading of the database; every study state is there, zero or not."""

    trials: list[Any]
    studies: list[Any]
    workers: list[Any]
    duration_buckets: list[int]
    duration_sum: float

    def families(self) -> Iterator[Metric]:
        yield _gauge(
            "hpsearch_trials", "Trials by study and state.", ["study", "state"], self.trials
        )
        yield _gauge("hpsearch_studies", "Studies by state.", ["state"], self.studies)
        yield _gauge(
            "hpsearch_workers_alive", "Workers with a recent heartbeat.", ["device"], self.workers
        )
        bounds = [str(bound) for bound in TRIAL_SECONDS_BUCKETS] + ["+Inf"]
        yield HistogramMetricFamily(
            "hpsearch_trial_duration_seconds",
            "Wall time of finished (complete or pruned) trials.",
            buckets=list(zip(bounds, self.duration_buckets, strict=True)),
            sum_value=self.duration_sum,
        )


def _gauge(name: str, doc: str, labels: list[str], rows: list) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for *values, count in rows:
        family.add_metric([str(v) for v in values], count)
    return family


class Metrics:
    """This app's registry: request latencies plus the database's figures."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "hpsearch_http_request_duration_seconds",
            "API request latency by route.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(DatabaseCollector(store))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyMiddleware:
    """Time every request, labelled by its route template (`/api/v1/studies/{study}`), not
    its raw path, so a scan of ids cannot grow the label set without bound."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - started
            )
