"""Top-k with error feedback under AdamW, simulated: N data-parallel ranks in one process.

Which place for the error feedback (EF) keeps AdamW's loss when each rank sends only its
top ``ratio`` of every compressed matrix? The ranks see their own batches of the default
GPT config (the trainer's loader, world N); the synced result is the mean over ranks, as
every sync scheme computes it, so no process group is needed. Methods:

* ``none``: the mean gradient (the reference);
* ``topk_ef``: top-k of gradient + residual, residual kept (what ``compress.method=topk``
  does today);
* ``topk_noef``: top-k of the gradient alone (``compress.error_feedback=false``);
* ``adam_ef``: EF in the *update* domain: each rank runs its own AdamW moments on its own
  gradient for the compressed matrices, sends the top-k of (lr x Adam direction +
  residual) and keeps the rest; the mean of the sent updates is applied to the shared
  weights (plus AdamW's decoupled decay). The update is linear in what is sent, so EF is
  exact again (the reason 1-bit Adam freezes the variance; here nothing is frozen);
* ``ef21``: EF21 (Richtarik et al. 2021): each rank sends the top-k of (gradient - its
  estimate) and adds it to the estimate; the optimizer sees the mean estimate, which every
  rank updates with the same synced values (``--ef21-momentum`` < 1: EF21-SGDM, the
  difference is taken to an EMA of the gradient);
* ``topk_union``: every rank's top-k indices, then the exact mean of all ranks' gradients
  at their union (a second exchange of values; bounds what the union can give).

Options for ablations: ``--ef-decay`` (residual x decay each step), ``--skip`` (matrices
left dense), ``--comp-lr-scale`` (learning rate of the compressed matrices), ``--ef-params``
(which matrices keep a residual), ``--ratio-for`` (per-matrix ratios), ``--select adam``
(rank entries by |g| / sqrt(v)), ``--clip`` (gradient-norm clip), and two ways to give every
rank the same indices: ``topk_leader`` (a rotating rank's top-k) and ``topk_shared_m`` (the
top of the shared AdamW first moment plus shared random entries, ``--explore``).
``--powersgd-for`` sends the matching matrices by PowerSGD instead (rank ``--rank``, EF,
warm start: what ``compress/powersgd.py`` computes, with its own random initial Q).

Matrices are chosen by the compression policy (``select_params``); everything else goes
through the shared AdamW with the mean gradient. Prints the loss every 25 steps and a JSON
line with the mean loss of the last 20 steps (docs/compression.md, "Error feedback and
AdamW").

    python scripts/ef_adam_sim.py adam_ef --steps 150 --world 4 --ratio 0.01
"""

import argparse
import json
import math
import time
from fnmatch import fnmatchcase

import torch
from torch import nn

from zentrain.compress import CompressConfig, select_params
from zentrain.config import Config
from zentrain.data import build_loader
from zentrain.models import build_model
from zentrain.train import build_optimizer, lr_at


def keep_topk(acc: torch.Tensor, k: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``acc`` with all but its k largest entries of ``|acc| * scale`` zeroed."""
    score = acc.abs() if scale is None else acc.abs() * scale
    idx = score.flatten().topk(k).indices
    sent = torch.zeros_like(acc).flatten()
    sent[idx] = acc.flatten()[idx]
    return sent.view_as(acc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("method", choices=["none", "topk_ef", "topk_noef", "topk_union", "adam_ef", "ef21",
                                       "topk_leader", "topk_shared_m"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ef21-momentum", type=float, default=1.0,
                    help="ef21: compress the difference to an EMA of the gradient with this "
                         "weight on the new gradient (1: the gradient itself)")
    ap.add_argument("--dense-first", action="store_true",
                    help="ef21: the first step is sent dense (initialises the estimates)")
    ap.add_argument("--comp-lr-scale", type=float, default=1.0,
                    help="learning rate of the compressed matrices x this")
    ap.add_argument("--skip", default="",
                    help="comma list of parameter names left uncompressed (mean gradient)")
    ap.add_argument("--ef-decay", type=float, default=1.0,
                    help="topk_ef: the residual is multiplied by this each step")
    ap.add_argument("--select", choices=["mag", "adam"], default="mag",
                    help="topk_ef/topk_noef: rank entries by magnitude, or by magnitude over "
                         "the root of the shared AdamW second moment (the size of the step "
                         "Adam would take; every rank holds the same moments)")
    ap.add_argument("--explore", type=float, default=0.5,
                    help="topk_shared_m: share of k drawn at random (same seed on every rank)")
    ap.add_argument("--clip", type=float, default=None,
                    help="gradient-norm clip (default: the trainer's; 0: none)")
    ap.add_argument("--ef-params", default="*",
                    help="topk_ef: compress.error_feedback_params, the name patterns of the "
                         "matrices that keep a residual (the others are sent without EF)")
    ap.add_argument("--ratio-for", default="",
                    help="comma list of NAME=RATIO overriding --ratio for those parameters")
    ap.add_argument("--powersgd-for", default="",
                    help="name patterns of matrices synced by PowerSGD (rank --rank, EF, warm "
                         "start) instead of the method's path")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--psgd-iters", type=int, default=1,
                    help="power iterations per step for --powersgd-for (each one more exchange)")
    ap.add_argument("--psgd-start", type=int, default=0,
                    help="--powersgd-for matrices are sent exactly (dense mean) before this step "
                         "(compress.warmup_steps)")
    ap.add_argument("--psgd-precond", action="store_true",
                    help="approximate g / (sqrt(v) + eps) (v: the shared AdamW second moment) "
                         "and scale back, so the rank-r error is small where AdamW's steps are "
                         "large")
    ap.add_argument("--gtopk", action="store_true",
                    help="topk_ef: keep only the k largest |sums| of the ranks' union (global "
                         "top-k); each rank's dropped entries go back to its residual")
    ap.add_argument("--gtopk-factor", type=float, default=1.0,
                    help="--gtopk keeps this many times k sums")
    ap.add_argument("--wire", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the values on the wire (top-k values and PowerSGD factors); "
                         "the rounding of what a rank sends stays in its residual")
    ap.add_argument("--embed", default="",
                    help="name patterns of embedding tables compressed like the matrices")
    a = ap.parse_args()
    method, steps, world, ratio = a.method, a.steps, a.world, a.ratio
    torch.set_num_threads(a.threads)
    cfg = Config()
    cfg.train.steps = steps
    cfg.data.num_workers = 0  # one process: no loader workers
    bundles = [build_loader(cfg, r, world, is_builder=(r == 0)) for r in range(world)]
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    opt = build_optimizer(cfg, model)
    skip = set(filter(None, a.skip.split(",")))
    ccfg = CompressConfig(method="topk", ratio=ratio)
    named = [(n, p) for n, p in select_params(model, ccfg) if n not in skip]
    named += [(n, p) for n, p in model.named_parameters()
              if any(fnmatchcase(n, x) for x in filter(None, a.embed.split(",")))]
    wire = getattr(torch, a.wire)
    comp = [p for _, p in named]
    cid = {id(p) for p in comp}
    ratio_for = {id(p): float(kv.split("=")[1]) for kv in filter(None, a.ratio_for.split(","))
                 for n, p in model.named_parameters() if n == kv.split("=")[0]}
    efp = [x.strip() for x in a.ef_params.split(",") if x.strip()]
    noef = {id(p) for n, p in named if not any(fnmatchcase(n, x) for x in efp)}
    pats = list(filter(None, a.powersgd_for.split(",")))
    psgd = {id(p) for n, p in named if any(fnmatchcase(n, x) for x in pats)}
    gq = torch.Generator().manual_seed(0)
    qs = {id(p): torch.randn(p.shape[1], a.rank, generator=gq) for p in comp if id(p) in psgd}
    if a.comp_lr_scale != 1.0:  # the compressed matrices (all decayed) in a group of their own
        g0 = opt.param_groups[0]
        g0["params"] = [p for p in g0["params"] if id(p) not in cid]
        opt.add_param_group({"params": comp, "weight_decay": g0["weight_decay"],
                             "lr_scale": a.comp_lr_scale})
    params = [p for p in model.parameters() if p.requires_grad]
    resid = [{id(p): torch.zeros_like(p) for p in comp} for _ in range(world)]
    if method == "adam_ef":
        # the shared AdamW skips the compressed matrices (their grads are None); each rank has
        # its own AdamW state for them
        local = [{id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p in comp} for _ in range(world)]
    b1, b2, eps, wd = cfg.train.beta1, cfg.train.beta2, 1e-8, cfg.train.weight_decay
    # ef21: each rank's estimate h_r of its gradient, the global estimate H = mean h_r that
    # the optimizer sees, and the rank's momentum (EF21-SGDM) when --ef21-momentum < 1
    est = [{id(p): torch.zeros_like(p) for p in comp} for _ in range(world)]
    mom = [{id(p): torch.zeros_like(p) for p in comp} for _ in range(world)]
    glob = {id(p): torch.zeros_like(p) for p in comp}
    losses = []
    t0 = time.time()
    for step in range(steps):
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        grads = []
        lsum = 0.0
        for r in range(world):
            torch.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + r)
            model.zero_grad(set_to_none=True)
            batch = bundles[r].train_batch(step, 0)
            _, loss = model(**batch)
            loss.backward()
            lsum += loss.item()
            grads.append({id(p): p.grad.detach().clone() for p in params if p.grad is not None})
        losses.append(lsum / world)
        mean = {k: sum(g[k] for g in grads) / world for k in grads[0]}
        delta = {}
        for p in comp:
            k = max(1, math.ceil(ratio_for.get(id(p), ratio) * p.numel()))
            if method == "none":
                continue
            if id(p) in psgd:  # PowerSGD (Vogels et al. 2019), as compress/powersgd.py does it
                if step < a.psgd_start:
                    continue
                ef = id(p) not in noef
                v = opt.state[p].get("exp_avg_sq") if a.psgd_precond else None
                sc = torch.ones_like(p) if v is None else 1 / (v.sqrt() + 1e-8)
                ms = [(grads[r][id(p)] + (resid[r][id(p)] if ef else 0)) * sc for r in range(world)]
                for _ in range(a.psgd_iters):
                    psum = sum((m @ qs[id(p)]).to(wire).float() for m in ms).to(wire).float()
                    pm = torch.linalg.qr(psum, mode="reduced").Q
                    qr_ = [(m.t() @ pm).to(wire).float() for m in ms]
                    qs[id(p)] = sum(qr_).to(wire).float() / world
                if ef:
                    for r in range(world):
                        resid[r][id(p)] = (ms[r] - pm @ qr_[r].t()) / sc
                mean[id(p)] = pm @ qs[id(p)].t() / sc
                continue
            if method in ("topk_ef", "topk_noef"):
                acc_sum = torch.zeros_like(p)
                v = opt.state[p].get("exp_avg_sq") if a.select == "adam" else None
                scale = None if v is None else 1 / (v.sqrt() + 1e-8)
                sents = []
                for r in range(world):
                    ef = method == "topk_ef" and id(p) not in noef
                    g = grads[r][id(p)] if id(p) in grads[r] else torch.zeros_like(p)
                    acc = g + (resid[r][id(p)] if ef else 0)
                    sent = keep_topk(acc, k, scale).to(wire).float()
                    if ef:
                        resid[r][id(p)] = (acc - sent) * a.ef_decay
                    acc_sum += sent
                    sents.append((sent, ef))
                if a.gtopk:  # the k largest sums survive; the rest return to the residuals
                    keep = keep_topk(acc_sum, min(p.numel(), round(k * a.gtopk_factor))) != 0
                    acc_sum = acc_sum * keep
                    for r, (sent, ef) in enumerate(sents):
                        if ef:
                            resid[r][id(p)] += sent * ~keep
                mean[id(p)] = acc_sum.to(wire).float() / world
            elif method == "topk_union":
                # every rank's top-k indices, then the exact mean of all ranks at their union
                union = torch.zeros(p.numel(), dtype=torch.bool)
                for r in range(world):
                    union[keep_topk(grads[r][id(p)], k).flatten() != 0] = True
                mean[id(p)] = mean[id(p)] * union.view_as(p)
            elif method in ("topk_leader", "topk_shared_m"):
                # one index set for every rank, so the values could be all-reduced (no union):
                # the rotating leader's top-k, or the top of the shared AdamW first moment plus
                # shared random entries (no index exchange at all)
                if method == "topk_leader":
                    mask = keep_topk(grads[step % world][id(p)], k).flatten() != 0
                else:
                    mask = torch.zeros(p.numel(), dtype=torch.bool)
                    m = opt.state[p].get("exp_avg")
                    n_top = 0 if m is None else int(k * (1 - a.explore))
                    if n_top:
                        mask[m.abs().flatten().topk(n_top).indices] = True
                    gen = torch.Generator().manual_seed(step * 7919 + len(delta))
                    rest = (~mask).nonzero().flatten()
                    mask[rest[torch.randperm(rest.numel(), generator=gen)[:k - n_top]]] = True
                mean[id(p)] = mean[id(p)] * mask.view_as(p)
            elif method == "ef21":
                c_sum = torch.zeros_like(p)
                for r in range(world):
                    g = grads[r][id(p)]
                    eta = a.ef21_momentum
                    v = mom[r][id(p)].mul_(1 - eta).add_(g, alpha=eta) if step else \
                        mom[r][id(p)].copy_(g)
                    diff = v - est[r][id(p)]
                    c = diff if (a.dense_first and step == 0) else keep_topk(diff, k)
                    est[r][id(p)] += c
                    c_sum += c
                glob[id(p)] += c_sum / world
                mean[id(p)] = glob[id(p)].clone()
            elif method == "adam_ef":
                acc_sum = torch.zeros_like(p)
                for r in range(world):
                    m, v = local[r][id(p)]
                    g = grads[r][id(p)]
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    mh = m / (1 - b1 ** (step + 1))
                    vh = v / (1 - b2 ** (step + 1))
                    acc = lr * mh / (vh.sqrt() + eps) + resid[r][id(p)]
                    sent = keep_topk(acc, k)
                    resid[r][id(p)] = acc - sent
                    acc_sum += sent
                delta[id(p)] = acc_sum / world
        for p in params:
            if method == "adam_ef" and id(p) in cid:
                p.grad = None
            else:
                p.grad = mean[id(p)]
        clip = cfg.train.grad_clip if a.clip is None else a.clip
        if clip:
            nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip)
        opt.step()
        with torch.no_grad():
            for p in comp:
                if id(p) in delta:
                    p.mul_(1 - lr * wd).sub_(delta[id(p)])
        if step % 25 == 0 or step == steps - 1:
            print(f"{method} step {step} loss {losses[-1]:.3f} {time.time() - t0:.0f}s",
                  flush=True)
    last = sum(losses[-20:]) / len(losses[-20:])
    print(json.dumps({"method": method, "ratio": ratio, "steps": steps, "ef_decay": a.ef_decay, "ef21_momentum": a.ef21_momentum,
                      "dense_first": a.dense_first, "skip": a.skip,
                      "comp_lr_scale": a.comp_lr_scale, "select": a.select, "explore": a.explore, "clip": a.clip, "ef_params": a.ef_params, "ratio_for": a.ratio_for, "powersgd_for": a.powersgd_for, "rank": a.rank,
                      "psgd_iters": a.psgd_iters, "psgd_start": a.psgd_start, "psgd_precond": a.psgd_precond,
                      "gtopk": a.gtopk, "gtopk_factor": a.gtopk_factor, "wire": a.wire, "embed": a.embed, "final_loss": last}))


if __name__ == "__main__":
    main()
