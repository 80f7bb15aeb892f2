"""A per-step trace of the samples each rank computed, and its checker: a product feature for tests and
chaos runs (``benchmarks/chaos.py``, ``tests/test_chaos.py``).

Writing. With ``LEPTON_TRACE_DIR=DIR`` every worker appends to ``DIR/trace-PID.jsonl``, for each step
whose update it applied (right after the optimizer step, ``Trainer.train_step``), one JSON line::

    {"t": wall time, "generation": g, "rank": r, "world": w, "step": s, "epoch": e,
     "shares": [...], "rows": [global sample indices], "skipped": false}

flushed per line (to the kernel, no fsync), so a SIGKILL loses at most the line in flight. ``skipped``
marks a step the divergence guard skipped (its loss was not finite): the step was taken, with no update.
Off (the variable unset), the trainer holds ``None`` and pays one attribute test per step. The older
test hook ``LEPTON_TRACE_SAMPLES=PREFIX`` (``PREFIX.PID``, lines ``{step, idx}``) is kept as it was.

Checking (``check_traces``). Over a run with failures a step can be applied more than once: the
generation that applied it may lose members and fall back to a checkpoint, or a restarted coordinator
may re-form from an older state, and the step is then redone by a later generation. The final model
descends from one lineage of updates, and for each step that lineage's copy is the one applied by the
*last* generation that applied it (generation ids only grow, across coordinator restarts too:
``Controller._form_generation`` continues from state.json's). Why the last: a later generation G
starts from a state at some step a (a live replica's or a checkpoint's) and, to finish, applies every
step from a on; so for any step s ≥ a that an earlier generation also applied, G's copy supersedes it,
and for s < a, G's start state descends from whatever generation last applied s before G. A
consequence the checker tests: along the steps, the winning generation never decreases. Then:

- steps 0 … N−1 are all in the lineage, and nothing beyond (no update lost);
- no rank of the winning generation applied a step twice, and every rank of it applied each step
  once (no update applied twice);
- each rank's rows are ``GlobalBatchSampler.worker_slice`` of its recorded shares, and the ranks' rows
  together are exactly the step's global batch (none missing, none duplicated);
- every training sample is used exactly once per epoch along the lineage.

A rank SIGKILLed between its optimizer step and the trace write leaves no line for that step, while
its peers' lines are there (the collective had returned everywhere). Such a hole is accepted, and
counted as ``in_flight``, only if that rank's file holds no later line of the same generation (it died
there; or, with no line of that generation at all, if the hole is the generation's first step); its
rows are then the sampler's slice for it, which the peers' reduced sample count already checked equal
to the batch.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from ..sampler import GlobalBatchSampler

ENV_DIR = "LEPTON_TRACE_DIR"
ENV_LEGACY = "LEPTON_TRACE_SAMPLES"


class StepTrace:
    """The writer: one open file per process, one flushed line per applied step."""

    def __init__(self, out: IO[str] | None, legacy: IO[str] | None = None):
        self.out, self.legacy = out, legacy

    @classmethod
    def from_env(cls) -> StepTrace | None:
        folder, legacy = os.environ.get(ENV_DIR), os.environ.get(ENV_LEGACY)
        if not folder and not legacy:
            return None
        out = None
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            out = open(Path(folder) / f"trace-{os.getpid()}.jsonl", "a", encoding="utf-8")
        return cls(out, open(f"{legacy}.{os.getpid()}", "a", encoding="utf-8") if legacy else None)

    def record(
        self,
        generation: int | None,
        rank: int,
        step: int,
        epoch: int,
        shares: list[float],
        rows: np.ndarray,
        skipped: bool,
    ) -> None:
        idx = rows.tolist()
        if self.out is not None:
            line = {
                "t": time.time(),
                "generation": -1 if generation is None else generation,
                "rank": rank,
                "world": len(shares),
                "step": step,
                "epoch": epoch,
                "shares": [float(s) for s in shares],
                "rows": idx,
                "skipped": skipped,
            }
            self.out.write(json.dumps(line) + "\n")
            self.out.flush()
        if self.legacy is not None:
            self.legacy.write(json.dumps({"step": step, "idx": idx}) + "\n")
            self.legacy.flush()


# --- reading and checking ------------------------------------------------------------------------------
@dataclass
class TraceLine:
    pid: int
    t: float
    generation: int
    rank: int
    world: int
    step: int
    shares: list[float]
    rows: list[int]


def read_traces(folder: Path | str) -> list[TraceLine]:
    """Every line of every ``trace-PID.jsonl`` in ``folder``; a torn last line is skipped."""
    out = []
    for f in sorted(Path(folder).glob("trace-*.jsonl")):
        pid = int(f.stem.split("-", 1)[1])
        for text in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                d = json.loads(text)
            except json.JSONDecodeError:
                continue
            out.append(
                TraceLine(
                    pid,
                    float(d["t"]),
                    int(d["generation"]),
                    int(d["rank"]),
                    int(d["world"]),
                    int(d["step"]),
                    list(d["shares"]),
                    list(d["rows"]),
                )
            )
    return out


@dataclass
class TraceReport:
    total_steps: int
    steps_in_lineage: int = 0
    missing_steps: list[int] = field(default_factory=list)  # no generation applied them
    extra_steps: list[int] = field(default_factory=list)  # beyond the planned N
    non_monotone: list[int] = field(default_factory=list)  # a step whose winner is older than the last's
    applied_twice: list[tuple[int, int, int]] = field(default_factory=list)  # (generation, rank, step)
    rank_conflicts: list[tuple[int, int]] = field(default_factory=list)  # (generation, rank): 2 processes
    missing_ranks: list[tuple[int, int, int]] = field(default_factory=list)  # unexplained (gen, rank, step)
    wrong_slices: list[tuple[int, int, int]] = field(default_factory=list)  # rows ≠ the sampler's slice
    in_flight: int = 0  # lines lost to a SIGKILL between the update and the write (explained)
    samples_lost: int = 0  # over the epochs: a training sample not used in its epoch
    samples_duplicated: int = 0  # ... used more than once in its epoch
    batch_mismatch: list[int] = field(default_factory=list)  # steps whose rows ≠ the global batch
    redone_steps: int = 0  # step copies superseded by a later generation
    generations: int = 0
    lines: int = 0

    @property
    def contiguous(self) -> bool:
        return not (self.missing_steps or self.extra_steps or self.non_monotone or self.applied_twice)

    @property
    def ok(self) -> bool:
        return (
            self.contiguous
            and not (self.rank_conflicts or self.missing_ranks or self.wrong_slices or self.batch_mismatch)
            and self.samples_lost == 0
            and self.samples_duplicated == 0
        )

    def problems(self) -> list[str]:
        out = []
        for name in (
            "missing_steps",
            "extra_steps",
            "non_monotone",
            "applied_twice",
            "rank_conflicts",
            "missing_ranks",
            "wrong_slices",
            "batch_mismatch",
        ):
            v = getattr(self, name)
            if v:
                out.append(f"{name}: {len(v)} (first: {v[:5]})")
        if self.samples_lost or self.samples_duplicated:
            out.append(f"samples lost {self.samples_lost}, duplicated {self.samples_duplicated}")
        return out


def check_traces(
    lines: Iterable[TraceLine], num_samples: int, batch_size: int, seed: int, total_steps: int
) -> TraceReport:
    """The lineage of the final model and its checks (module docstring)."""
    lines = list(lines)
    sampler = GlobalBatchSampler(num_samples, batch_size, seed)
    rep = TraceReport(total_steps=total_steps, lines=len(lines))
    by_gen_step: dict[tuple[int, int], list[TraceLine]] = defaultdict(list)
    last_step: dict[tuple[int, int], int] = {}  # (pid, generation) → its last step in that generation
    pid_of: dict[tuple[int, int], int] = {}
    for ln in lines:
        by_gen_step[(ln.generation, ln.step)].append(ln)
        key = (ln.pid, ln.generation)
        last_step[key] = max(last_step.get(key, -1), ln.step)
        owner = pid_of.setdefault((ln.generation, ln.rank), ln.pid)
        if owner != ln.pid and (ln.generation, ln.rank) not in rep.rank_conflicts:
            rep.rank_conflicts.append((ln.generation, ln.rank))
    rep.generations = len({g for g, _ in by_gen_step})
    first_step: dict[int, int] = {}
    for g, s in by_gen_step:
        first_step[g] = min(first_step.get(g, s), s)
    gens_of_step: dict[int, list[int]] = defaultdict(list)
    for g, s in by_gen_step:
        gens_of_step[s].append(g)
    rep.extra_steps = sorted(s for s in gens_of_step if s >= total_steps or s < 0)
    per_epoch: dict[int, Counter] = defaultdict(Counter)
    prev_gen = -1
    for s in range(total_steps):
        gens = gens_of_step.get(s)
        if not gens:
            rep.missing_steps.append(s)
            continue
        g = max(gens)
        rep.redone_steps += len(gens) - 1
        rep.steps_in_lineage += 1
        if g < prev_gen:
            rep.non_monotone.append(s)
        prev_gen = max(prev_gen, g)
        group = by_gen_step[(g, s)]
        world, shares = group[0].world, group[0].shares
        ranks = Counter(ln.rank for ln in group)
        rep.applied_twice += [(g, r, s) for r, c in ranks.items() if c > 1]
        batch = sampler.global_batch(s)
        rows: list[int] = []
        for ln in {ln.rank: ln for ln in group}.values():
            want, _ = sampler.worker_slice(s, shares, ln.rank)
            if ln.rows != want.tolist() or ln.world != world or ln.shares != shares:
                rep.wrong_slices.append((g, ln.rank, s))
            rows += ln.rows
        for r in range(world):
            if r in ranks:
                continue
            pid = pid_of.get((g, r))
            died_here = last_step.get((pid, g), -1) < s if pid is not None else s == first_step[g]
            if died_here:
                rep.in_flight += 1  # it died between its update and the line (see the docstring)
                rows += sampler.worker_slice(s, shares, r)[0].tolist()
            else:
                rep.missing_ranks.append((g, r, s))
        if sorted(rows) != sorted(batch.tolist()):
            rep.batch_mismatch.append(s)
        per_epoch[s // sampler.steps_per_epoch].update(rows)
    for epoch in range(-(-total_steps // sampler.steps_per_epoch)):
        used = per_epoch.get(epoch, Counter())
        rep.samples_lost += sum(1 for i in range(num_samples) if used[i] == 0)
        rep.samples_duplicated += sum(c - 1 for c in used.values() if c > 1)
        rep.samples_duplicated += sum(c for i, c in used.items() if not 0 <= i < num_samples)
    return rep


def position(lines: list[TraceLine]) -> list[tuple[float, int]]:
    """The run's position over time: (t, step + 1) of each line in time order, i.e. where training
    stood after the latest applied step (it goes back after a fall-back to a checkpoint)."""
    return [(ln.t, ln.step + 1) for ln in sorted(lines, key=lambda ln: ln.t)]
