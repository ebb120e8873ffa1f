"""Why a ``bench e2e`` target was missed, in figures from the same run, claiming no more
than the run shows.

A miss has several possible readings, and the reason states every one the run supports:

- **noise**: zentrain's schemes do identical compute, so the spread of their compute per
  step is this run's noise band; a shortfall (required / measured) inside it is not
  resolved by the run;
- **another system met it**: a comparable system (another sparse scheme, or DDP's sparse
  path) reached the required ratio in the same run, so the target is within reach here;
- **the cost model**: what it predicts for the measured bytes at this rate. Only when the
  prediction is below the target *and* no measured system reached it is the target called
  out of reach, and "no sync scheme could" only when even a free sync (the baseline's
  predicted sync time saved entirely) falls short; a measured ratio above the prediction is
  said as such;
- otherwise the step-time budget: compute alone over it (compute-bound), or the exposed
  sync over what is left of it, against the time the cost model predicts for its bytes.
"""

from __future__ import annotations

from typing import Any

from zentrain.bench.e2e_analysis import SPARSE_SCHEMES

_DENSE_OVERHEAD = ("per-step CPU work (flattening the gradients into buckets, dividing, "
                   "copying the result back) and waiting for the slowest of")
_OVERHEAD = ("per-step CPU work (finding the non-zero rows, hashing, scattering into the dense "
             "gradient, a few collectives per table) and waiting for the slowest of")


def compute_spread(point: dict[str, Any]) -> tuple[float, float] | None:
    """(min, max) compute per step over zentrain's schemes (identical work; DDP's compute
    is estimated from them, so it is left out), or None with fewer than two."""
    comp = [s["compute_time_s"] for s in point["systems"].values()
            if s.get("compute_time_s") and not s.get("sync_time_estimated")]
    return (min(comp), max(comp)) if len(comp) >= 2 else None


def comparable(system: str) -> tuple[str, ...]:
    """Systems whose meeting the target says something about ``system``'s: for a sparse
    scheme, the other sparse paths; ``dense`` (our dense all-reduce) has no peer."""
    return (*SPARSE_SCHEMES, "ddp-sparse") if system in SPARSE_SCHEMES else ()


def _ms(v: float) -> str:
    return f"{v * 1e3:,.0f} ms"


def miss_reason(system: str, baseline: str, required: float, p: dict[str, Any],
                ratio: float, pred: float | None) -> str:
    """The reason ``system`` missed ``required``x ``baseline`` at point ``p``: a lead (the
    noise band when the shortfall is inside it; else the cost model's verdict when it puts
    the target out of reach; else the step-time budget), then every other reading the run
    supports."""
    sy = p["systems"]
    b = sy[baseline]
    others = [(n, sy[n]["throughput"] / b["throughput"]) for n in comparable(system)
              if n not in (system, baseline) and "throughput" in sy.get(n, {})]
    met = sorted([o for o in others if o[1] >= required], key=lambda o: -o[1])
    spread = compute_spread(p)
    noise = spread[1] / spread[0] if spread else None
    short = required / ratio if ratio > 0 else float("inf")
    out_of_reach = pred is not None and pred < required and not met
    parts: list[str] = []
    if noise is not None and short <= noise:
        parts.append(f"not resolved by this run: the {short:.2f}x shortfall is within its "
                     "noise band (compute per step of zentrain's schemes, identical work, "
                     f"ranged {spread[0] * 1e3:,.0f}-{_ms(spread[1])}, {noise:.2f}x, across "
                     "their runs)")
    if met:
        parts.append(_others_met(met, system, required, sy))
    model = None if pred is None else _prediction(system, baseline, required, ratio, pred,
                                                   met, p)
    budget = _budget(system, baseline, required, p)
    if out_of_reach and model:
        parts.append(model)
        model = None
    parts += [x for x in (budget, model) if x]
    return "; ".join(parts)


def _others_met(met: list[tuple[str, float]], system: str, required: float,
                sy: dict[str, Any]) -> str:
    comp = sy[system].get("compute_time_s")

    def one(name: str, r: float) -> str:
        c = sy[name].get("compute_time_s")
        extra = "" if c is None or comp is None else (
            f", with {_ms(c)}/step of compute against {system}'s {_ms(comp)}")
        return f"{name} ({r:.2f}x{extra})"
    names = "; ".join(one(n, r) for n, r in met)
    return f"in the same run the {required:g}x was met by {names}, so it is not out of reach here"


def _prediction(system: str, baseline: str, required: float, ratio: float, pred: float,
                met: list[tuple[str, float]], p: dict[str, Any]) -> str:
    """What the cost model says, and how the measured ratio compares with it."""
    s, b = p["systems"][system], p["systems"][baseline]
    pb, ps, cref = (b.get("predicted_sync_time_s"), s.get("predicted_sync_time_s"),
                    p.get("compute_reference_s"))
    above = f"{system} measured {ratio:.2f}x, above the prediction: " if ratio >= pred else ""
    if pred >= required:
        return (f"{above}the cost model predicts {pred:.2f}x (it assumes {baseline}'s sync "
                "runs at line rate with no CPU cost)")
    if met:
        return (f"{above}the cost model predicts {pred:.2f}x, below the {required:g}x, yet "
                + ", ".join(f"{n} measured {r:.2f}x" for n, r in met)
                + ": its line-rate figure is not a ceiling for this run")
    if pb is None or ps is None or not cref:
        return (f"{above}the cost model predicts only {pred:.2f}x for {system} here, and no "
                f"system reached {required:g}x in this run")
    moved = (f"{system} and {baseline} move {s['sync_bytes_per_step'] / 2**20:.2f} and "
             f"{b['sync_bytes_per_step'] / 2**20:.2f} MiB per rank per step, {_ms(ps)} and "
             f"{_ms(pb)} at line rate, against ~{_ms(cref)} of compute")
    free = (cref + pb) / cref  # the baseline's line-rate sync time saved entirely
    if free < required:
        verdict = (f"even a free sync would give {free:.2f}x, so with both at line rate no "
                   f"sync scheme could reach {required:g}x")
    else:
        verdict = f"a free sync would give {free:.2f}x"
    return (f"{above}the cost model predicts only {pred:.2f}x ({moved}; {verdict}), and no "
            f"system reached {required:g}x in this run")


def _budget(system: str, baseline: str, required: float, p: dict[str, Any]) -> str | None:
    """The measured step-time budget the target leaves, and where ``system``'s step went."""
    s, b = p["systems"][system], p["systems"][baseline]
    budget = b["step_time_s"] / required
    comp, sync, psync = (s.get("compute_time_s"), s.get("sync_time_s"),
                         s.get("predicted_sync_time_s"))
    if comp is None or sync is None:
        return f"{system} step {_ms(s['step_time_s'])} > budget {_ms(budget)}"
    loopback = p.get("bandwidth_bits") is None
    bs, bp = b.get("sync_time_s"), b.get("predicted_sync_time_s")
    base = "" if loopback or bs is None or bp is None or bs < 2 * bp else (
        f"; {baseline}'s own sync took {'~' if b.get('sync_time_estimated') else ''}"
        f"{_ms(bs)}/step, not the {_ms(bp)} of line rate, which is what leaves this budget")
    if comp > budget:
        return (f"compute-bound in this run: {system}'s compute alone is {_ms(comp)}/step, "
                f"over the {_ms(budget)} the target allows ({baseline} step "
                f"{_ms(b['step_time_s'])} / {required:g}), so even a free sync could not "
                f"have met it; {p['world']} ranks share the machine's cores")
    work = f"{_DENSE_OVERHEAD if system == 'dense' else _OVERHEAD} {p['world']} ranks " \
           "sharing the cores"
    if loopback:
        wire = f" (loopback: the cost model counts no wire time, so all of it is {work})"
    else:
        wire = "" if psync is None else (
            f" ({_ms(psync)} predicted for its bytes at this rate; the rest is {work})")
    return (f"{system}'s exposed sync is {_ms(sync)}/step{wire}, over the "
            f"{_ms(budget - comp)} left after its {_ms(comp)} of compute within the "
            f"{_ms(budget)} budget ({baseline} step {_ms(b['step_time_s'])} / "
            f"{required:g}){base}")
