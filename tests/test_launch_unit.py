"""Launcher and trainer pieces that need no training run: restarts on fatal exit codes,
device layout checks, sparse gradients under fused AdamW, the summary's metrics read-back."""

import json
import os

import pytest
import torch
from torch import nn

from zentrain import launch
from zentrain.config import ConfigError, load_config
from zentrain.data.corpus import DataError
from zentrain.metrics import build_summary, read_step_rows
from zentrain.train import (
    NonFiniteLoss,
    _says_it,
    maybe_densify_grads,
)

# A worker that counts its starts in a file, then exits with the code it is given.
COUNTING_WORKER = "import sys; open(sys.argv[1], 'a').write('x'); sys.exit(int(sys.argv[2]))"


@pytest.mark.parametrize("code,starts", [(3, 1), (2, 1), (1, 3)])
def test_fatal_exit_codes_are_not_restarted(tmp_path, code, starts):
    """Codes 2 and 3 stop the job at once; any other failure still gets its restarts."""
    counter = tmp_path / "starts"
    saved = dict(os.environ)
    try:
        rc = launch.launch_local([], 1, tmp_path, max_restarts=2,
                                 worker_args=["-c", COUNTING_WORKER, str(counter), str(code)])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert rc == code
    assert len(counter.read_text()) == starts


def test_fatal_error_is_recorded_for_restarted_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    launch.record_fatal(tmp_path, 3, "non-finite loss")
    assert launch.fatal_before(tmp_path) is None  # a first start never stops on it
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert launch.fatal_before(tmp_path) == 3
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # another job in the same run dir
    assert launch.fatal_before(tmp_path) is None


def test_each_error_is_said_once_per_job():
    nan, cfg_err, data_err = NonFiniteLoss("x"), ConfigError("x"), DataError("x")
    rank1 = {"RANK": "1", "LOCAL_RANK": "1"}
    node1 = {"RANK": "2", "LOCAL_RANK": "0"}
    assert _says_it(nan, {"RANK": "0"}) and not _says_it(nan, node1)
    assert _says_it(cfg_err, node1) and not _says_it(cfg_err, rank1)
    assert _says_it(data_err, rank1)


def test_cpu_layout_and_oversubscription_warning(capsys):
    cfg = load_config(None, ["train.device=cpu", "sync.scheme=ddp", "model.sparse_embedding=true"])
    assert launch.check_device_layout(cfg, 8, 8) == ("cpu", "gloo")
    with pytest.raises(ConfigError, match="parallel.backend = 'nccl' needs CUDA"):
        launch.check_device_layout(load_config(None, ["train.device=cpu",
                                                      "parallel.backend=nccl"]), 2, 2)
    assert launch.maybe_warn_oversubscribed(3, "cpu", cores=2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 ranks on 2 CPU core(s)" in err
    assert not launch.maybe_warn_oversubscribed(2, "cpu", cores=2)
    assert not launch.maybe_warn_oversubscribed(3, "cuda", cores=2)
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nccl_layouts_that_cannot_run_are_config_errors():
    gpus = torch.cuda.device_count()
    cfg = load_config(None, ["train.device=cuda"])
    with pytest.raises(ConfigError, match=f"--nproc {gpus + 1} but {gpus} GPU"):
        launch.check_device_layout(cfg, gpus + 1, gpus + 1)
    cfg = load_config(None, ["train.device=cuda", "sync.scheme=ddp",
                             "model.sparse_embedding=true"])
    with pytest.raises(ConfigError, match="NCCL has no sparse all-reduce"):
        launch.check_device_layout(cfg, 1, 2)


def test_deterministic_mode_sets_the_cublas_workspace():
    env: dict[str, str] = {}
    launch.maybe_set_cublas_workspace(load_config(None, []), env)
    assert env == {}
    det = load_config(None, ["train.deterministic=true"])
    launch.maybe_set_cublas_workspace(det, env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}  # the user's own choice stays
    launch.maybe_set_cublas_workspace(det, env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}


def test_sparse_gradients_step_like_dense_ones_under_fused_adamw():
    torch.manual_seed(0)
    ids = torch.tensor([[1, 3, 3, 7]])
    models = [nn.Embedding(10, 4, sparse=s) for s in (True, False)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        m(ids).pow(2).sum().backward()
    assert models[0].weight.grad.is_sparse
    for m in models:
        maybe_densify_grads(m)
        torch.optim.AdamW(m.parameters(), lr=0.1, fused=True).step()
    assert not models[0].weight.grad.is_sparse
    assert torch.equal(models[0].weight, models[1].weight)


def test_summary_reads_back_the_steps_before_a_restart(tmp_path):
    lines = [{"step": 1, "loss": 5.0, "step_time_s": 9.0},
             {"step": 2, "loss": 4.0, "step_time_s": 1.0},
             {"step": 2, "eval/eval_loss": 4.5},
             {"step": 3, "loss": 3.5, "step_time_s": 2.0},  # lost: re-run after the restart
             {"step": 3, "loss": 3.0, "step_time_s": 3.0},
             {"step": 4, "loss": 2.0, "step_time_s": 4.0}]
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"step": 5, "lo'  # cut by a crash
    (tmp_path / "metrics.jsonl").write_text(text)
    rows = read_step_rows(tmp_path, 3)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 5.0), (2, 4.0), (3, 3.0)]
    s = build_summary(rows + [{"step": 4, "loss": 1.5, "step_time_s": 5.0}], {}, 1.0,
                      unit="tokens")
    assert s["steps_measured"] == 2 and s["step_time_s"] == 4.0  # steps 3 and 4
    assert s["final_train_loss"] == 1.5
    assert read_step_rows(tmp_path / "nothing", 3) == []

