"""Typed configuration: dataclasses with a docstring per field, TOML files, ``--set`` overrides.

Precedence: dataclass defaults < TOML file < ``--set section.key=value``. Every unknown key
and every bad value raises ``ConfigError`` with a one-line message naming the key and what
is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from zentrain.compress import CompressConfig
from zentrain.config_ranges import range_error


class ConfigError(ValueError):
    """A bad config key or value (one line, names the key and what is allowed)."""


@dataclass
class ModelConfig:
    name: Literal["gpt", "deepfm"] = "gpt"
    """Which model to train: a GPT language model or a DeepFM CTR model."""
    n_layer: int = 4
    """GPT: number of transformer blocks."""
    n_head: int = 4
    """GPT: attention heads per block."""
    d_model: int = 128
    """GPT: width of the residual stream."""
    seq_len: int = 128
    """GPT: tokens per training sequence."""
    vocab_size: int = 16384
    """GPT: BPE vocabulary size (the tokenizer is trained to this size)."""
    dropout: float = 0.0
    """GPT: dropout probability."""
    sparse_embedding: bool = False
    """Make embedding tables produce torch sparse COO gradients instead of dense ones."""
    tie_embeddings: bool = False
    """GPT: the output layer shares the token table's weight, as in GPT-2. The table's
    gradient is then dense (the head's, for every token), so a sparse scheme syncs it
    whole; ``compress.method = "auto"`` gives it top-k. Needs ``sparse_embedding = false``."""
    num_fields: int = 26
    """DeepFM: number of categorical fields (Criteo has 26)."""
    num_dense: int = 13
    """DeepFM: number of dense (integer) features (Criteo has 13)."""
    rows_per_field: int = 40000
    """DeepFM: mean rows per field; the shared table has num_fields x this (~1M) rows."""
    field_rows: Literal["criteo", "uniform"] = "criteo"
    """DeepFM: per-field sizes: the Kaggle Criteo cardinalities scaled to that total, or
    equal (zentrain.models.ctr_layout)."""
    id_layout: Literal["frequency", "hashed"] = "frequency"
    """DeepFM: ids are frequency ranks with the hottest at the first rows (Criteo files: a
    counted vocabulary), or scattered (Criteo files: hashed)."""
    embed_dim: int = 16
    """DeepFM: embedding width of each field."""
    mlp_dims: list[int] = field(default_factory=lambda: [256, 128])
    """DeepFM: hidden sizes of the deep part."""


@dataclass
class SourceConfig:
    """One dataset of a mixture (a ``[[data.sources]]`` table)."""

    path: str = ""
    """File, glob or directory (empty: the Python standard library for the GPT, the
    synthetic click log for DeepFM)."""
    format: Literal["auto", "txt", "jsonl", "parquet", "bin", "criteo", "synthetic"] = "auto"
    """How to read it. ``auto``: by suffix (``.jsonl``, ``.parquet``, ``.bin``, else text for
    the GPT; Criteo TSV for DeepFM). ``bin``: pre-tokenized ids, see ``token_dtype``."""
    name: str = ""
    """Label in logs and the ``mixture`` metric (default: from the path)."""
    weight: float = 1.0
    """Mixing weight at step 0 (weights are normalized over the sources at every step)."""
    weight_end: float = -1.0
    """Weight reached after ``ramp_steps``, linearly from ``weight`` (negative: no ramp)."""
    ramp_steps: int = 0
    """Steps of the linear ramp from ``weight`` to ``weight_end``."""
    ramp_start: int = 0
    """Step at which the ramp begins; the weight is ``weight`` until then (e.g. a data
    curriculum that changes the mixture after a first phase)."""
    token_dtype: Literal["uint16", "uint32"] = "uint16"
    """``bin`` format: the integer type of the raw little-endian token ids."""


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Text/JSONL files or globs for the GPT (empty: the Python standard library's .py
    files), or Criteo TSV files for DeepFM (empty: the built-in synthetic generator)."""
    cache_dir: str = "~/.cache/zentrain"
    """Where the trained tokenizer and token-id memmaps are cached."""
    eval_fraction: float = 0.02
    """Fraction of the data held out for evaluation."""
    max_bytes: int = 0
    """Read at most this many bytes of text (0: all)."""
    synthetic_samples: int = 2_000_000
    """DeepFM synthetic generator: number of distinct samples in the training stream."""
    zipf_alpha: float = 1.1
    """DeepFM synthetic generator: Zipf exponent of categorical ids (skew)."""
    on_error: Literal["skip", "fail"] = "skip"
    """What a corrupt record does: reported and skipped, or fatal."""
    vocab_min_count: int = 2
    """DeepFM Criteo files, frequency ids: rarer values share their field's last row."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several datasets mixed by weight (``[[data.sources]]`` tables; empty: one source made
    of ``paths``)."""
    global_batch_size: int = 0
    """Samples per optimizer step over all ranks (0: ``train.batch_size x train.grad_accum
    x ranks`` of the first run). Kept in the loader state, so a resume at another world
    size sees the same batches; each rank gets ``global / ranks / grad_accum`` per micro-batch."""
    num_workers: int = 2
    """Background processes per rank that build batches (0: in the training process)."""
    prefetch: int = 4
    """Steps prepared ahead of the trainer per rank (shared-memory batch slots)."""


@dataclass
class TrainConfig:
    steps: int = 150
    """Optimizer steps to run."""
    batch_size: int = 8
    """Per-rank micro-batch size (sequences for GPT, samples for DeepFM)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of ``lr``."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases, norms and embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: off)."""
    seed: int = 1234
    """Seed for model init, data order and dropout."""
    deterministic: bool = False
    """Use deterministic algorithms (bit-reproducible runs, slower on GPU)."""
    bf16: bool = False
    """Run forward/backward under bf16 autocast."""
    eval_every: int = 75
    """Evaluate every this many steps (0: only at the end)."""
    eval_batches: int = 8
    """Batches per evaluation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device: cuda when available under ``auto``."""
    threads: int = 0
    """CPU threads per rank (0: cores / local ranks)."""


@dataclass
class SyncConfig:
    scheme: Literal["ddp", "dense", "agsparse", "sparcml", "omnireduce", "zen", "auto"] = "dense"
    """Gradient synchronization scheme."""
    bucket_mb: float = 25.0
    """Dense all-reduce bucket size in MiB."""
    sparse_params: Literal["embeddings", "none"] = "embeddings"
    """Which parameters sparse schemes treat as sparse (embedding tables, or none)."""
    dense_threshold: float = 0.5
    """Sparse schemes fall back to dense all-reduce above this gradient density."""
    auto_profile_steps: int = 5
    """``auto``: steps profiled before choosing a scheme per tensor."""
    auto_recheck_every: int = 200
    """``auto``: re-profile and re-choose every this many steps (0: never)."""
    compress: Literal["none", "topk", "randomk", "powersgd", "qsgd", "sign", "fp16",
                      "bf16", "auto"] = "none"
    """Lossy compression of dense gradients (its options: the ``[compress]`` section);
    the same as ``compress.method``. ``auto``: top-k for the output layer, PowerSGD for
    the other matrices."""


@dataclass
class ParallelConfig:
    nproc: int = 2
    """Local worker processes (data-parallel ranks) started by ``zentrain run``."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend: gloo for CPU, NCCL for CUDA under ``auto``."""
    timeout_s: float = 300.0
    """Collective timeout; a peer that dies makes the others fail after this long."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Persistent (torch.distributed.checkpoint) save every this many steps (0: end only)."""
    at_end: bool = True
    """Save a persistent checkpoint when training ends."""
    resume: bool = False
    """Resume from the newest checkpoint in the run directory."""
    async_persistent: bool = True
    """Persistent saves with DCP ``async_save`` on a dedicated gloo group (training goes on
    while the files are written; committed by rename once every rank's data is on disk);
    false: blocking ``dcp.save``."""
    memory_every: int = 1
    """In-memory checkpoint to the node's checkpoint agent every this many steps (0: off).
    Active only when ``zentrain run`` started agents (``ZENTRAIN_CKPT_AGENTS``)."""
    replicas: int = 2
    """Copies of every in-memory checkpoint, the node's own included (GEMINI's m): the other
    m - 1 are held by peer nodes' agents and survive the loss of a whole node."""
    max_restarts: int = 3
    """Times torch's elastic agent restarts the workers after a failure (0: a failed worker
    ends the run)."""
    memory_bytes_per_s: float = 0.0
    """Throttle of in-memory checkpoint traffic, worker → agent and agent → replicas
    (bytes/s; 0: unthrottled)."""
    pause_in_sync: bool = True
    """Hold in-memory checkpoint traffic while backward and the gradient sync run."""
    wait_commit: bool = True
    """With more than one node, start an in-memory save only once the previous step is
    committed (every node's shards and replicas in place): a lost node then costs at most
    one step. When that takes longer than a step the wait shows as ``ckpt_blocked_s``;
    false: never wait (a lost node may cost more steps)."""


@dataclass
class MetricsConfig:
    log_every: int = 1
    """Write a metrics.jsonl row every this many steps."""
    progress: bool = True
    """Show a live progress bar on rank 0."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimization loop."""
    sync: SyncConfig = field(default_factory=SyncConfig)
    """Gradient synchronization."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Process layout and backend."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Metrics and progress."""
    compress: CompressConfig = field(default_factory=CompressConfig)
    """Gradient compression options (ratio, rank, bits, ...; see zentrain.compress)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading and overriding ---------------------------------------------------------------

def _allowed(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        inner = get_args(tp)[0]
        return "a list of tables" if dataclasses.is_dataclass(inner) else \
            f"a list of {inner.__name__}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the field type ``tp``; raise ConfigError naming ``key``."""
    bad = ConfigError(f"bad value for {key}: {value!r} (allowed: {_allowed(tp)})")
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(f"{key}[{i}]" if dataclasses.is_dataclass(get_args(tp)[0]) else key,
                        get_args(tp)[0], v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"bad value for {key}: {value!r} (allowed: a table of keys)")
        return _table(key, tp, value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _table(key: str, cls: type, body: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from a TOML table; unknown keys name ``key.field``."""
    types = _field_types(cls)
    kwargs = {}
    for k, v in body.items():
        if k not in types:
            raise ConfigError(f"unknown config key {key}.{k} (allowed: {', '.join(types)})")
        kwargs[k] = _coerce(f"{key}.{k}", types[k], v)
    return cls(**kwargs)


def apply_dict(cfg: Config, data: dict[str, Any], origin: str = "config") -> Config:
    """Merge a nested dict (from TOML) into ``cfg``; unknown keys are errors."""
    sections = _field_types(Config)
    for sec, body in data.items():
        if sec not in sections:
            raise ConfigError(
                f"unknown config section [{sec}] in {origin} (allowed: {', '.join(sections)})")
        if not isinstance(body, dict):
            raise ConfigError(f"[{sec}] in {origin} must be a table of keys")
        obj = getattr(cfg, sec)
        types = _field_types(type(obj))
        for key, value in body.items():
            if key not in types:
                raise ConfigError(f"unknown config key {sec}.{key} in {origin} "
                                  f"(allowed: {', '.join(types)})")
            setattr(obj, key, _coerce(f"{sec}.{key}", types[key], value))
    return cfg


def _parse_scalar(text: str) -> Any:
    """Parse the right side of ``--set k=v`` as TOML would, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"bad override {item!r} (expected section.key=value)")
        path, text = item.split("=", 1)
        sec, key = path.strip().split(".", 1)
        apply_dict(cfg, {sec: {key: _parse_scalar(text.strip())}}, origin="--set")
    return cfg


def validate(cfg: Config) -> Config:
    """Every numeric field against its range (``RANGES``), then cross-field checks that a
    single field's range cannot express."""
    msg = range_error(cfg)
    if msg:
        raise ConfigError(msg)
    if cfg.model.d_model % cfg.model.n_head:
        raise ConfigError(f"model.d_model ({cfg.model.d_model}) must be divisible by "
                          f"model.n_head ({cfg.model.n_head})")
    if cfg.model.tie_embeddings and cfg.model.sparse_embedding:
        raise ConfigError("model.tie_embeddings = true needs model.sparse_embedding = false "
                          "(the tied head gives the table a dense gradient)")
    s = cfg.sync
    if s.scheme == "auto" and s.auto_recheck_every and \
            s.auto_recheck_every <= s.auto_profile_steps:
        raise ConfigError(f"sync.auto_recheck_every ({s.auto_recheck_every}) must be 0 or "
                          f"more than sync.auto_profile_steps ({s.auto_profile_steps})")
    _validate_sources(cfg.data.sources)
    _merge_compress(cfg)
    return cfg


def _merge_compress(cfg: Config) -> None:
    """``sync.compress`` and ``compress.method`` name the same thing; they must agree."""
    a, b = cfg.sync.compress, cfg.compress.method
    if a != "none" and b != "none" and a != b:
        raise ConfigError(f"sync.compress = {a!r} but compress.method = {b!r}; set one of them")
    cfg.compress.method = cfg.sync.compress = a if a != "none" else b
    try:
        cfg.compress.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.compress.method != "none" and cfg.sync.scheme == "ddp":
        raise ConfigError(f"sync.compress = {cfg.compress.method!r} needs a zentrain scheme "
                          "(sync.scheme = dense, zen, ...), not 'ddp'")


def _validate_sources(sources: list[SourceConfig]) -> None:
    names = [s.name for s in sources if s.name]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources names must be unique (got {names})")
    for i, s in enumerate(sources):
        key = f"data.sources[{i}]"
        if s.weight_end >= 0 and s.ramp_steps == 0:
            raise ConfigError(f"{key}.weight_end needs {key}.ramp_steps > 0")
        if s.ramp_start < 0:
            raise ConfigError(f"{key}.ramp_start must be >= 0 (got {s.ramp_start})")
        if s.ramp_start and s.weight_end < 0:
            raise ConfigError(f"{key}.ramp_start needs a ramp ({key}.weight_end and "
                              "ramp_steps)")
    # Weights are piecewise linear in the step: their sum is smallest at step 0 or at the
    # start or end of some ramp, so checking those steps covers every step.
    for t in sorted({0, *(s.ramp_start for s in sources),
                     *(s.ramp_start + s.ramp_steps for s in sources)}):
        if sources and sum(source_weight(s, t) for s in sources) <= 0:
            raise ConfigError(f"data.sources weights sum to 0 at step {t}; give some source "
                              "a positive weight")


def source_weight(s: SourceConfig, step: int) -> float:
    """The weight of source ``s`` at ``step``: ``weight``, ramped linearly to ``weight_end``
    over ``ramp_steps`` from step ``ramp_start`` when ``weight_end >= 0``."""
    if s.weight_end < 0 or s.ramp_steps == 0:
        return s.weight
    frac = min(1.0, max(0.0, (step - s.ramp_start) / s.ramp_steps))
    return s.weight + (s.weight_end - s.weight) * frac


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < TOML file < overrides, then validated."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        apply_dict(cfg, data, origin=str(p))
    apply_overrides(cfg, overrides or [])
    return validate(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a saved run's config.json)."""
    return validate(apply_dict(Config(), data, origin="dict"))
