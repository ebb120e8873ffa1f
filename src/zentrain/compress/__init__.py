"""Lossy gradient compression for dense parameters: options, registry and selection policy.

``CompressConfig`` holds every option (one docstring per field); ``build_compressor`` makes
the ``Compressor`` for ``method`` (a ``Mixed`` one routing by name when ``method_for`` gives
some parameters another method); ``select_params`` is the policy that decides which
parameters are compressed. ``zentrain.sync.compressed.CompressedSync`` puts them together
around any non-DDP ``GradSync``.

Methods (paper notes in ``shared/papers/zen.md`` §2.4-2.8):

- ``topk`` / ``randomk``: keep a fraction ``ratio`` of the entries, error feedback keeps the
  rest for later (DGC momentum correction optional); the kept entries are a sparse tensor
  summed by a ``SparseReducer`` (``zen`` by default), so compression and ZEN compose.
- ``powersgd``: rank-``rank`` power iteration with warm start and error feedback (§2.5).
- ``qsgd``: ``bits``-bit stochastic quantization, unbiased (§2.6); ``sign``: 1 bit per entry
  with a per-bucket scale and error feedback (EF-signSGD, the core of 1-bit Adam, §2.7).
  Both travel as real bit-packed bytes.
- ``fp16`` / ``bf16``: all-reduce in half precision.

The policy leaves out what compression would hurt and not help: vectors (biases, norm
weights), parameters of normalization layers, embedding tables (their sparse gradients go
to the wrapped sparse scheme, unless a ``method_for`` entry names them) and tensors
smaller than ``min_numel``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from zentrain.compress.base import Compressor, Pending

METHODS = ("none", "topk", "randomk", "powersgd", "qsgd", "sign", "fp16", "bf16")
WIRE_DTYPES = ("float32", "bfloat16")
SPARSE_SCHEMES = ("zen", "agsparse", "sparcml", "omnireduce", "allreduce")


@dataclass
class CompressConfig:
    """Gradient compression of dense parameters (``sync.compress`` in the config tree)."""

    method: str = "none"
    """One of none, topk, randomk, powersgd, qsgd, sign, fp16, bf16, or auto: top-k for
    the matrices indexed by the vocabulary (the output layer), PowerSGD for the others
    (``zentrain.compress.auto``; rank 8 came within 0.5% of the uncompressed loss)."""
    ratio: float = 0.01
    """topk/randomk: fraction of each tensor's entries sent per step (0 < ratio <= 1)."""
    rank: int = 4
    """powersgd: rank of the low-rank approximation (1-4 typical, up to 32 for NLP)."""
    bits: int = 4
    """qsgd: bits per entry, sign included (2..8); 2 bits is ternary."""
    warmup_steps: int = 0
    """Synced steps at the start sent uncompressed (fp32 all-reduce) before compressing."""
    min_numel: int = 4096
    """Tensors with fewer entries than this are never compressed."""
    error_feedback: bool = True
    """Keep what compression dropped (per parameter) and add it to the next gradient."""
    error_feedback_params: str = "*"
    """With error_feedback: comma-separated name patterns (fnmatch, e.g. ``head.weight``
    or ``*.mlp.*``) of the compressed parameters that keep a residual; the others are
    compressed without one. Under AdamW, top-k with EF on the output layer only beat both
    EF everywhere and no EF (docs/compression.md, "Error feedback per matrix")."""
    method_for: str = ""
    """Per-parameter methods: ``PATTERNS=METHOD`` entries separated by ``;``, PATTERNS a
    comma list of name patterns (fnmatch), e.g. ``blocks.*,pos_emb=powersgd``. A parameter
    takes the method of the first entry that matches its name, else ``method``; ``none``
    leaves it uncompressed to the wrapped scheme. All methods share the other options
    (ratio, rank, ...). Top-k on the output layer with PowerSGD on the blocks came within
    0.1% of the uncompressed loss in simulation (docs/compression.md). Embedding tables
    are compressed only when an entry matches their name (``tok_emb.weight=topk``): their
    gradient is sparse, and the wrapped scheme syncs it losslessly otherwise."""
    global_topk: bool = False
    """topk: after the sparse reducer sums the ranks' entries, keep only the ``ratio``
    largest sums of each tensor (gTop-k) and send those back, instead of the union of
    every rank's top-k (about 3x more at 4 ranks). Each ZEN server keeps its share
    (ratio / world of its partition), so the Pull carries ~k entries; each rank puts its
    own dropped entries back into its residual, so with error feedback nothing is lost."""
    global_topk_factor: float = 1.0
    """With global_topk: sums kept per tensor, as a multiple of its k (>= 1). 2 pulls twice
    what each rank sent, still under the union's ~3k at 4 ranks."""
    wire_dtype: str = "float32"
    """topk/randomk values and PowerSGD factors on the wire: float32 or bfloat16 (half the
    value bytes; sums are still taken in float32). What rounding takes from a rank's
    entries stays in its residual when error feedback is on."""
    momentum_correction: bool = False
    """topk/randomk: DGC momentum correction and masking (use with momentum-free SGD)."""
    momentum: float = 0.9
    """topk/randomk with momentum_correction: the momentum factor moved into the sync."""
    sparse_scheme: str = "zen"
    """topk/randomk: sparse reducer that sums the kept entries (zen, agsparse, sparcml,
    omnireduce, allreduce)."""
    bucket_size: int = 512
    """qsgd/sign: entries that share one fp32 scale."""
    seed: int = 0
    """Seed of random-k indices, QSGD rounding and PowerSGD's initial Q."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"compress.{name}={getattr(self, name)!r} is invalid "
                              f"(allowed: {allowed})")
        if self.method not in (*METHODS, "auto"):
            raise bad("method", ", ".join((*METHODS, "auto")))
        if not 0.0 < self.ratio <= 1.0:
            raise bad("ratio", "0 < ratio <= 1")
        if self.rank < 1:
            raise bad("rank", "an integer >= 1")
        if not 2 <= self.bits <= 8:
            raise bad("bits", "2..8")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", ">= 0")
        if self.min_numel < 1:
            raise bad("min_numel", ">= 1")
        if not 0.0 <= self.momentum < 1.0:
            raise bad("momentum", "0 <= momentum < 1")
        if self.momentum_correction and not self.error_feedback:
            raise ValueError("compress.momentum_correction needs compress.error_feedback=true "
                             "(DGC accumulates the corrected momentum in the residual)")
        if not self.ef_patterns:
            raise bad("error_feedback_params", "comma-separated parameter name patterns; "
                      "'*' for all, or error_feedback=false for none")
        if self.momentum_correction and not self.ef_on_all:
            raise ValueError("compress.momentum_correction needs error feedback on every "
                             "compressed parameter (compress.error_feedback_params='*'), "
                             f"not {self.error_feedback_params!r}")
        rules = self.method_rules  # raises on a malformed entry
        if rules and self.method == "none":
            raise ValueError(f"compress.method_for={self.method_for!r} needs compress.method "
                             "(the method of the parameters no entry matches; 'none' turns "
                             "compression off); add '; *=none' to compress only the matches")
        if self.momentum_correction and (self.method == "auto" or any(
                m not in (self.method, "none") for _, m in rules)):
            raise ValueError("compress.momentum_correction works with one method "
                             f"(compress.method), not with compress.method_for={self.method_for!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise bad("wire_dtype", ", ".join(WIRE_DTYPES))
        if (self.global_topk and self.method not in ("none", "auto")
                and "topk" not in self.methods_used):
            raise ValueError("compress.global_topk applies to method topk, which no parameter "
                             f"uses here (methods: {self.label or 'none'})")
        if self.global_topk_factor < 1.0:
            raise bad("global_topk_factor", ">= 1 (a multiple of each tensor's k)")
        if self.global_topk and self.momentum_correction:
            raise ValueError("compress.global_topk does not combine with momentum_correction "
                             "(a dropped entry's momentum would have been masked already)")
        if self.sparse_scheme not in SPARSE_SCHEMES:
            raise bad("sparse_scheme", ", ".join(SPARSE_SCHEMES))
        if self.bucket_size < 1:
            raise bad("bucket_size", ">= 1")

    @property
    def method_rules(self) -> list[tuple[list[str], str]]:
        """``method_for`` parsed: (patterns, method) per entry, in order."""
        rules = []
        for entry in filter(None, (e.strip() for e in self.method_for.split(";"))):
            pats, sep, method = entry.rpartition("=")
            patterns = [s.strip() for s in pats.split(",") if s.strip()]
            method = method.strip()
            if not sep or not patterns or method not in METHODS:
                raise ValueError(
                    f"compress.method_for entry {entry!r} is invalid (allowed: PATTERNS=METHOD "
                    f"entries separated by ';', METHOD one of {', '.join(METHODS)})")
            rules.append((patterns, method))
        return rules

    def method_of(self, name: str) -> str:
        """The method that compresses parameter ``name`` (``none``: not compressed)."""
        rule = self.rule_method(name)
        return self.method if rule is None else rule

    def rule_method(self, name: str) -> str | None:
        """The method of the first ``method_for`` entry matching ``name``; None if none does."""
        for patterns, method in self.method_rules:
            if any(fnmatchcase(name, pat) for pat in patterns):
                return method
        return None

    @property
    def methods_used(self) -> list[str]:
        """Every compression method some parameter may get, ``method`` first, no ``none``."""
        out = [self.method] + [m for _, m in self.method_rules]
        return [m for i, m in enumerate(out) if m != "none" and m not in out[:i]]

    @property
    def label(self) -> str:
        """The methods in use joined by ``+`` (``topk+powersgd``); empty without compression."""
        return "+".join(self.methods_used)

    @property
    def options(self) -> list[str]:
        """The options that change what the methods send, for reports (``global top-k 2x``,
        ``bf16 wire``); empty at the defaults. Not part of ``label``, which names state."""
        if self.method == "none" and not self.method_rules:
            return []
        out = []
        if self.global_topk:
            f = self.global_topk_factor
            out.append("global top-k" + ("" if f == 1 else f" {f:g}x"))
        if self.wire_dtype != "float32":
            out.append(f"{self.wire_dtype.replace('bfloat', 'bf')} wire")
        if not self.error_feedback:
            out.append("no EF")
        elif not self.ef_on_all:
            out.append(f"EF on {self.error_feedback_params}")
        if self.momentum_correction:
            out.append("momentum correction")
        if self.warmup_steps:
            out.append(f"{self.warmup_steps} dense steps")
        return out

    @property
    def ef_patterns(self) -> list[str]:
        return [s.strip() for s in self.error_feedback_params.split(",") if s.strip()]

    @property
    def ef_on_all(self) -> bool:
        """Whether the patterns cover every compressed parameter (a ``*`` among them)."""
        return "*" in self.ef_patterns

    def keeps_residual(self, name: str) -> bool:
        """Whether parameter ``name`` is compressed with error feedback."""
        return self.error_feedback and any(fnmatchcase(name, pat) for pat in self.ef_patterns)

    @classmethod
    def coerce(cls, value: CompressConfig | str | dict[str, Any] | None) -> CompressConfig:
        """Accept a config, a method name, or a dict of fields (``DataParallel(compress=...)``)."""
        if value is None:
            return cls()
        if isinstance(value, CompressConfig):
            value.validate()
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, dict):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(f"unknown compress option(s) {unknown} "
                                 f"(allowed: {', '.join(sorted(names))})")
            return cls(**value)
        raise TypeError(f"compress must be a CompressConfig, str or dict, not {type(value)}")


def build_compressor(name: str | CompressConfig, **opts: Any) -> Compressor:
    """Make the compressor for method ``name`` (``opts`` are ``CompressConfig`` fields);
    a ``Mixed`` one when ``method_for`` gives some parameters another method."""
    cfg = name if isinstance(name, CompressConfig) else CompressConfig(method=name, **opts)
    if cfg.method == "none":
        raise ValueError("compress.method='none' has no compressor; use the plain scheme")
    if cfg.method == "auto":
        raise ValueError("compress.method='auto' picks methods from the model's shapes: "
                         "resolve it first (zentrain.compress.auto.resolve_auto(cfg, model))")
    if len(cfg.methods_used) > 1:
        from zentrain.compress.mixed import Mixed
        return Mixed(cfg, {m: _build_one(replace(cfg, method=m, method_for="",
                                                 global_topk=cfg.global_topk and m == "topk"))
                           for m in cfg.methods_used})
    return _build_one(cfg)


def _build_one(cfg: CompressConfig) -> Compressor:
    if cfg.method in ("topk", "randomk"):
        from zentrain.compress.topk import RandomK, TopK
        return (TopK if cfg.method == "topk" else RandomK)(cfg)
    if cfg.method == "powersgd":
        from zentrain.compress.powersgd import PowerSGD
        return PowerSGD(cfg)
    if cfg.method in ("qsgd", "sign"):
        from zentrain.compress.quant import QSGD, Sign
        return (QSGD if cfg.method == "qsgd" else Sign)(cfg)
    from zentrain.compress.cast import Cast
    return Cast(cfg)


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
          nn.modules.batchnorm._NormBase)


def select_params(model: nn.Module, cfg: CompressConfig,
                  accepts: Callable[[str, tuple[int, ...]], bool] = lambda name, shape: True,
                  ) -> list[tuple[str, nn.Parameter]]:
    """The parameters to compress, in reverse registration order (≈ backward order).

    Skipped: frozen and non-float parameters, embedding tables (unless a ``method_for``
    entry matches their name), parameters of norm layers,
    anything with fewer than 2 dimensions (biases, norm weights, scalars), names ending in
    ``bias``, tensors under ``cfg.min_numel`` entries, names whose method
    (``cfg.method_of``) is ``none``, and shapes ``accepts(name, shape)`` refuses (PowerSGD:
    where a low-rank factorization would not save bytes). Raises when compression is on
    but nothing qualifies, or when a ``method_for`` or ``error_feedback_params`` pattern
    matches nothing, so a typo is not silent.
    """
    from zentrain.sync.sparse import embedding_params

    tables = {id(p) for p in embedding_params(model)}
    skip: set[int] = set()
    for m in model.modules():
        if isinstance(m, _NORMS):
            skip.update(id(p) for p in m.parameters(recurse=False))
    chosen: list[tuple[str, nn.Parameter]] = []
    candidates: list[str] = []
    for name, p in model.named_parameters():  # de-duplicates tied parameters
        if (not p.requires_grad or not p.is_floating_point() or id(p) in skip
                or p.dim() < 2 or name.endswith("bias")):
            continue
        if id(p) in tables and cfg.rule_method(name) is None:
            continue  # a table goes to the wrapped sparse scheme unless named in method_for
        candidates.append(name)
        if (p.numel() >= cfg.min_numel and cfg.method_of(name) != "none"
                and accepts(name, tuple(p.shape))):
            chosen.append((name, p))
    for patterns, method in cfg.method_rules:
        for pat in patterns:
            if not any(fnmatchcase(n, pat) for n in candidates):
                raise ValueError(
                    f"compress.method_for pattern {pat!r} (={method}) matches no weight matrix "
                    f"(candidates: {', '.join(candidates)})")
    if not chosen and cfg.method != "none":
        raise ValueError(
            f"compress.method={cfg.method!r} matched no parameter: {len(candidates)} weight "
            f"matrices were candidates but none has >= min_numel={cfg.min_numel} entries"
            + (" and a method other than none in compress.method_for" if cfg.method_rules
               else "")
            + (f" and a worthwhile rank-{cfg.rank} factorization"
               if "powersgd" in cfg.methods_used else "")
            + "; lower compress.min_numel or use method='none'")
    if cfg.error_feedback:  # a typo'd pattern would silently turn EF off
        names = [n for n, _ in chosen]
        for pat in cfg.ef_patterns:
            if not any(fnmatchcase(n, pat) for n in names):
                raise ValueError(
                    f"compress.error_feedback_params pattern {pat!r} matches no compressed "
                    f"parameter (compressed: {', '.join(names)})")
    return chosen[::-1]


__all__ = ["METHODS", "CompressConfig", "Compressor", "Pending", "build_compressor",
           "select_params"]
