"""Control-plane messages between workers and the coordinator (JSON over HTTP, bearer token).

One typed module for every message so both ends agree; the data plane (torch.distributed) never
carries any of these.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from .records import MetricRecord, UnknownRecord, parse_record

# the header that carries a worker's own credential (``RegisterResponse.credential``) on heartbeat,
# plan and report: a worker speaks only for itself (coordinator/auth.py, ``WorkerCredentials``)
CREDENTIAL_HEADER = "X-Lepton-Worker-Credential"

Count = Annotated[int, Field(ge=0)]
Measure = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Share = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # a fraction of the global batch


class Resources(BaseModel):
    cpus: int = 1  # CPU cores this worker may use
    cpu_list: list[int] = Field(default_factory=list)  # which ones (its affinity)
    threads: int = 1  # torch intra-op threads
    gpus: list[str] = Field(default_factory=list)  # "name uuid" per visible GPU
    gpu_memory_gb: list[float] = Field(default_factory=list)  # each one's total memory
    memory_gb: float = 0.0  # host memory


class RegisterRequest(BaseModel):
    host: str = Field(max_length=256)
    pid: Count
    resources: Resources = Field(default_factory=Resources)
    # the address its data plane (gloo) will bind, when it knows it: the coordinator refuses a loopback
    # one from a worker that reaches it from another host (its peers could never connect)
    data_address: Optional[str] = Field(default=None, max_length=64)


class RegisterResponse(BaseModel):
    worker_id: str
    # this worker's credential: sent in ``CREDENTIAL_HEADER`` with every later call
    credential: str
    job: dict[str, Any]
    run_dir: str
    store_port: int
    # set when the run has a cloudpickled model factory (Python API): its path on the coordinator's host;
    # workers read it through their run storage (RunDir.read_factory), wherever they are
    factory_pickle: Optional[str] = None
    heartbeat_interval_s: float


class Generation(BaseModel):
    """One membership: who is in it, with which rank and share, starting from which state."""

    id: int
    rank: int
    world: int
    shares: list[float]
    members: list[str]
    start_step: int = 0  # the step the source replica (rank 0) is at
    store_port: int = 0  # the coordinator's TCPStore (it changes if the coordinator restarts)
    resume_checkpoint: Optional[str] = None  # rank 0 loads it before broadcasting state
    backend: Literal["gloo", "nccl"] = "gloo"


class PlanResponse(BaseModel):
    """``run``: join ``generation``; ``checkpoint``: write your live state as a checkpoint (before the
    job waits for workers or stops); ``wait``: ask again shortly; ``exit``: leave."""

    action: Literal["wait", "run", "checkpoint", "exit"]
    generation: Optional[Generation] = None
    reason: str = ""


class Heartbeat(BaseModel):
    """Also carries who the worker is, so that a restarted coordinator can adopt a running worker."""

    worker_id: str = Field(max_length=128)
    state: str = Field(default="training", max_length=32)
    step: Count = 0
    generation: Optional[Count] = None
    rank: Optional[Count] = None
    world: Optional[Annotated[int, Field(ge=1)]] = None
    host: str = Field(default="", max_length=256)
    pid: Count = 0
    plan_version: Count = 0  # the share plan this worker trains with
    shares: list[Share] = Field(default_factory=list)  # ... its shares, by rank
    resources: Optional[Resources] = None  # as registered
    samples_per_s: Measure = 0.0  # compute throughput: excludes time waiting in collectives
    # medians over the last full window of steps at plan_version (0 until there is one; worker/meter.py):
    # samples computed per step, the step's busy time (processor seconds of the whole step; on a GPU,
    # wall time of compute and update), the part of it spent in the compute window, and the fixed part
    # of that window (a one-sample forward/backward)
    step_samples: Measure = 0.0
    step_busy_s: Measure = 0.0
    step_compute_s: Measure = 0.0
    step_compute_fixed_s: Measure = 0.0
    # standard errors of the busy and compute medians, from the window's spread (the balancer's
    # confidence in them: balance.pooled)
    step_busy_err_s: Measure = 0.0
    step_compute_err_s: Measure = 0.0
    # metrics records queued since the last beat (metrics.jsonl lines): they ride in the heartbeat
    # instead of a request of their own (each request costs ~1 ms of processor time at both ends,
    # taken from training on a host whose cores are all busy); sent as JSON, where a NaN loss is null
    records: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rank_within_world(self) -> "Heartbeat":
        if self.rank is not None and self.world is not None and self.rank >= self.world:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world}")
        return self


class StepPlan(BaseModel):
    """What every member applies from an agreed step on: the shares of the global batch by rank.
    Version v+1 of a generation is issued only after every member applied v. The coordinator sends it
    to the members whose heartbeats come after it was made; the first member to know it carries it to
    the others in the next step's gradient reduction (worker/trainer.py)."""

    version: int
    shares: list[float]
    generation: Optional[int] = None


class HeartbeatResponse(BaseModel):
    action: Literal["continue", "exit"] = "continue"
    # set while the coordinator wants generation N to end: the worker puts the flag into its next
    # step's allreduce, so all members pause after the same step
    regroup_generation: Optional[int] = None
    # a newer share plan for the current generation: applied by every member after the next step
    plan: Optional[StepPlan] = None


# --- reports: one typed payload per kind, so a malformed one is refused (422) before the controller ---


class MetricsPayload(BaseModel):
    records: list[dict[str, Any]] = Field(default_factory=list)  # metrics.jsonl lines


class CheckpointPayload(BaseModel):
    step: Count  # the step whose state it holds
    path: str = Field(min_length=1, max_length=4096)


class FinishedPayload(BaseModel):
    step: Optional[Count] = None  # the last step trained
    summary: Optional[dict[str, Any]] = None  # rank 0's final metrics (summary.json)
    generation: Optional[Count] = None  # the generation it finished in


class PausedPayload(BaseModel):
    reason: Literal["regroup", "collective_error", "leaving"]
    generation: Optional[Count] = None  # the generation it left (none: it leaves between generations)
    step: Count
    error: str = ""  # collective_error: what failed


class FailedPayload(BaseModel):
    error: str = Field(min_length=1)
    trace: str = ""
    generation: Optional[Count] = None  # the generation it was in, if any


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True)

    worker_id: str = Field(max_length=128)


class MetricsReport(_Report):
    kind: Literal["metrics"]
    payload: MetricsPayload = Field(default_factory=MetricsPayload)


class CheckpointReport(_Report):
    kind: Literal["checkpoint"]
    payload: CheckpointPayload


class FinishedReport(_Report):
    kind: Literal["finished"]
    payload: FinishedPayload = Field(default_factory=FinishedPayload)


class PausedReport(_Report):
    kind: Literal["paused"]
    payload: PausedPayload


class FailedReport(_Report):
    kind: Literal["failed"]
    payload: FailedPayload


AnyReport = Annotated[
    Union[MetricsReport, CheckpointReport, FinishedReport, PausedReport, FailedReport],
    Field(discriminator="kind"),
]
"""Something a worker tells the coordinator: ``metrics`` (records for metrics.jsonl),
``checkpoint`` (a saved checkpoint), ``finished`` (final metrics), ``paused`` (left its generation
at ``step``; ``reason`` regroup | collective_error | leaving), ``failed`` (an error of its own: a
bug, bad data, a diverged model). The payload is typed by kind (``POST /v1/report`` answers 422 to a
malformed one)."""

_REPORT: TypeAdapter[AnyReport] = TypeAdapter(AnyReport)


def Report(worker_id: str, kind: str, payload: Optional[dict[str, Any]] = None) -> AnyReport:
    """A report of ``kind`` with its payload validated (a ``pydantic.ValidationError`` if malformed)."""
    doc: dict[str, Any] = {"worker_id": worker_id, "kind": kind}
    if payload is not None:
        doc["payload"] = payload
    return _REPORT.validate_python(doc)


_ADAPTERS: dict[type, Any] = {}


def typed_record(line: Any) -> MetricRecord | None:
    """``parse_record(line)`` whose fields also have their declared types, or None: metrics.jsonl
    lines arrive as free-form JSON, and the coordinator acts only on well-typed ones (a line with
    ``"step": "x"`` is journaled as sent, never acted on)."""
    if not isinstance(line, dict):
        return None
    try:
        rec = parse_record(line)
    except (UnknownRecord, TypeError):
        return None
    cls = type(rec)
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    try:
        return adapter.validate_python({f.name: getattr(rec, f.name) for f in fields(rec)})
    except ValidationError:
        return None
