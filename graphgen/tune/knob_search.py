"""Tuning graphgen's own schedules: a coordinate search over their knobs, measured.

MetaSchedule's search space is built from its generic sketches, which do not contain
graphgen's default schedules (register-tiled direct conv, pointwise GEMM, Winograd); measured
on ResNet-18, 618 trials of its search left the model as fast as the defaults. The defaults'
decisions (tile sizes, which loop nest; :class:`graphgen.tune.defaults.Knobs`) come from a cost
heuristic; here the tuner measures the alternatives instead:

1. start from the heuristic's setting (knob options 0, the default schedule);
2. measure every other option of one knob at a time (:func:`defaults.variants`);
3. when the fastest beats the current one by more than :data:`MIN_GAIN`, measure both
   again (timing noise on a shared host), move to it if it still wins, and repeat from
   there; stop when a round brings nothing.

Each setting measured is a tuning record like any trial (the database applies the fastest
record at build time). The search state is kept next to the records (``knobs.json``, keyed by
workload), so a run stopped with Ctrl-C, or a second model with the same kernels, resumes
instead of measuring again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

STATE_FILE = "knobs.json"
#: a setting replaces the current one when it is at least this much faster
MIN_GAIN = 0.03
#: a time at or above this is a setting that failed to build or run (the tuner records 1e10)
FAILED = 1e9
#: the state file's format
STATE_VERSION = 1


def _key(choice: dict[str, int]) -> str:
    # option 0 is the default: {"conv.tile": 0} and {} are the same schedule
    return json.dumps({k: v for k, v in sorted(choice.items()) if v}, separators=(",", ":"))


@dataclass
class KnobState:
    """One workload's search: the best setting so far, what was measured, whether it is over.

    A setting's time is the fastest of its measurements: load on a shared host only ever adds
    time. A setting that beats the current one is measured again, together with the current
    one, before the search moves to it (measured on a loaded 2-core host: single timings of
    the same kernel 30 % apart).
    """

    best: dict[str, int] = field(default_factory=dict)
    best_s: float = math.inf
    measured: dict[str, list[float]] = field(default_factory=dict)  # setting key -> seconds, each timing
    done: bool = False
    confirm: list[dict[str, int]] = field(default_factory=list)  # to measure again before moving
    knobs: dict[str, int] = field(default_factory=dict)  # the knobs (and option counts) last searched

    def reopen_if_new_knobs(self, seen: dict[str, int]) -> None:
        """A finished search starts again when the schedule now has knobs (or options) it did
        not have then (a newer graphgen); the settings measured before are not measured again."""
        if self.done and seen != self.knobs:
            self.done = False
        self.knobs = dict(seen)

    def record(self, choice: dict[str, int], seconds: float) -> None:
        self.measured.setdefault(_key(choice), []).append(seconds)

    def is_measured(self, choice: dict[str, int]) -> bool:
        return _key(choice) in self.measured

    def seconds(self, choice: dict[str, int]) -> float:
        return min(self.measured.get(_key(choice), [math.inf]))

    def settle(self, tried: list[dict[str, int]]) -> bool:
        """After a round over ``tried`` (the current best's neighbourhood): move to the fastest
        if it wins by MIN_GAIN on two timings. Returns whether it moved; a round that neither
        moved nor asked for a confirmation ends the search."""
        base = self.seconds(self.best)  # FAILED or more: the current one failed to build or run
        self.best_s = base
        self.confirm = []
        timed = [(self.seconds(c), c) for c in tried if self.is_measured(c) and _key(c) != _key(self.best)]
        if timed:
            s, c = min(timed, key=lambda t: t[0])
            if s < base * (1 - MIN_GAIN):
                if base >= FAILED or (len(self.measured[_key(c)]) >= 2 and len(self.measured[_key(self.best)]) >= 2):
                    self.best, self.best_s = dict(c), s
                    return True
                self.confirm = [dict(self.best), dict(c)]
                return False
        self.done = True
        return False

    def to_json(self) -> dict:
        return {"best": self.best, "best_s": None if math.isinf(self.best_s) else self.best_s,
                "measured": self.measured, "done": self.done, "confirm": self.confirm, "knobs": self.knobs}

    @classmethod
    def from_json(cls, d: dict) -> KnobState:
        measured = {str(k): [float(x) for x in v] for k, v in d.get("measured", {}).items()}
        return cls(best={str(k): int(v) for k, v in d.get("best", {}).items()},
                   best_s=float(d["best_s"]) if d.get("best_s") is not None else math.inf,
                   measured=measured, done=bool(d.get("done", False)),
                   confirm=[{str(k): int(v) for k, v in c.items()} for c in d.get("confirm", [])],
                   knobs={str(k): int(v) for k, v in d.get("knobs", {}).items()})


def load(folder: Path) -> dict[str, KnobState]:
    """The search states in a database folder; a missing or unreadable file is a fresh start
    (the search only costs its trials again)."""
    try:
        d = json.loads((folder / STATE_FILE).read_text())
        if d.get("version") != STATE_VERSION:
            return {}
        return {k: KnobState.from_json(v) for k, v in d.get("workloads", {}).items()}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def save(folder: Path, states: dict[str, KnobState]) -> None:
    tmp = folder / (STATE_FILE + ".tmp")
    body = {"version": STATE_VERSION, "workloads": {k: v.to_json() for k, v in sorted(states.items())}}
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    tmp.replace(folder / STATE_FILE)


def next_round(state: KnobState, seen: dict[str, int]) -> list[dict[str, int]]:
    """The settings to measure in the next round: the current best when it has no time yet,
    then the single-knob variants around it not measured before."""
    from graphgen.tune.defaults import variants

    if state.done:
        return []
    if state.confirm:
        return [dict(c) for c in state.confirm]
    todo = [] if state.is_measured(state.best) else [dict(state.best)]
    todo += [c for c in variants(seen, state.best) if not state.is_measured(c)]
    return todo
