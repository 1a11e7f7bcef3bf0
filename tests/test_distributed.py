"""torchrun: each process's device, the process group's timeout, and `train-hyper` under DDP
equal to one process, with one gradient all-reduce per step and evaluation shared by ranks.

The DDP tests launch this file under torchrun (see `_probe` at the bottom): it runs `ht
train-hyper` with DDP's all-reduces counted and the concepts each rank evaluates recorded.
"""

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import build_tiny_dataset
from typer.testing import CliRunner

from htcli.cli import app
from htcli.core.runtime import close_distributed, distributed_timeout, init_distributed, process_group, resolve_device
from htcli.data.dataset import ActivationDataset
from htcli.errors import HTError
from htcli.methods.hypernetwork import load_checkpoint

runner = CliRunner()

# --- devices and the process group: CUDA is faked, no GPU needed -------------------------


@pytest.fixture
def second_of_two_gpus(monkeypatch):
    """This process is torchrun's second of two, on a machine with two GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")


@pytest.fixture
def captured_init(monkeypatch):
    """The arguments `init_process_group` and `torch.cuda.set_device` are called with."""
    calls = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.update(backend=backend, **kwargs))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(current_device=device))
    return calls


def test_each_torchrun_process_takes_its_own_gpu(second_of_two_gpus):
    assert resolve_device("cuda") == resolve_device(None) == torch.device("cuda", 1)
    with pytest.raises(HTError, match="would put them all on one GPU"):
        resolve_device("cuda:0")


def test_more_processes_than_gpus_are_refused(second_of_two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(HTError, match="LOCAL_RANK 2 has no GPU of its own"):
        resolve_device("cuda")


def test_one_process_keeps_the_gpu_it_is_given(second_of_two_gpus, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)


def test_nccl_is_bound_to_this_gpu_with_the_configured_timeout(second_of_two_gpus, captured_init, monkeypatch):
    monkeypatch.setenv("HT_DIST_TIMEOUT", "45")
    assert init_distributed(resolve_device("cuda"))
    gpu = torch.device("cuda", 1)
    assert captured_init == {"backend": "nccl", "timeout": timedelta(minutes=45), "device_id": gpu, "current_device": gpu}


def test_cpu_uses_gloo_with_the_default_timeout(captured_init, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("HT_DIST_TIMEOUT", raising=False)
    assert init_distributed(resolve_device("cpu"))
    assert captured_init == {"backend": "gloo", "timeout": timedelta(minutes=30)}


def test_one_process_joins_no_group(captured_init, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not init_distributed(resolve_device("cpu")) and captured_init == {}


def test_process_group_closes_what_it_joined_together_and_only_on_success(monkeypatch):
    calls, joined = [], {"now": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: joined["now"])
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: (calls.append("init"), joined.update(now=True)))
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (calls.append("destroy"), joined.update(now=False)))
    cpu = resolve_device("cpu")
    with process_group(cpu) as distributed:
        assert distributed
    assert calls == ["init", "barrier", "destroy"]  # every rank waits for the others before the teardown
    calls.clear()
    with pytest.raises(RuntimeError), process_group(cpu):
        raise RuntimeError("this rank failed")
    assert calls == ["init"] and joined["now"]  # other ranks may wait in a collective: no barrier, no teardown
    calls.clear()
    with process_group(cpu) as distributed:  # a group its caller joined
        assert distributed
    assert calls == [] and joined["now"]


@pytest.mark.parametrize("value", ["0", "-5", "ten", "inf", "nan"])
def test_a_bad_timeout_is_refused(monkeypatch, value):
    monkeypatch.setenv("HT_DIST_TIMEOUT", value)
    with pytest.raises(HTError, match="HT_DIST_TIMEOUT must be a positive number of minutes"):
        distributed_timeout()


# --- train-hyper under torchrun equals one process ---------------------------------------

# 4 concepts a step over 2 ranks. --l1: the sparsity penalty's own forward pass must not add
# an all-reduce either.
TRAIN = ["--steps", "8", "--concepts-per-step", "4", "--eval-every", "4", "--hidden", "32", "--rank", "4",
         "--val-fraction", "0.2", "--lr", "1e-2", "--l1", "1e-4", "--device", "cpu"]
# Each rank's 2 concepts x 8 samples a step: in 4 micro-batches, or in one pass.
VARIANTS = {"micro-batch-4": ["--micro-batch", "4"], "one-pass": ["--micro-batch", "0"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> ActivationDataset:
    """5 training concepts (1 kept for validation) and 2 held-out test concepts."""
    return build_tiny_dataset(tmp_path_factory.mktemp("distributed") / "data", train=5, test=2)


def _train_args(data_root: Path | str, variant: str, out: Path) -> list[str]:
    return ["train-hyper", "--data", str(data_root), *TRAIN, *VARIANTS[variant], "--out", str(out)]


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    """Every variant trained by one process, into <variant>/hyper."""
    root = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank runs (`ddp`): other thread counts round sums differently
    try:
        for variant in VARIANTS:
            result = runner.invoke(app, _train_args(data.root, variant, root / variant / "hyper"))
            assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def ddp(data, tmp_path_factory) -> Path:
    """Every variant trained by 2 gloo processes under one torchrun launch (see `_probe`)."""
    root = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(data.root), str(root)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)  # a hang fails, not blocks
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


def _records(ddp: Path, variant: str) -> list[dict]:
    return [json.loads((ddp / variant / f"rank{rank}.json").read_text()) for rank in range(2)]


def _history(root: Path, variant: str) -> list[dict]:
    return json.loads((root / variant / "hyper" / "history.json").read_text())


@pytest.mark.slow
def test_two_processes_match_one_process(single, ddp, variant):
    one, two = _history(single, variant), _history(ddp, variant)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [4, 8]
    for a, b in zip(one, two):
        for key in ("loss", "val_residual", "test_residual"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), key
    ours = load_checkpoint(ddp / variant / "hyper" / "hyper.safetensors").network.state_dict()
    theirs = load_checkpoint(single / variant / "hyper" / "hyper.safetensors").network.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.slow
def test_one_gradient_all_reduce_per_step(ddp, variant):
    for record in _records(ddp, variant):
        assert len(record["buckets_per_step"]) == 8
        for step, buckets in enumerate(record["buckets_per_step"], 1):
            # One all-reduce of each DDP bucket a step; one per micro-batch would repeat them.
            assert sorted(buckets) == list(range(len(set(buckets)))), (
                f"step {step}: {len(buckets)} bucket all-reduces for {len(set(buckets))} buckets")


@pytest.mark.slow
def test_each_rank_evaluates_its_share_and_all_ranks_get_every_mean(ddp, variant):
    records = _records(ddp, variant)
    names = records[0]["train_probe"] + records[0]["val"] + records[0]["test"]
    assert len(records[0]["train_probe"]) == 4 and len(records[0]["val"]) == 1 and len(records[0]["test"]) == 2
    for rank, record in enumerate(records):
        assert record["evaluated"] == names[rank::2] * 2  # two evaluation rounds: steps 4 and 8
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]  # noqa: E731
    assert strip(records[0]["history"]) == strip(records[1]["history"]) == strip(_history(ddp, variant))


def _probe(data_root: str, root: Path) -> None:
    """Under torchrun: `ht train-hyper` in every variant (one launch: the imports dominate),
    into root/<variant>/hyper, recording in root/<variant>/rank<r>.json the DDP buckets each
    step all-reduces, the concepts this rank evaluates and its trainer's history."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from htcli.methods.training import Trainer

    buckets_per_step: list[list[int]] = []
    evaluated: list[str] = []
    trainers: list[Trainer] = []
    init, train_step, concept_residual = Trainer.__init__, Trainer.train_step, Trainer.concept_residual

    def counting_allreduce(process_group, bucket):
        buckets_per_step[-1].append(bucket.index())
        return allreduce_hook(process_group, bucket)  # DDP's default: the mean over ranks

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.ddp.register_comm_hook(None, counting_allreduce)
        trainers.append(self)

    def counted_step(self):
        buckets_per_step.append([])
        return train_step(self)

    def recorded_residual(self, name):
        evaluated.append(name)
        return concept_residual(self, name)

    Trainer.__init__, Trainer.train_step, Trainer.concept_residual = recording_init, counted_step, recorded_residual
    # One process group for every run, joined here, so that each run leaves it joined (gloo hangs
    # re-joining a destroyed one under one torchrun), and closed as train-hyper closes its own.
    init_distributed(resolve_device("cpu"))
    for variant in VARIANTS:
        buckets_per_step.clear(), evaluated.clear(), trainers.clear()
        app(_train_args(data_root, variant, root / variant / "hyper"), standalone_mode=False)
        (trainer,) = trainers
        record = {"buckets_per_step": buckets_per_step, "evaluated": evaluated, "history": trainer.history,
                  "train_probe": trainer.train_probe, "val": trainer.val, "test": trainer.test}
        (root / variant / f"rank{trainer.rank}.json").write_text(json.dumps(record))
    close_distributed()


if __name__ == "__main__":
    _probe(sys.argv[1], Path(sys.argv[2]))
