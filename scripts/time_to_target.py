"""Time to the target loss at other link rates, from two kinds of ``bench compress`` run.

Bandwidth changes how long a step takes, not what it computes: with the same steps, a
method's loss curve is the same at 100 Mbit/s as at 1 Gbit/s (same batches and seed). So
the steps each method needs to reach the target come from one long run (``--steps``, e.g.
500 steps at 1 Gbit/s), and the step times from short runs at each link rate
(``--times``, e.g. 30 steps at 100 Mbit/s; a step's work and bytes do not depend on the
run's length, only its learning rate does). Time to target = steps x step time, and the
speed-up over ``ddp`` = ddp's time / the method's, as ``bench compress`` computes it
within one run.

A method's steps are taken from the first ``--steps`` file where it reached the target;
a compressed method's ``--set`` overrides must be the same in that file and in each
``--times`` file, so the two runs are the same training. Prints a markdown table.

    python scripts/time_to_target.py \\
      --steps docs/bench/compress_gpt_w4_1gbit_500_gtopk.json docs/bench/compress_gpt_w4_1gbit_500.json \\
      --times docs/bench/compress_gpt_w4_1gbit_30_gtopk.json docs/bench/compress_gpt_w4_100mbit_30_gtopk.json
"""

import argparse
import json
import sys
from pathlib import Path

UNCOMPRESSED = ("none", "ddp")


def _load(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"time_to_target: cannot read {path}: {e}")


def steps_to_target(files: list[str]) -> dict[str, tuple[int, list, str]]:
    """Per method: (steps to target, the run's overrides, the file), first file wins."""
    out: dict[str, tuple[int, list, str]] = {}
    for f in files:
        d = _load(f)
        for m, s in d["methods"].items():
            if m not in out and s.get("steps_to_target") is not None:
                out[m] = (s["steps_to_target"], d["config"].get("overrides") or [], f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", nargs="+", required=True, help="long runs (steps to target)")
    ap.add_argument("--times", nargs="+", required=True, help="short runs (step times)")
    a = ap.parse_args()
    steps = steps_to_target(a.steps)
    if "ddp" not in steps:
        sys.exit("time_to_target: no --steps file has ddp reaching the target")
    print("| link rate | method | step | steps to target | time to target | × ddp |")
    print("|---|---|---:|---:|---:|---:|")
    for f in a.times:
        d = _load(f)
        rows = {}
        for m, s in d["methods"].items():
            if m not in steps or s.get("step_time_s") is None:
                continue
            n, overrides, src = steps[m]
            if m not in UNCOMPRESSED and overrides != (d["config"].get("overrides") or []):
                sys.exit(f"time_to_target: {m} in {f} ran with other --set options than in "
                         f"{src}: {d['config'].get('overrides')} vs {overrides}")
            rows[m] = (s["step_time_s"], n, n * s["step_time_s"])
        if "ddp" not in rows:
            sys.exit(f"time_to_target: {f} has no ddp step time")
        for m, (t, n, total) in rows.items():
            print(f"| {d['bandwidth']} | {m} | {1000 * t:.0f} ms | {n} | {total:.0f} s | "
                  f"{rows['ddp'][2] / total:.2f} |")


if __name__ == "__main__":
    main()
