"""The OpenTelemetry instruments workers and clients record into (see ``telemetry``).

Built by :func:`substantial.telemetry.enable` from a ``Meter``; nothing here
imports OpenTelemetry, so with telemetry off this module costs nothing.
Attribute values are bounded by the code, not by the data: workflow and step
names, outcomes and statuses, never run ids.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SECONDS_BUCKETS", "Instruments"]

#: Histogram buckets in seconds, from a quick inline step to an hour-long one.
SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)


class Instruments:
    """Counters and histograms of steps, runs and events."""

    def __init__(self, meter: Any) -> None:
        self.step_attempts = meter.create_counter(
            "substantial.step.attempts",
            unit="{attempt}",
            description="Attempts of steps and compensations, by workflow, step and outcome.",
        )
        self.step_duration = meter.create_histogram(
            "substantial.step.duration",
            unit="s",
            description="How long one attempt of a step's function took, by outcome.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.runs_started = meter.create_counter(
            "substantial.runs.started",
            unit="{run}",
            description="Runs created: by start(), as children, as continue_using successors.",
        )
        self.runs_ended = meter.create_counter(
            "substantial.runs.ended",
            unit="{run}",
            description="Runs whose end this process's workers recorded, by workflow and status.",
        )
        self.runs_held = meter.create_up_down_counter(
            "substantial.runs.held",
            unit="{run}",
            description="Runs this process's workers hold now (each under a lease).",
        )
        self.event_latency = meter.create_histogram(
            "substantial.event.latency",
            unit="s",
            description="From an event's post to a worker reading it into its run.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )

    def step(self, workflow: str | None, step: str, outcome: str, seconds: float) -> None:
        """Count one attempt of a step and how long it took."""
        attributes = {"substantial.step": step, "substantial.outcome": outcome}
        if workflow is not None:
            attributes["substantial.workflow"] = workflow
        self.step_attempts.add(1, attributes)
        self.step_duration.record(seconds, attributes)
