"""Server metrics in Prometheus' text format: requests, tokens, queue, latencies, compiles.

`compiles()` counts XLA compilations of the whole process (a `jax.monitoring` listener,
installed on import): after warm-up it stays flat whatever the request mix, because
sampling settings are data (`sparsemem.serve.sampling`) and shapes are bucketed.
"""

from __future__ import annotations

import bisect
import collections
import itertools

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiled = [0]


def _on_event(name: str, *_, **__) -> None:
    if name == _COMPILE_EVENT:
        _compiled[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compiles() -> int:
    """XLA compilations in this process so far."""
    return _compiled[0]


OUTCOMES = ("completed", "cancelled", "failed", "timed_out", "rejected")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Cumulative-bucket histogram of seconds, as Prometheus renders it."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds, self.counts, self.sum, self.total = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        if index < len(self.bounds):
            self.counts[index] += 1
        self.sum += value
        self.total += 1

    def lines(self, name: str) -> list[str]:
        cumulative = itertools.accumulate(self.counts)
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.bounds, cumulative)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum}", f"{name}_count {self.total}"]


class Metrics:
    """What a scheduler counts; its owner serialises access (the scheduler's lock)."""

    def __init__(self):
        self.outcomes = collections.Counter(dict.fromkeys(OUTCOMES + ("batches",), 0))
        self.prompt_tokens = self.generated_tokens = 0
        self.ttft, self.inter_token, self.latency = Histogram(), Histogram(), Histogram()

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def token(self, seconds: float, first: bool) -> None:
        """A token was handed out `seconds` after the request's submission (`first`) or its previous token."""
        self.generated_tokens += 1
        (self.ttft if first else self.inter_token).observe(seconds)

    def finished(self, outcome: str, seconds: float) -> None:
        """A request ended with `outcome` (one of `OUTCOMES`) `seconds` after its arrival."""
        self.count(outcome)
        if outcome == "completed":
            self.latency.observe(seconds)

    def render(self, *, queued: int, running: int) -> str:
        p = "sparsemem"
        lines = [f"# HELP {p}_requests_total Requests by outcome.", f"# TYPE {p}_requests_total counter"]
        lines += [f'{p}_requests_total{{outcome="{o}"}} {self.outcomes[o]}' for o in OUTCOMES]
        for name, value, kind, text in (
                ("prompt_tokens_total", self.prompt_tokens, "counter", "Prompt tokens of accepted requests."),
                ("generation_tokens_total", self.generated_tokens, "counter", "Tokens generated and sent."),
                ("model_steps_total", self.outcomes["batches"], "counter", "Batched model steps run."),
                ("queue_depth", queued, "gauge", "Requests waiting for a decode slot."),
                ("running_requests", running, "gauge", "Requests being decoded."),
                ("compiles_total", compiles(), "counter", "XLA compilations in this process.")):
            lines += [f"# HELP {p}_{name} {text}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {value}"]
        for name, hist, text in (("time_to_first_token_seconds", self.ttft, "From arrival to the first token."),
                                 ("inter_token_latency_seconds", self.inter_token, "Between consecutive tokens."),
                                 ("request_latency_seconds", self.latency, "From arrival to the last token.")):
            lines += [f"# HELP {p}_{name} {text}", f"# TYPE {p}_{name} histogram", *hist.lines(f"{p}_{name}")]
        return "\n".join(lines) + "\n"
