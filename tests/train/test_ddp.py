"""Data parallelism: ``torchrun`` with 2 processes (gloo, CPU) against one process.

One launch of ``tests/train/ddpkit.py`` under ``torch.distributed.run`` trains every optimizer
of the registry for a few steps, an uneven and augmented run, a run stopped and resumed, a run
under a time budget, the command line's train, computes landscape quantities and steps every
optimizer on an FSDP2-sharded model; this process
runs the same jobs alone (the same configuration: ``data.batch_size`` is the global batch) and
compares. Float64 models: the two differ by the order of floating-point sums only (measured
≲1e-10 on the parameters; the tolerance is the issue's 1e-5).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddpkit import jobs, run_job
from trainkit import records

from valleys import distributed
from valleys import optim as optim_registry
from valleys.train import checkpoint as ckpt
from valleys.train import config as C
from valleys.train import train

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

TOL = 1e-5
KIT = Path(__file__).with_name("ddpkit.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=2 ARGS`` on one OpenMP thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """The launch: every job under 2 processes; returns the folder of runs (``runs/``) and
    per-rank results (``out/``)."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "out").mkdir()
    spec = {"out": str(root / "out"), "jobs": jobs(root / "runs")}
    (root / "spec.json").write_text(json.dumps(spec))
    done = torchrun(str(KIT), str(root / "spec.json"), cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    return root


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, dict]:
    """The same jobs in this process, by name (the resumed pair and the time budget aside)."""
    root = tmp_path_factory.mktemp("single")
    skip = ("part", "rest", "timed", "fsdp", "taken")
    return {j["name"]: run_job(j) for j in jobs(root / "runs") if j["name"] not in skip}


def ranks(ddp: Path, name: str) -> list[dict]:
    return [torch.load(ddp / "out" / f"{name}.rank{r}.pt") for r in range(2)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).detach().abs().max()) for k in a)


@pytest.mark.parametrize("name", optim_registry.names())
def test_every_optimizer_matches_one_process(ddp, single, name):
    rank0, rank1 = ranks(ddp, name)
    for k in rank0["params"]:  # the ranks hold the same weights, bit for bit
        assert torch.equal(rank0["params"][k], rank1["params"][k]), k
    assert max_diff(rank0["params"], single[name]["params"]) < TOL
    assert rank0["step"] == single[name]["step"]
    ours, theirs = rank0["final_eval"], single[name]["final_eval"]
    assert ours["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-6)
    assert ours["test_accuracy"] == theirs["test_accuracy"]


@pytest.mark.parametrize("name", ["fp16_sam", "fp16_sgn"])
def test_loss_scaling_matches_one_process(ddp, single, name):
    """run.amp=fp16 (loss scaling; the float64 model itself stays out of autocast on the
    CPU): gradients and products averaged before unscaling, one skip decision for all."""
    rank0, rank1 = ranks(ddp, name)
    assert max_diff(rank0["params"], rank1["params"]) == 0
    assert max_diff(rank0["params"], single[name]["params"]) < TOL


def test_uneven_last_batch_and_augmentation_match_one_process(ddp, single):
    """Batches of 200 over 1437 samples without drop_last: the 8th batch (37 samples) splits
    19/18 and is weighted by each rank's share; augmentation draws those of the whole batch."""
    rank0, rank1 = ranks(ddp, "uneven")
    assert max_diff(rank0["params"], rank1["params"]) == 0
    assert max_diff(rank0["params"], single["uneven"]["params"]) < TOL


def test_only_rank_0_writes(ddp, tmp_path):
    runs = ddp / "runs"
    for name in optim_registry.names():
        assert sorted(p.name for p in (runs / name).iterdir()) == [
            "checkpoint.pt",
            "config.yaml",
            "env.json",
            "metrics.jsonl",
        ]
        assert [r["kind"] for r in records(runs / name)] == [
            "eval",
            "train",
            "eval",
            "train",
            "eval",
            "end",
        ]
    assert len(list((runs / "uneven" / "tb").iterdir())) == 1  # one TensorBoard writer
    env = json.loads((runs / "sgd" / "env.json").read_text())
    assert [s["world_size"] for s in env["segments"]] == [2]
    # nothing anywhere else: the launch's folder holds the runs, the results and the spec
    assert sorted(p.name for p in ddp.iterdir()) == ["out", "runs", "spec.json"]


def test_command_line_train_prints_on_rank_0_only(ddp, single):
    def rows(text: str) -> list[str]:  # the table less the run's folder and its clock
        return [r for r in text.splitlines() if not r.strip().startswith(("run dir", "train t"))]

    rank0, rank1 = ranks(ddp, "cli")
    assert rank0["code"] == rank1["code"] == 0
    assert rows(rank0["stdout"])[0] == "valleys train: max_steps reached"
    assert rows(rank0["stdout"]) == rows(single["cli"]["stdout"])
    assert rank1["stdout"] == rank1["stderr"] == ""


def test_command_line_landscape_shares_batches_and_rank_0_writes(ddp, single):
    """`torchrun -m valleys hessian|sharpness RUN`: each rank evaluates its share of the 8
    batches; rank 0 prints and appends one record per command (plots only where asked); the
    values are the single process's (float32 sums in another order)."""
    from valleys.bench.analyze import read_records

    rank0, rank1 = ranks(ddp, "cli_landscape")
    for out in (*rank0["outputs"], *rank1["outputs"]):
        assert out["code"] == 0, out["stderr"]
    assert all(o["stdout"] == o["stderr"] == "" for o in rank1["outputs"])
    assert rank0["outputs"][0]["stdout"].startswith("valleys hessian: ")
    assert rank0["outputs"][1]["stdout"].startswith("valleys sharpness: ")
    run = ddp / "runs" / "cli"
    records = read_records(run)
    assert records == rank0["records"]
    assert [r["kind"] for r in records] == ["hessian", "sharpness"]
    assert len(list((run / "plots").glob("landscape-*"))) > 0  # the Hessian's, by rank 0
    alone = single["cli_landscape"]["records"]
    assert [r["kind"] for r in alone] == ["hessian", "sharpness"]
    top, top1 = records[0]["result"]["top"], alone[0]["result"]["top"]
    assert top["eigenvalues"][0] == pytest.approx(top1["eigenvalues"][0], rel=1e-4)
    trace, trace1 = records[0]["result"]["trace"], alone[0]["result"]["trace"]
    assert trace["estimate"] == pytest.approx(trace1["estimate"], rel=1e-4)
    sharp, sharp1 = records[1]["result"]["sharpness"], alone[1]["result"]["sharpness"]
    assert sharp == pytest.approx(sharp1, rel=1e-3, abs=1e-6)
    assert records[0]["data"]["samples"] == alone[0]["data"]["samples"] == 400


def test_resume_under_ddp_equals_the_uninterrupted_run(ddp):
    """Stopped at step 3 by its step budget and resumed to 6 (both under 2 processes): the
    weights of the uninterrupted run and the same records."""
    full, rest = ranks(ddp, "entropy_sgd")[0], ranks(ddp, "rest")[0]
    assert max_diff(full["params"], rest["params"]) == 0
    drop = ("train_time_s", "wall_time_s", "eval_time_s", "samples_per_s")

    def plain(run: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in drop} for r in records(ddp / "runs" / run)]

    assert plain("resume") == plain("entropy_sgd")
    env = json.loads((ddp / "runs" / "resume" / "env.json").read_text())
    assert [s["start_step"] for s in env["segments"]] == [0, 3]


def test_resume_in_one_process_from_a_two_process_checkpoint(ddp, tmp_path):
    """The stream's state does not depend on the number of processes: a checkpoint written
    under 2 resumes in 1 and ends where the 2-process run ended."""
    from ddpkit import digits, model_for, optimizer_overrides

    run_dir = tmp_path / "resumed"
    shutil.copytree(ddp / "runs" / "resume_at3", run_dir)
    assert ckpt.load(run_dir / "checkpoint.pt")["step"] == 3
    ds = digits()
    model = model_for(ds)
    overrides = [*optimizer_overrides("entropy_sgd"), "run.resume=true", f"run.dir={run_dir}"]
    train(C.load([], overrides), dataset=ds, model=model)
    full = ranks(ddp, "entropy_sgd")[0]["params"]
    assert max_diff(full, dict(model.named_parameters())) < TOL


def test_an_error_found_by_rank_0_is_raised_on_every_rank(ddp):
    """Rank 0 alone checks the run directory (here: it holds a run); the others get its
    error rather than waiting for it."""
    rank0, rank1 = ranks(ddp, "taken")
    assert rank0["error"] == rank1["error"]
    assert rank0["error"].startswith("Run directory ") and "already holds a run" in rank0["error"]


def test_time_budget_stops_every_rank_at_the_same_step(ddp):
    rank0, rank1 = ranks(ddp, "timed")
    assert rank0["step"] == rank1["step"] > 0
    assert torch.equal(rank0["params"]["1.weight"], rank1["params"]["1.weight"])


def test_landscape_reduces_over_ranks(ddp, single):
    """Full loss and accuracy, gradient, a Hessian-vector product, the top eigenvalue and
    Keskar sharpness over 8 batches shared out to 2 ranks: the single-process values."""
    rank0, rank1 = ranks(ddp, "landscape")
    alone = single["landscape"]
    assert rank0["count"] == alone["count"] == 360
    for key in ("loss", "accuracy", "grad_loss", "top", "sharpness", "loss_one_batch"):
        assert torch.equal(rank0[key], rank1[key]), key
        assert float(rank0[key]) == pytest.approx(float(alone[key]), rel=1e-9, abs=1e-12), key
    for key in ("grad", "hv", "hv_one_batch"):
        for a, b in zip(rank0[key], alone[key], strict=True):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), key


def test_fsdp_sharded_models(ddp):
    """FSDP2 (``fully_shard``): every first-order optimizer of the registry follows the
    replicated run; SGN and the landscape diagnostics refuse a sharded model in one line."""
    rank0, rank1 = ranks(ddp, "fsdp")
    assert rank0.keys() == rank1.keys() == {*optim_registry.names(), "landscape"}
    for name in optim_registry.names():
        if optim_registry.spec(name).takes_model:
            assert rank0[name].startswith("Invalid model: 'FSDPSequential' (SGN cannot run on")
        else:
            assert rank0[name] < TOL, name
    assert "a sharded (FSDP) model" in rank0["landscape"]


def test_bad_input_under_torchrun_is_one_line_from_rank_0(tmp_path):
    """A global batch that 2 processes cannot split: one line from valleys (the launcher then
    reports the failed worker in its own words), a non-zero exit, nothing written."""
    done = torchrun(
        "-m",
        "valleys",
        "train",
        "data.batch_size=33",
        "run.max_steps=1",
        f"run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("valleys train:")]
    assert ours == [
        "valleys train: error: Invalid data.batch_size: 33 (it is the global batch, split "
        "evenly over the 2 processes of this launch: use a multiple of 2, e.g. 32 or 34)"
    ]
    assert "valleys/" not in done.stderr.split("ChildFailedError")[0].replace("valleys FAILED", "")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# valleys.distributed without a process group


def test_without_a_group_everything_is_local():
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    t = [torch.arange(3.0), torch.ones(2, dtype=torch.float64)]
    assert distributed.all_reduce_mean(t)[0] is t[0]
    assert distributed.all_reduce_sum(t)[1] is t[1]
    assert distributed.all_reduce_sum_(t[0]) is t[0]
    summed, n = distributed.all_reduce_sum_count(t, 5)
    assert summed[0] is t[0] and n == 5
    assert distributed.mean_reducer() is None
    assert distributed.broadcast_scalar(2.5) == 2.5
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.from_main(lambda: 7) == 7
    assert distributed.main_first(lambda: 8) == 8
    distributed.barrier()
    assert not distributed.is_sharded(torch.nn.Linear(2, 2))
    assert distributed.init("cpu") == torch.device("cpu")  # no launcher: nothing to join


def test_shard_rows_split_like_tensor_split():
    for n in (0, 1, 5, 37, 64):
        for world in (1, 2, 3, 4):
            parts = [distributed.shard_rows(n, r, world) for r in range(world)]
            expected = torch.tensor_split(torch.arange(n), world)
            assert [list(range(n))[p] for p in parts] == [e.tolist() for e in expected]


def test_environment_is_read_and_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched()
    assert (distributed.env_world_size(), distributed.env_rank(), distributed.local_rank()) == (
        4,
        3,
        1,
    )
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="Missing environment variable MASTER_ADDR"):
        distributed.init("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="Invalid environment variable WORLD_SIZE: 'two'"):
        distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"Invalid run\.device: 'cuda:1' \(names one GPU"):
        distributed.init("cuda:1")
    with pytest.raises(ValueError, match=r"Invalid run\.device: 'mps'"):
        distributed.init("mps")


def test_single_process_masks_a_group():
    with distributed.single_process():
        assert distributed.world_size() == 1 and not distributed.is_initialized()


def test_batch_stream_shards_are_the_single_process_batch():
    """Two ranks' parts of each batch, put together, are the batch of one process (augmented
    with the same draws), epoch after epoch, including an uneven last batch."""
    from valleys.data.loader import Augment, BatchStream

    x = torch.arange(23 * 4, dtype=torch.float64).reshape(23, 1, 2, 2)
    y = torch.arange(23)
    kw = {"seed": 3, "drop_last": False}

    def stream(shard):
        return BatchStream(x, y, 6, augment=Augment(pad=1, seed=5), shard=shard, **kw)

    one, parts = stream(None), [stream((r, 2)) for r in range(2)]
    for _ in range(12):
        xb, yb = one.next()
        got = [s.next() for s in parts]
        assert torch.equal(torch.cat([g[0] for g in got]), xb)
        assert torch.equal(torch.cat([g[1] for g in got]), yb)
        sizes = [g[1].shape[0] for g in got]
        assert [s.weight for s in parts] == [2 * k / sum(sizes) for k in sizes]
    assert parts[0].state_dict()["generator"].equal(one.state_dict()["generator"])
    with pytest.raises(ValueError, match=r"Invalid batch_size: 7 .*multiple of 2"):
        BatchStream(x, y, 7, shard=(0, 2))
    with pytest.raises(ValueError, match="Invalid shard"):
        BatchStream(x, y, 6, shard=(2, 2))


def test_batches_that_ranks_cannot_share_are_refused():
    from valleys.train.parallel import check_batches

    cfg = C.load([], ["data.batch_size=64", "data.drop_last=false"])
    check_batches(cfg, 1437, 1)
    check_batches(cfg, 1437, 2)  # last batch of 29 samples: 15 and 14
    with pytest.raises(ValueError, match=r"Invalid data\.batch_size: 64 .* multiple of 3"):
        check_batches(cfg, 1437, 3)
    with pytest.raises(ValueError, match=r"Invalid data\.drop_last: false .* batch of 1 of"):
        check_batches(cfg, 1409, 2)  # 1409 = 22·64 + 1
