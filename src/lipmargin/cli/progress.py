"""Progress display for the command line (part of the CLI: the library only emits events).

On a terminal one status line is redrawn in place (at most ~8 times a second).  Anywhere else
(a file, a pipe, nohup, a batch scheduler) a plain line is written every ``every`` seconds, so
that a log shows the job is alive and how far it got.  Nothing is written when disabled
(``--quiet``).  No torch import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["Progress", "format_duration", "train_progress", "certify_progress", "audit_progress", "export_progress"]

Event = dict[str, Any]

_REDRAW_SECONDS = 0.125  # terminal redraw interval


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``3725`` -> ``1h02m``; ``?`` for an unknown (inf / nan / negative) time."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Throttled status output to ``stream`` (stderr in the CLI).

    ``status(text)`` is a transient line: redrawn on a terminal, written at most every ``every``
    seconds elsewhere (the first one at once).  ``line(text)`` is a permanent line, written
    always.  ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        enabled: bool = True,
        tty: bool | None = None,
        every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty() if tty is None else tty
        self.every = every
        self.clock = clock
        self._last: float | None = None  # when the last status was written
        self._drawn = 0  # length of the status line currently on the terminal

    def status(self, text: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        interval = _REDRAW_SECONDS if self.tty else self.every
        if not force and self._last is not None and now - self._last < interval:
            return
        self._last = now
        if self.tty:
            pad = " " * max(0, self._drawn - len(text))
            self.stream.write("\r" + text + pad)
            self._drawn = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """End the terminal status line (the next output starts on a fresh line)."""
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0


class _Rate:
    """Items per second since the first observation (of one epoch / one pass)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.t0 = clock()

    def reset(self) -> None:
        self.t0 = self.clock()

    def per_second(self, done: float) -> float:
        dt = self.clock() - self.t0
        return done / dt if dt > 0 else 0.0


def train_progress(progress: Progress) -> Callable[[Event], None]:
    """``fit``'s ``on_event``: batch progress with images/s and ETA, one line per epoch, evaluation."""
    state: dict[str, Any] = {"epochs": 0, "steps": 0, "samples": 0, "epoch": 0, "last": ""}
    rate = _Rate(progress.clock)
    t_start = progress.clock()

    def on_event(event: Event) -> None:
        kind = event.get("event")
        if kind == "start":
            state.update(epochs=int(event["epochs"]), steps=int(event.get("steps") or 0),
                         samples=int(event.get("samples") or 0), first=int(event.get("start_epoch", 0)) + 1)
            rate.reset()
            layout = ", channels-last" if event.get("channels_last") else ""
            precision = f" in {event['precision']}{layout}" if "precision" in event else ""
            progress.status(f"training {state['epochs']} epochs on {event.get('device', '?')}{precision}", force=True)
        elif kind == "batch":
            epoch, step = int(event["epoch"]), int(event["step"])
            state["epoch"] = epoch
            steps, epochs = max(state["steps"], 1), max(state["epochs"], 1)
            ips = rate.per_second(float(event["samples"]))
            step_s = (progress.clock() - rate.t0) / step
            left = (steps - step) * step_s
            total_left = left + (epochs - epoch) * steps * step_s
            text = (
                f"epoch {epoch}/{epochs} batch {step}/{steps} ({100 * step // steps}%) "
                f"{ips:,.0f} img/s, epoch ETA {format_duration(left)}, run ETA {format_duration(total_left)}"
            )
            if state["last"]:
                text += f" | {state['last']}"
            progress.status(text)
        elif kind == "eval":
            total = int(event.get("total") or 0)
            progress.status(f"epoch {state['epoch']}: evaluating {event['samples']}/{total}")
        elif kind == "epoch":
            k = 1.0
            for v in event.get("lipschitz_per_layer") or []:
                k *= v
            state["last"] = (f"epoch {event['epoch']}: loss {event['train_loss']:.4f} acc {event['train_accuracy']:.3f} "
                             f"K {k:.3g}")
            if "clean_accuracy" in event:
                state["last"] += f" eval acc {event['clean_accuracy']:.3f}"
            elapsed = format_duration(progress.clock() - t_start)
            progress.status(f"{state['last']} ({elapsed})", force=int(event["epoch"]) == state["epochs"])
            rate.reset()  # the next epoch's batches are timed from here
        elif kind == "end":
            progress.clear()

    return on_event


def certify_progress(progress: Progress, total: int, label: str = "certify") -> Callable[[Event], None]:
    """``certify``'s ``on_event``: samples done of ``total``, images/s and ETA."""
    rate = _Rate(progress.clock)

    def on_event(event: Event) -> None:
        if event.get("event") != "certify":
            return
        done = int(event["samples"])
        ips = rate.per_second(done)
        left = (total - done) / ips if ips > 0 else float("inf")
        progress.status(f"{label}: {done}/{total} samples, {ips:,.0f} img/s, ETA {format_duration(left)}",
                        force=done >= total and not progress.tty)
        if done >= total:
            progress.clear()

    return on_event


def audit_progress(progress: Progress, prefix: str = "audit") -> Callable[[Event], None]:
    """``audit_model``'s ``on_event``: one line per attack stage, with the time spent so far."""
    t0 = progress.clock()

    def on_event(event: Event) -> None:
        if event.get("event") == "attack":
            elapsed = format_duration(progress.clock() - t0)
            progress.line(f"{prefix}: [{event['index']}/{event['total']}] {event['name']} "
                          f"({event['samples']} samples; {elapsed} so far)")

    return on_event


def export_progress(progress: Progress) -> Callable[[Event], None]:
    """``export_certified``'s ``on_event``: one line per stage."""
    t0 = progress.clock()

    def on_event(event: Event) -> None:
        if event.get("event") == "export":
            progress.line(f"export: {event['stage']} ({format_duration(progress.clock() - t0)} so far)")

    return on_event
