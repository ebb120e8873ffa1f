"""Compressor state (residuals, PowerSGD matrices, the compressor's step) is part of the
persistent checkpoint: a compressed run resumed with --resume takes the same next steps as
an uninterrupted one; at another world size it is dropped with one line saying why."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from zentrain.ckpt import persistent

# The tiny GPT of test_recovery.py: a run costs mostly its start-up.
TINY = ["--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
        "--set", "model.seq_len=32", "--set", "model.vocab_size=300",
        "--set", "data.max_bytes=300000", "--set", "train.batch_size=4",
        "--set", "train.eval_batches=1", "--set", "train.eval_every=0"]


def test_rank_state_round_trip_and_world_size_refusal(tmp_path):
    state = {"bytes_sent": 12, "world_size": 2, "rank": 1,
             "compressor": {"method": "topk", "step": 7,
                            "residuals": {"h.0.mlp.w": torch.randn(4, 3)}},
             "inner": {"reducers": [{"seeds": [1, 2]}]}, "pair": (1.5, True)}
    persistent.save_rank_state(tmp_path, 1, 2, state)
    persistent.save_rank_state(tmp_path, 0, 2, {"bytes_sent": 3})
    got = persistent.load_rank_state(tmp_path, 1, 2)
    assert got["compressor"]["step"] == 7 and got["pair"] == (1.5, True)
    assert torch.equal(got["compressor"]["residuals"]["h.0.mlp.w"],
                       state["compressor"]["residuals"]["h.0.mlp.w"])
    assert got["inner"] == {"reducers": [{"seeds": [1, 2]}]}
    for rank, world in [(0, 1), (1, 4), (3, 4)]:  # rank 3's file does not exist
        with pytest.raises(ValueError, match=f"saved by 2 ranks, this run has {world}"):
            persistent.load_rank_state(tmp_path, rank, world)
    assert persistent.load_rank_state(tmp_path / "nothing", 0, 2) is None


def test_rank_state_file_is_loaded_without_unpickling_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    buf = io.BytesIO()
    torch.save({"rank": 0, "world_size": 1, "state": {"x": Evil()}}, buf)
    (tmp_path / "rank0.pt").write_bytes(buf.getvalue())
    with pytest.raises(persistent.UnsafeCheckpoint, match="per-rank state .* not plain data"):
        persistent.load_rank_state(tmp_path, 0, 1)
    assert not (tmp_path / "pwned").exists()


# top-k 10% with error feedback on the tiny GPT's matrices, its first step dense (warmup):
# losing the residuals or the compressor's step after a resume changes the next steps.
COMPRESS = ["--set", "sync.compress=topk", "--set", "compress.ratio=0.1",
            "--set", "compress.min_numel=1024", "--set", "compress.warmup_steps=1",
            "--set", "compress.error_feedback=true",
            "--set", "train.warmup_steps=0", "--set", "train.min_lr_ratio=1.0",
            "--set", "train.deterministic=true", "--set", "metrics.progress=false"]


def _run(tmp_path, cache, run_dir, *args):
    r = subprocess.run([sys.executable, "-m", "zentrain.cli", "run", *TINY, *COMPRESS,
                        "--set", f"data.cache_dir={cache}", "--run-dir", run_dir, *args],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, CI="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _losses(path):
    return [(x["step"], x["loss"]) for x in map(json.loads, path.read_text().splitlines())
            if "loss" in x]


@pytest.mark.slow
def test_compressed_resume_continues_bit_identical(tmp_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    _run(tmp_path, cache, "full", "--set", "train.steps=6")
    _run(tmp_path, cache, "part", "--set", "train.steps=3")
    assert sorted(p.name for p in (tmp_path / "part/checkpoints/step_000003").glob("rank*")) \
        == ["rank0.pt", "rank1.pt"]
    _run(tmp_path, cache, "part", "--set", "train.steps=6", "--resume")
    full, part = _losses(tmp_path / "full/metrics.jsonl"), _losses(tmp_path / "part/metrics.jsonl")
    assert [s for s, _ in part] == [1, 2, 3, 4, 5, 6]
    assert part == full  # steps 4-6 need the residuals and the compressor's step
    digest = [json.loads((tmp_path / d / "summary.json").read_text())["param_digest"]
              for d in ("full", "part")]
    assert digest[0] == digest[1]
    rec = [json.loads(x) for x in (tmp_path / "part/recovery.jsonl").read_text().splitlines()]
    assert [r["sync_state"] for r in rec if r["step"] == 3] == ["loaded", "loaded"]

    # At another world size model, optimizer and data reshard; the compressor state cannot.
    r = _run(tmp_path, cache, "part", "--set", "train.steps=7", "--resume", "--nproc", "1")
    lines = [x for x in r.stderr.splitlines() if "compressor state not restored" in x]
    assert len(lines) == 1 and "saved by 2 ranks, this run has 1" in lines[0], r.stderr
    rec = [json.loads(x) for x in (tmp_path / "part/recovery.jsonl").read_text().splitlines()]
    assert rec[-1]["step"] == 6 and rec[-1]["sync_state"] == "dropped"
