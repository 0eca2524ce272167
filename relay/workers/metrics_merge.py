"""One `/metrics` for a node of several processes: the workers' texts merged into the primary's.

Counters, histograms and most gauges are added up (sessions, bytes, refusals: the node's are
the sum of its processes'). A few gauges say something about the node that only the primary
knows (its state, its ring, its peer links) and are taken from it; the lag and the number of
environments loaded, which each process has of its own, take the largest. A counter's
`_created` sample takes the earliest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

PRIMARY_ONLY = frozenset({
    "relay_node_state", "relay_ring_members", "relay_peer_links", "relay_ownership_moves",
    "relay_workers", "relay_worker_restarts",
})
LARGEST = frozenset({"relay_envs_loaded", "relay_upstream_lag_seconds"})


def merge(primary: str, workers: Iterable[str]) -> bytes:
    """The primary's exposition text with the workers' added in, as exposition text."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for position, text in enumerate([primary, *workers]):
        for family in text_string_to_metric_families(text):
            if family.name in PRIMARY_ONLY and position > 0:
                continue
            families.setdefault(family.name, family)
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif sample.name.endswith("_created"):
                    samples[key] = min(samples[key], sample.value)
                elif family.name in LARGEST:
                    samples[key] = max(samples[key], sample.value)
                else:
                    samples[key] = samples[key] + sample.value

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            for name, family in families.items():
                merged = Metric(name, family.documentation, family.type, family.unit)
                for (sample_name, labels), value in values[name].items():
                    merged.add_sample(sample_name, dict(labels), value)
                yield merged

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)
