"""The job spec: typed, validated, with errors that name the field to change.

The YAML file and the Python API (``lepton.train(dict_or_JobSpec)``) go through the same classes.
Every section forbids unknown keys so that a typo is an error, not a silently ignored option.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import LeptonError, SpecError, first_line

Activation = Literal["relu", "tanh", "sigmoid", "gelu", "elu", "leaky_relu", "linear"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class SplitSpec(_Strict):
    """Fractions of the (cleaned) rows for each split; the permutation is seeded by the job seed."""

    train: float = Field(0.8, gt=0, le=1)
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0 (got {total:g})")
        return self


class PreprocessSpec(_Strict):
    """Cleaning and scaling; every statistic is fitted on the training split only."""

    missing: Literal["drop", "mean", "median", "most_frequent", "error"] = "drop"
    dedupe: bool = True
    normalize: Literal["standard", "minmax", "none"] = "standard"


class DataSpec(_Strict):
    path: str = Field(min_length=1, description="local path or fsspec URL of a .csv, .parquet or .npz file")
    target: str
    features: Union[Literal["all"], list[str]] = "all"
    categorical: list[str] = Field(
        default_factory=list, description="feature columns to one-hot encode even if numeric"
    )
    classes: Optional[list[Union[int, str]]] = Field(
        None, description="the model's class labels; labels outside this list are an error"
    )
    shape: Optional[list[Annotated[int, Field(gt=0)]]] = Field(
        None, description="reshape each row's features to this shape, e.g. [1, 8, 8] for a cnn"
    )
    format: Optional[Literal["csv", "parquet", "npz"]] = None
    split: SplitSpec = Field(default_factory=SplitSpec)
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)


class DenseLayer(_Strict):
    type: Literal["dense"] = "dense"
    units: int = Field(gt=0)
    activation: Activation = "relu"
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dropout rate after the activation (Keras' Dropout layer);"
        " masks keyed by sample, so the model is split-invariant",
    )


class ConvLayer(_Strict):
    type: Literal["conv"]
    filters: int = Field(gt=0)
    kernel: int = Field(3, gt=0)
    stride: int = Field(1, gt=0)
    padding: Literal["same", "valid"] = "same"
    activation: Activation = "relu"


class PoolLayer(_Strict):
    type: Literal["maxpool", "avgpool"]
    size: int = Field(2, gt=0)


CnnLayer = Annotated[Union[ConvLayer, PoolLayer, DenseLayer], Field(discriminator="type")]


class ModelSpec(_Strict):
    """``mlp``: Dense layers (a Keras Sequential); ``cnn``: conv/pool then dense layers;
    ``factory``: ``"module:function"`` (or a callable from the Python API) called as
    ``build(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module``.
    The output layer (classes, or 1 for regression) is added by Lepton for mlp and cnn.
    ``init_weights`` starts training from saved weights (this model's parameter names and shapes, in a
    safetensors file such as another run's ``model/weights.safetensors``); with ``keep_zeros`` the
    entries of weight matrices and kernels that are exactly zero there stay zero (a pruned model's
    fine-tune: ``lepton export --prune … --finetune-epochs N`` runs one)."""

    type: Literal["mlp", "cnn", "factory"]
    layers: list[Any] = Field(default_factory=list)
    factory: Any = None
    init_weights: Optional[str] = Field(
        None, description="safetensors file of this model's weights to start from (default: random init)"
    )
    keep_zeros: bool = Field(
        False,
        description="weights that are exactly zero in init_weights stay zero (fine-tuning a pruned model)",
    )
    batch_norm: Literal["global", "local"] = Field(
        "global",
        description="BatchNorm statistics in training: global (over the global batch: the same model for"
        " any worker count; a collective per layer and pass) or local (each worker's slice,"
        " as DDP without SyncBatchNorm: faster, but the model depends on the split)",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.type == "factory":
            if self.factory is None:
                raise ValueError("model.type 'factory' needs model.factory ('module:function')")
            if isinstance(self.factory, str) and ":" not in self.factory:
                raise ValueError(f"model.factory must look like 'module:function' (got {self.factory!r})")
            if self.layers:
                raise ValueError(
                    "model.layers is not used with type 'factory' (the factory builds the model); remove it"
                )
        elif self.factory is not None:
            raise ValueError(f"model.factory is only allowed with type 'factory' (type is {self.type!r})")
        if self.keep_zeros and not self.init_weights:
            raise ValueError("model.keep_zeros keeps the zeros of model.init_weights: give init_weights too")
        item = DenseLayer if self.type == "mlp" else CnnLayer
        self.layers = TypeAdapter(list[item]).validate_python(self.layers)
        return self


class OptimizerSpec(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(0.0, ge=0)


class LrScheduleSpec(_Strict):
    """Learning rate as a function of the global step, computed identically by every worker."""

    type: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from lr/warmup_steps to lr")
    step_size: int = Field(100, gt=0, description="step: multiply by gamma every step_size steps")
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0, description="cosine: the floor it decays to")


class DivergenceSpec(_Strict):
    """A non-finite loss or gradient skips the step on every worker and scales the LR by lr_factor;
    max_consecutive such steps in a row stop the run (the last checkpoint is intact)."""

    max_consecutive: int = Field(3, gt=0)
    lr_factor: float = Field(0.5, gt=0, le=1)


class TrainSpec(_Strict):
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0, description="the global batch B, split across workers")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    lr_schedule: LrScheduleSpec = Field(default_factory=LrScheduleSpec)
    divergence: DivergenceSpec = Field(default_factory=DivergenceSpec)
    log_every_steps: int = Field(10, gt=0)


class EvalSpec(_Strict):
    every: Union[Literal["epoch", "never"], Annotated[int, Field(gt=0)]] = "epoch"


MetricName = Annotated[str, Field(pattern=r"^val\.(loss|accuracy|mse|mae|r2)$")]


class PlateauSpec(_Strict):
    metric: MetricName = "val.loss"
    mode: Literal["min", "max"] = "min"
    factor: float = Field(0.5, gt=0, lt=1)
    patience: int = Field(2, ge=0, description="evaluations without improvement tolerated")
    min_delta: float = Field(0.0, ge=0)
    min_lr: float = Field(0.0, ge=0)


class EarlyStoppingSpec(_Strict):
    metric: MetricName = "val.loss"
    mode: Literal["min", "max"] = "min"
    patience: int = Field(3, ge=0)
    min_delta: float = Field(0.0, ge=0)


class KeepBestSpec(_Strict):
    metric: MetricName = "val.loss"
    mode: Literal["min", "max"] = "min"


class PoliciesSpec(_Strict):
    """Evaluation-driven decisions (they need ``eval.every`` other than never)."""

    reduce_on_plateau: Optional[PlateauSpec] = None
    early_stopping: Optional[EarlyStoppingSpec] = None
    keep_best: Optional[KeepBestSpec] = Field(
        None, description="the final model is the best by this metric (early stopping implies it)"
    )


class CheckpointSpec(_Strict):
    every_steps: int = Field(200, ge=0, description="0: only at the end")
    keep: int = Field(2, gt=0, description="how many checkpoints to keep")


class ClusterSpec(_Strict):
    workers: int = Field(2, gt=0, description="workers to wait for before training starts")
    min_workers: int = Field(1, gt=0, description="below this many live workers training pauses")
    max_workers: Optional[int] = Field(None, gt=0, description="workers beyond this wait as standby")
    shares: Optional[list[Annotated[float, Field(gt=0)]]] = Field(
        None, description="fixed relative shares of the global batch, one per worker (default equal)"
    )
    collective_timeout_s: float = Field(30.0, gt=0, description="longest wait inside one collective")
    heartbeat_timeout_s: float = Field(5.0, gt=0, description="a worker silent this long is lost")
    wait_for_workers_s: float = Field(300.0, gt=0, description="how long to wait below min_workers")
    start_grace_s: float = Field(
        120.0,
        gt=0,
        description="after this long waiting for the first `workers`, training starts with the ready"
        " ones if they are at least min_workers",
    )
    start_timeout_s: float = Field(
        600.0, gt=0, description="the run fails if training has not started this long after the coordinator"
    )
    coordinator_timeout_s: float = Field(
        120.0, gt=0, description="how long workers ride out a lost coordinator"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: a GPU when the worker has one; NCCL when every worker has its own GPU"
    )
    balance: Literal["on", "off"] = Field("on", description="shares follow measured speed (off: equal)")
    rebalance_every_steps: int = Field(
        20,
        gt=0,
        description="steps between share re-plans once shares have"
        " settled (until then, one per measured plan)",
    )
    max_micro_batch: Optional[int] = Field(None, gt=0, description="split a larger share into micro-batches")
    shared_memory: bool = Field(
        True, description="workers on one host reduce gradients through shared memory (false: gloo/TCP)"
    )
    restart_failed: bool = Field(False, description="lepton train restarts a dead local worker")
    max_restarts: int = Field(3, ge=0, description="restarts allowed per run with restart_failed")

    def fixed_shares(self, world: int) -> Optional[list[float]]:
        """``shares`` when it has one entry per member of a generation of ``world`` workers; one of
        another size (a worker lost, or a replacement not yet back) has none fixed and is planned as
        ``balance`` says."""
        return list(self.shares) if self.shares and len(self.shares) == world else None

    @field_validator("balance", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        # YAML 1.1 reads a bare `on`/`off` as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


# --- export: the options of the export phase, shared by ``lepton export`` and a job's ``export:`` ---
#
#     export:
#       format: onnx                 # or a list: [onnx, torchscript, safetensors]
#       quantize: int8               # int8 (onnx only) | fp16 | bf16; omit for fp32
#       int8_method: auto            # auto (static for convolutional classifiers) | static | dynamic
#       prune: 0.5                   # fraction of Linear/Conv weights set to zero (L1 magnitude)
#       prune_scope: global          # global (over all layers) | layer (the fraction of each layer)
#       finetune_epochs: 2           # fine-tune the pruned model (a distributed run; keeps the sparsity)
#       finetune_workers: 2          # its worker processes (default: the run's cluster.workers)
#       latency_runs: 200            # timed calls per batch size in the report

ExportFormat = Literal["onnx", "torchscript", "safetensors"]
ExportPrecision = Literal["int8", "fp16", "bf16"]


def _default_formats() -> list[ExportFormat]:
    return ["onnx"]


class ExportSpec(BaseModel):
    """Validated export options; an unknown key is an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    format: list[ExportFormat] = Field(
        default_factory=_default_formats, description="artifact format(s): onnx, torchscript, safetensors"
    )
    quantize: Optional[ExportPrecision] = Field(
        None, description="int8: ONNX Runtime quantization (onnx only); fp16/bf16: 16-bit weights"
    )
    int8_method: Literal["auto", "static", "dynamic"] = Field(
        "auto",
        description="static: activation scales calibrated on training rows (fast convolutions);"
        " dynamic: activations quantized at run time; auto: static for convolutional classifiers",
    )
    prune: Optional[float] = Field(
        None, gt=0, lt=1, description="fraction of Linear/Conv weights to zero by L1 magnitude"
    )
    prune_scope: Literal["global", "layer"] = "global"
    finetune_epochs: int = Field(
        0, ge=0, description="epochs of fine-tuning after pruning (a distributed run)"
    )
    finetune_workers: Optional[int] = Field(
        None, gt=0, description="worker processes of the fine-tune (default: the run's cluster.workers)"
    )
    latency_runs: int = Field(
        200, ge=0, description="timed calls per batch size in the report (0: no timing)"
    )

    @field_validator("format", mode="before")
    @classmethod
    def _split(cls, v):
        # a single name, and "onnx,torchscript" on the command line, are the same as a YAML list
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @model_validator(mode="after")
    def _check(self):
        if not self.formats:
            raise ValueError("format: give at least one of onnx, torchscript, safetensors")
        if self.quantize == "int8" and self.formats != ["onnx"]:
            raise ValueError(
                "quantize int8 is done by ONNX Runtime quantization and needs format onnx"
                f" (got {', '.join(self.formats)}); torchscript and safetensors take fp16 or bf16"
            )
        if self.finetune_epochs and self.prune is None:
            raise ValueError("finetune_epochs fine-tunes a pruned model: give prune too (e.g. prune: 0.5)")
        if self.finetune_workers and not self.finetune_epochs:
            raise ValueError("finetune_workers applies to a fine-tune: give finetune_epochs too")
        return self

    @property
    def formats(self) -> list[str]:
        """The formats in the order given, without repeats."""
        return list(dict.fromkeys(self.format))

    @property
    def precision(self) -> str:
        return self.quantize or "fp32"


class JobSpec(_Strict):
    name: str = "job"
    seed: int = 0
    task: Literal["classification", "regression"] = "classification"
    data: DataSpec
    model: ModelSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    policies: PoliciesSpec = Field(default_factory=PoliciesSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    export: Optional[ExportSpec] = Field(
        None, description="run lepton export with these options after training"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\\0"):
            raise ValueError("must be a non-empty name without path separators")
        return v

    @model_validator(mode="after")
    def _cross(self):
        c = self.cluster
        if c.workers > self.train.batch_size:
            raise ValueError(
                f"cluster.workers ({c.workers}) is larger than train.batch_size ({self.train.batch_size}):"
                " every worker needs at least one sample of each global batch"
            )
        if c.min_workers > c.workers:
            raise ValueError(
                f"cluster.min_workers ({c.min_workers}) is larger than cluster.workers ({c.workers})"
            )
        if c.max_workers is not None and c.max_workers < c.workers:
            raise ValueError(
                f"cluster.max_workers ({c.max_workers}) is smaller than cluster.workers ({c.workers})"
            )
        if c.max_workers is not None and c.max_workers > self.train.batch_size:
            raise ValueError(
                f"cluster.max_workers ({c.max_workers}) is larger than train.batch_size"
                f" ({self.train.batch_size}):"
                " every worker needs at least one sample of each global batch"
            )
        if c.shares is not None and len(c.shares) != c.workers:
            raise ValueError(f"cluster.shares has {len(c.shares)} entries for {c.workers} workers")
        p = self.policies
        if (p.reduce_on_plateau or p.early_stopping or p.keep_best) and self.eval.every == "never":
            raise ValueError("policies need validation: set eval.every to epoch or a number of steps")
        if p.early_stopping and not p.keep_best:  # stopping early restores the best model
            p.keep_best = KeepBestSpec(metric=p.early_stopping.metric, mode=p.early_stopping.mode)
        if self.model.type == "cnn" and not self.data.shape:
            raise ValueError("model.type 'cnn' needs data.shape (e.g. [1, 8, 8])")
        s = self.data.split
        if self.export is not None and s.test == 0 and s.val == 0:  # known now, not after training
            raise ValueError(
                "export: the artifacts are checked on the test (or validation) rows, and"
                " data.split keeps none (test and val are 0): give data.split.test or"
                " data.split.val a fraction, or remove export"
            )
        return self

    def to_yaml_dict(self) -> dict:
        """The resolved spec as plain data (a callable factory is written as its qualified name)."""
        d = self.model_dump(mode="python")
        f = d["model"].get("factory")
        if callable(f):
            d["model"]["factory"] = f"{getattr(f, '__module__', '?')}:{getattr(f, '__qualname__', '?')}"
        return d


def _format_loc(loc: tuple) -> str:
    parts = []
    for i, p in enumerate(loc):
        if isinstance(p, int) and i == 1 and loc[0] == "model":
            parts.append(f".layers[{p}]")  # the layers are validated by the model section's validator
        elif isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("function-after", "function-before") or str(p).startswith(("function-", "tagged-union")):
            continue
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _allowed_fields(loc: tuple) -> list[str]:
    model: Any = JobSpec
    for p in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(p)
        if field is None:
            return []
        model = field.annotation
        if getattr(model, "__args__", None):  # Optional[Section]
            model = next(
                (a for a in model.__args__ if isinstance(a, type) and issubclass(a, BaseModel)), None
            )
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(getattr(model, "model_fields", {}))


def format_validation_error(err: ValidationError, source: str, names: dict[str, str] | None = None) -> str:
    """One line naming ``source`` and each wrong field. ``names`` renames top-level fields (the
    command-line flags that set them, for options that did not come from a file)."""
    msgs = []
    for e in err.errors():
        loc = _format_loc(e["loc"])
        if names and e["loc"] and e["loc"][0] in names:  # a flag's value has no inner structure
            loc = names[e["loc"][0]]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(e["loc"])
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            msgs.append(f"unknown field '{loc}'{hint}")
        else:
            # pydantic's "Input should be ..." reads as "must be ..." after the field's name
            msg = e["msg"].removeprefix("Value error, ").replace("Input should be", "must be", 1)
            if e["type"] == "missing":
                msg = "missing (required)"
            if e["type"] == "union_tag_not_found":
                msg = "a cnn layer needs a type: conv, maxpool, avgpool or dense"
            got = e.get("input")
            tail = (
                f" (got {got!r})" if e["type"] != "value_error" and not isinstance(got, (dict, list)) else ""
            )
            msgs.append(f"{loc}: {msg}{tail}" if loc else msg)
    return (f"{source}: " if source else "") + "; ".join(msgs)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``--set train.epochs=3`` style overrides; values are parsed as YAML scalars/lists."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {item!r}: '{p}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one, so
    a second ``epochs:`` would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: merged keys may be overridden by the section's own
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: the base loader says so
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one section", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: job file not found")
    try:
        raw = yaml.load(p.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise SpecError(f"{p}: not UTF-8 text (byte {e.start}); a job file is a UTF-8 YAML file") from None
    except OSError as e:
        raise SpecError(f"{p}: cannot read the job file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise SpecError(f"{p}:{where}: malformed YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: a job file must be a YAML mapping (name:, data:, model:, ...)")
    return raw


def parse_job(
    raw: dict | JobSpec, source: str = "job", overrides: list[str] | None = None, base_dir: Path | None = None
) -> JobSpec:
    """Validate a job; relative ``data.path`` is resolved against ``base_dir`` (the YAML's folder)."""
    if isinstance(raw, JobSpec):
        raw = raw.model_dump(mode="python")
    raw = apply_overrides(raw, overrides or [])
    try:
        job = JobSpec.model_validate(raw)
    except ValidationError as e:
        # an error in a field that --set gave is the command line's, not the file's
        set_keys = {o.partition("=")[0] for o in overrides or []}
        first = _format_loc(e.errors()[0]["loc"]) if e.errors() else ""
        hit = next(
            (k for k in set_keys if first == k or first.startswith(k + ".") or first.startswith(k + "[")),
            None,
        )
        raise SpecError(format_validation_error(e, "--set" if hit else source)) from None
    if base_dir is not None and "://" not in job.data.path and not Path(job.data.path).is_absolute():
        # a relative data path means "next to the job file", whatever the current directory is
        job.data.path = str((base_dir / job.data.path).resolve())
    init = job.model.init_weights
    if base_dir is not None and init and not Path(init).is_absolute():
        job.model.init_weights = str((base_dir / init).resolve())  # next to the job file too
    return job


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    p = Path(path)
    return parse_job(read_yaml(p), source=str(p), overrides=overrides, base_dir=p.resolve().parent)


def as_job(job: str | Path | dict | JobSpec, overrides: list[str] | None = None) -> JobSpec:
    """A job given as a YAML path, a dict or a ``JobSpec`` (what ``lepton.train`` and ``lepton
    coordinator`` take), validated with ``overrides`` (``--set KEY=VALUE``) applied. A dict's relative
    paths are read from the current directory, a YAML file's from the file's folder."""
    if isinstance(job, (str, Path)):
        return load_job(job, overrides)
    if isinstance(job, JobSpec):
        job = job.model_dump(mode="python")
    if isinstance(job, dict):
        return parse_job(job, source="job", overrides=overrides, base_dir=Path.cwd())
    raise LeptonError(f"lepton.train: expected a path, dict or JobSpec, got {type(job).__name__}")
