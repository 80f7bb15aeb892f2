"""Control-plane messages between workers and the coordinator (JSON over HTTP, bearer token).

One typed module for every message so both ends agree; the data plane (torch.distributed) never
carries any of these.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field


class Resources(BaseModel):
    cpus: int = 1  # CPU cores this worker may use
    cpu_list: list[int] = Field(default_factory=list)  # which ones (its affinity)
    threads: int = 1  # torch intra-op threads
    gpus: list[str] = Field(default_factory=list)  # "name uuid" per visible GPU
    gpu_memory_gb: list[float] = Field(default_factory=list)  # each one's total memory
    memory_gb: float = 0.0  # host memory


class RegisterRequest(BaseModel):
    host: str
    pid: int
    resources: Resources = Field(default_factory=Resources)


class RegisterResponse(BaseModel):
    worker_id: str
    job: dict[str, Any]
    run_dir: str
    store_port: int
    factory_pickle: Optional[str] = None  # path of a cloudpickled model factory (Python API)
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

    worker_id: str
    state: str = "training"
    step: int = 0
    generation: Optional[int] = None
    rank: Optional[int] = None
    world: Optional[int] = None
    host: str = ""
    pid: int = 0
    plan_version: int = 0  # the share plan this worker trains with
    shares: list[float] = Field(default_factory=list)  # ... its shares, by rank
    resources: Optional[Resources] = None  # as registered
    samples_per_s: float = 0.0  # compute throughput: excludes time waiting in collectives
    # medians over the last full window of steps at plan_version (0 until there is one; worker/meter.py):
    # samples computed per step, the step's busy time (processor seconds of the whole step; on a GPU,
    # wall time of compute and update), the part of it spent in the compute window, and the fixed part
    # of that window (a one-sample forward/backward)
    step_samples: float = 0.0
    step_busy_s: float = 0.0
    step_compute_s: float = 0.0
    step_compute_fixed_s: float = 0.0
    # standard errors of the busy and compute medians, from the window's spread (the balancer's
    # confidence in them: balance.pooled)
    step_busy_err_s: float = 0.0
    step_compute_err_s: float = 0.0
    # metrics records queued since the last beat (metrics.jsonl lines): they ride in the heartbeat
    # instead of a request of their own (each request costs ~1 ms of processor time at both ends,
    # taken from training on a host whose cores are all busy); sent as JSON, where a NaN loss is null
    records: list[dict[str, Any]] = Field(default_factory=list)


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


class Report(BaseModel):
    """Something a worker tells the coordinator: ``metrics`` (records for metrics.jsonl),
    ``checkpoint`` (a saved checkpoint), ``finished`` (final metrics), ``paused`` (left its generation
    at ``step``; ``reason`` regroup | collective_error | leaving), ``failed`` (an error that is not the
    cluster's: a bug, bad data; it fails the job)."""

    worker_id: str
    kind: Literal["metrics", "checkpoint", "finished", "paused", "failed"]
    payload: dict[str, Any] = Field(default_factory=dict)
