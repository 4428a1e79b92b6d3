"""torchrun with 2 CPU processes (gloo) matches a single-process run with the same global batch.

Same global batch: ``--batch-size 8`` is split 4 + 4 over the ranks, both runs draw the epoch's
permutation from the same seeded sampler, DDP averages gradients over ranks and batch norm uses
global-batch statistics. What is left is float rounding (sums taken in another order): losses and
weights are compared with ``atol=TOL`` (measured max difference 4.7e-7, on features.3.weight).
The training part has an even count: with an odd one the 2-rank run leaves out one image per epoch
(documented in ``fit.py``, and checked without processes below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.config import RunConfig
from leukodetect.errors import LeukoError
from leukodetect.training.distributed import DistContext
from leukodetect.training.fit import _train_loader

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4  # measured max difference: see the test's assertion message
# float32 on every CPU: the comparison is about the global batch, not bfloat16 rounding (auto picks
# bfloat16 on CPUs with AVX512-BF16); the bfloat16 path is checked on its own below.
ARGS = ["--arch", "tiny", "--epochs", "2", "--image-size", "24", "--batch-size", "8", "--lr", "0.01", "--device", "cpu",
        "--precision", "fp32"]


def _run(cmd: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _split_with_even_training_part(tiny_tree: Path, path: Path) -> Path:
    """A split.json whose training part has an even count, so 2 ranks use every training image."""
    files = sorted(str(p) for p in tiny_tree.rglob("*.png"))
    blast = [f for f in files if "/blast/" in f and "copy_of" not in f]
    normal = [f for f in files if "/normal/" in f]
    copy = [f for f in files if "copy_of" in f]
    train = blast[:9] + normal[:9] + copy  # 19 -> odd; move one to val below
    train = [f for f in train if not f.endswith("blast_08.png")]  # 18 training images
    val = [blast[8], *normal[9:11], *blast[9:11]]
    test = [f for f in files if f not in set(train) | set(val)]
    path.write_text(json.dumps({"train": train, "val": val, "test": test}))
    return path


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="this torch build has no gloo backend")
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_tree, tmp_path):
    split = _split_with_even_training_part(tiny_tree, tmp_path / "split.json")
    common = ["train", "--data", str(tiny_tree), "--split-file", str(split), *ARGS]
    single = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "one")], catch_exceptions=False)
    assert single.exit_code == 0, single.output
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "leukodetect", *common, "--out", str(tmp_path / "two")])
    if ddp.returncode != 0 and ("gloo" in ddp.stderr.lower() or "rendezvous" in ddp.stderr.lower()) and "leukodetect" not in ddp.stderr:
        pytest.skip(f"gloo could not start here: {ddp.stderr.strip().splitlines()[-1]}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    # One set of outputs, written by rank 0 only; no stray files from rank 1.
    names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    assert names(tmp_path / "two") == names(tmp_path / "one")
    assert not [p for p in (tmp_path / "two").rglob(".*.tmp")]
    # Only rank 0 logs: one line per epoch.
    assert ddp.stderr.count("epoch   1") == 1 and "Outputs in" in ddp.stdout

    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert not [k for k in b["state_dict"] if k.startswith("module.")]
    assert list(a["state_dict"]) == list(b["state_dict"])
    diffs = {"train_loss": max(abs(x["train_loss"] - y["train_loss"]) for x, y in zip(a["history"], b["history"]))}
    diffs["val_loss"] = max(abs(x["val_loss"] - y["val_loss"]) for x, y in zip(a["history"], b["history"]))
    for k in a["state_dict"]:
        if a["state_dict"][k].is_floating_point():
            diffs[k] = (a["state_dict"][k] - b["state_dict"][k]).abs().max().item()
    worst = max(diffs, key=diffs.get)
    print(f"max |single - 2 ranks|: {diffs[worst]:.2e} ({worst})")
    assert diffs[worst] <= TOL, diffs
    assert [r["train_acc"] for r in a["history"]] == [r["train_acc"] for r in b["history"]]
    assert a["state_dict"]["features.1.num_batches_tracked"] == b["state_dict"]["features.1.num_batches_tracked"]
    assert json.loads((tmp_path / "two" / "history.json").read_text())[-1]["epoch"] == 2


def test_ranks_share_each_global_batch_and_the_batch_size_is_global():
    cfg = RunConfig()
    cfg.train.batch_size, cfg.train.seed = 8, 3
    ds = list(range(21))  # odd: the 2-rank run leaves out the permutation's last image
    one = [b.tolist() for b in _train_loader(ds, cfg, DistContext(), epoch=2)]
    ranks = [[b.tolist() for b in _train_loader(ds, cfg, DistContext(world_size=2, rank=r), epoch=2)] for r in (0, 1)]
    assert [len(b) for b in one] == [8, 8, 5] and [len(b) for b in ranks[0]] == [4, 4, 2]
    for k, batch in enumerate(one):
        union = ranks[0][k] + ranks[1][k]
        assert sorted(union) == sorted(batch if k < 2 else batch[:-1])
    assert one != [b.tolist() for b in _train_loader(ds, cfg, DistContext(), epoch=3)]  # reshuffled each epoch
    cfg.train.batch_size = 7
    with pytest.raises(LeukoError, match="global batch"):
        _train_loader(ds, cfg, DistContext(world_size=2, rank=0), epoch=1)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="this torch build has no gloo backend")
def test_global_batch_norm_takes_bfloat16_activations(tmp_path):
    """Under CPU bfloat16 autocast the activations reaching batch norm are bfloat16; the global
    statistics are taken in float32 and match plain batch norm on one process."""
    from leukodetect.training.distributed import GlobalBatchNorm2d

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        x = torch.randn(4, 3, 5, 5).to(torch.bfloat16)
        ours, plain = GlobalBatchNorm2d(3), torch.nn.BatchNorm2d(3)
        y = ours(x)
        expected = plain(x.float())
        assert torch.allclose(y, expected, atol=1e-5)
        assert torch.allclose(ours.running_mean, plain.running_mean, atol=1e-6)
        assert torch.allclose(ours.running_var, plain.running_var, atol=1e-6)
        y.sum().backward()  # differentiable through the cast
    finally:
        dist.destroy_process_group()
