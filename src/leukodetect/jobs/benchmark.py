"""``run_benchmark``: how fast our training and inference paths run, against a naive baseline, and
how close they come to what the machine can do.

For each architecture, in one process and on the same model, batch and optimiser:

- training: our step (:func:`~leukodetect.training.engine.train_one_epoch` on one batch, with the
  device, precision and channels-last choices ``train`` makes, AdamW) against a naive step (eager
  float32, NCHW, AdamW);
- inference: our PyTorch path (:class:`~leukodetect.runtime.classifier.Classifier` with ``backend="torch"``,
  what ``predict``, ``detect`` and ``serve`` run on a GPU or with ``--backend torch``), the naive
  path (eval, float32, NCHW, ``no_grad``) and ONNX Runtime (the file ``leukodetect export`` writes,
  in the same session settings as the ``onnx`` backend, their default on CPU), batched and at
  batch 1 (p50 / p95 latency);
- the data pipeline (decode + resize + the training augmentation) on real images, cold (decoding)
  and warm (decode-once cache filled, augmentation only), so it is clear which side is the bottleneck;
- the machine's float32 and bfloat16 matrix-multiply rate, and each path's achieved GFLOP/s as a
  fraction of the float32 rate. Forward FLOPs are counted by ``torch.utils.flop_counter`` (a
  multiply-add is 2 FLOPs; convolutions and matrix products only); a training step is counted as
  3x the forward pass.

The paths being compared take turns (training: one step each; inference: blocks of calls, each
block after one untimed call so another runtime's spinning threads have wound down), so a change in
the machine's load during the run affects them alike and the ratios stay meaningful. Figures are
medians of the timed calls after warm-up.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from leukodetect import __version__
from leukodetect.config import AugmentConfig, TrainConfig
from leukodetect.data.dataset import ImageDataset
from leukodetect.data.indexers import index_dataset
from leukodetect.data.transforms import TrainPreset
from leukodetect.errors import LeukoError
from leukodetect.models import create_model, get_spec
from leukodetect.runtime.checkpoint import make_bundle, save_checkpoint
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.device import (
    autocast_dtype,
    channels_last,
    cpu_has_fast_bf16,
    resolve_device,
)
from leukodetect.runtime.export import ExportedClassifier, export_model
from leukodetect.sample import sample_dir
from leukodetect.training.engine import train_one_epoch
from leukodetect.training.fit import OPTIMIZERS

TARGETS = {"train_speedup": 5.0, "inference_speedup": 5.0, "latency_p50_ms": 25.0}


@dataclass(kw_only=True)
class BenchmarkConfig:
    """What to measure and how long.

    Attributes:
        batch_size: training batch (as ``train --batch-size``), also the data-loader batch.
        steps: timed training steps per path, after ``warmup`` untimed ones.
        infer_batch, infer_runs: batched inference size and timed calls per path.
        latency_runs: timed batch-1 calls per path (p50 and p95 are reported).
        data: images for the data-pipeline figures; None for the bundled C-NMC sample.
        num_workers: DataLoader workers for the data-pipeline figures (as ``data.num_workers``).
        onnx: also time ONNX Runtime (the model is exported once to a temporary file).
    """

    archs: tuple[str, ...] = ("resnet50",)
    image_size: int = 224
    batch_size: int = 16
    steps: int = 5
    warmup: int = 1
    infer_batch: int = 32
    infer_runs: int = 3
    latency_runs: int = 30
    data: str | None = None
    num_workers: int = 0
    onnx: bool = True
    matmul_size: int = 2048
    seed: int = 0

    def validate(self) -> None:

        if not self.archs:
            raise LeukoError("No architecture given: pass --archs, e.g. --archs resnet50,googlenet.")
        for arch in self.archs:
            get_spec(arch)  # a one-sentence error naming the choices
        for name in ("image_size", "batch_size", "steps", "infer_batch", "infer_runs", "latency_runs", "matmul_size"):
            if getattr(self, name) < 1:
                raise LeukoError(f"--{name.replace('_', '-')} must be at least 1.")
        if self.batch_size < 2:
            raise LeukoError("--batch-size must be at least 2: batch norm cannot train on one image.")
        if self.warmup < 0 or self.num_workers < 0:
            raise LeukoError("--warmup and --workers cannot be negative.")


# ---------------------------------------------------------------------------------------------
# Machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU, threads, native bfloat16, load and versions: what the figures depend on."""


    try:
        import onnxruntime  # optional backend, imported where used

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_fast_bf16(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": _load(),
        "versions": {
            "python": platform.python_version(), "leukodetect": __version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "onnxruntime": ort_version,
        },
    }


def _load() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: torch.device | str = "cpu",
                  budget_s: float = 5.0) -> float:
    """The best of up to ``repeats`` timed ``n x n @ n x n`` products, in GFLOP/s (2 n^3 FLOPs each).

    Stops early once ``budget_s`` seconds are spent: emulated bfloat16 can be 100x slower than float32.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    torch.matmul(a, b)  # warm-up: thread pool, packing buffers
    best, start = float("inf"), time.perf_counter()
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return 2 * n**3 / best / 1e9


def forward_flops(model: nn.Module, image_size: int) -> int:
    """FLOPs of one image's forward pass (a multiply-add = 2), convolutions and matrix products."""

    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int, runs: int, device, block: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, taking turns so that load changes hit all of them alike.

    Each turn is ``block`` timed calls. With ``block > 1`` each turn starts with one untimed call:
    a runtime that just ran (ONNX Runtime's and OpenMP's worker threads spin-wait after a call)
    would otherwise slow the first call of the next path and bias the comparison.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    done = 0
    while done < runs:
        n = min(block, runs - done)
        for name, fn in fns.items():
            if block > 1:
                fn()
            for _ in range(n):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
        done += n
    return times


def _throughput(times: Sequence[float], batch: int) -> dict[str, float]:
    median = statistics.median(times)
    return {"images_per_s": batch / median, "median_s": median, "min_s": min(times), "runs": len(times)}


def _latency(times: Sequence[float]) -> dict[str, float]:
    p50, p95 = np.percentile(np.asarray(times) * 1e3, [50, 95])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "runs": len(times)}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


# ---------------------------------------------------------------------------------------------
# Training


def bench_training(arch: str, cfg: BenchmarkConfig, flops: int, peak: float) -> dict[str, Any]:
    """Our training step against the naive one, same initial weights, batch and optimiser."""

    tc = TrainConfig()
    lr = get_spec(arch).scratch_lr
    device = resolve_device(tc.device)
    amp_dtype = autocast_dtype(device, tc.precision)
    use_cl = channels_last(device)
    torch.manual_seed(cfg.seed)
    base = create_model(arch, num_classes=2)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen)
    y = torch.arange(cfg.batch_size) % 2
    loss_fn = nn.CrossEntropyLoss()

    ours = copy.deepcopy(base).to(device)
    if use_cl:
        ours = ours.to(memory_format=torch.channels_last)
    ours_opt = OPTIMIZERS["adamw"](ours.parameters(), lr, tc.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None

    def our_step() -> None:
        train_one_epoch(ours, [(x, y)], ours_opt, loss_fn, device=device, amp_dtype=amp_dtype, scaler=scaler,
                        channels_last=use_cl, progress=False)

    naive = copy.deepcopy(base).to(device).train()
    naive_opt = OPTIMIZERS["adamw"](naive.parameters(), lr, tc.weight_decay)

    def naive_step() -> None:
        xb, yb = x.to(device), y.to(device)
        loss = loss_fn(naive(xb), yb)
        naive_opt.zero_grad(set_to_none=True)
        loss.backward()
        naive_opt.step()
        loss.item()

    times = interleaved({"ours": our_step, "naive": naive_step}, warmup=cfg.warmup, runs=cfg.steps, device=device)
    result: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "ours": {**_throughput(times["ours"], cfg.batch_size), "device": str(device),
                 "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32", "channels_last": use_cl},
        "naive": {**_throughput(times["naive"], cfg.batch_size), "device": str(device), "precision": "float32",
                  "channels_last": False},
    }
    for path in ("ours", "naive"):
        _add_gflops(result[path], 3 * flops, peak)
    result["speedup"] = _ratio(result["ours"]["images_per_s"], result["naive"]["images_per_s"])
    return result


def _add_gflops(entry: dict[str, Any], flops_per_image: int, peak: float) -> None:
    entry["gflops"] = flops_per_image * entry["images_per_s"] / 1e9
    entry["fraction_of_fp32_matmul"] = _ratio(entry["gflops"], peak)


# ---------------------------------------------------------------------------------------------
# Inference


def bench_inference(arch: str, cfg: BenchmarkConfig, flops: int, peak: float, workdir: Path) -> dict[str, Any]:
    """Our Classifier's PyTorch backend, the naive eval path and ONNX Runtime on one set of weights."""

    torch.manual_seed(cfg.seed)
    model = create_model(arch, num_classes=2).eval()
    bundle = make_bundle(model, arch=arch, image_size=cfg.image_size, mean=(0.5,) * 3, std=(0.25,) * 3, config={})
    ours = Classifier(bundle, source=f"benchmark {arch}", backend="torch")
    naive = copy.deepcopy(model).to(ours.device).eval()

    def naive_probabilities(batch: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            logits = naive(batch.to(ours.device))
        return torch.softmax(logits / ours.temperature, dim=1)[:, 1].cpu().numpy()

    paths: dict[str, Callable[[torch.Tensor], np.ndarray]] = {"ours": ours.probabilities, "naive": naive_probabilities}
    notes: dict[str, str] = {}
    if cfg.onnx:
        onnx_probabilities, note = _onnx_path(bundle, arch, workdir)
        if onnx_probabilities is not None:
            paths["onnxruntime"] = onnx_probabilities
        else:
            notes["onnxruntime"] = note

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    xb = torch.randn(cfg.infer_batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    x1 = xb[:1].clone()
    reference = naive_probabilities(xb)
    batched = interleaved({k: (lambda f=f: f(xb)) for k, f in paths.items()},
                          warmup=0, runs=cfg.infer_runs, device=ours.device, block=cfg.infer_runs)
    single = interleaved({k: (lambda f=f: f(x1)) for k, f in paths.items()},
                         warmup=2, runs=cfg.latency_runs, device=ours.device, block=max(1, cfg.latency_runs // 3))
    result: dict[str, Any] = {"batch_size": cfg.infer_batch, "notes": notes}
    for name, fn in paths.items():
        entry = {**_throughput(batched[name], cfg.infer_batch), "latency_batch1": _latency(single[name]),
                 "max_abs_diff_vs_naive": float(np.max(np.abs(fn(xb) - reference)))}
        _add_gflops(entry, flops, peak)
        result[name] = entry
    for name in paths:
        if name != "naive":
            result[name]["speedup"] = _ratio(result[name]["images_per_s"], result["naive"]["images_per_s"])
            result[name]["latency_speedup"] = _ratio(result["naive"]["latency_batch1"]["p50_ms"],
                                                     result[name]["latency_batch1"]["p50_ms"])
    return result


def _onnx_path(bundle: dict, arch: str, workdir: Path):
    """Export with ``leukodetect export`` (which checks itself) and open it as ``predict --model`` does."""

    try:
        import onnxruntime  # noqa: F401  (optional backend: imported where used, so its absence is one sentence)
    except ImportError:
        return None, "onnxruntime is not installed"
    ckpt = save_checkpoint(bundle, workdir / f"{arch}.pt")
    onnx_file = workdir / f"{arch}.onnx"
    try:
        export_model(ckpt, onnx_file, fmt="onnx")
    except LeukoError as exc:
        return None, str(exc)
    return ExportedClassifier.from_file(onnx_file).probabilities, ""


# ---------------------------------------------------------------------------------------------
# Data pipeline


def bench_data(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Decode + resize + training augmentation of real images through a DataLoader, cold and warm."""


    path = Path(cfg.data) if cfg.data else sample_dir()
    records = index_dataset(path)
    if not records:
        raise LeukoError(f"{path} holds no readable labelled images for the data-pipeline benchmark: pass another --data.")
    preset = TrainPreset(image_size=cfg.image_size, augment=AugmentConfig())

    def epoch(ds: ImageDataset) -> float:
        loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        return time.perf_counter() - t0

    cold = ImageDataset(records, preset, seed=cfg.seed)
    cold_s = epoch(cold)
    warm = ImageDataset(records, preset, seed=cfg.seed)
    t0 = time.perf_counter()
    for i in range(len(warm)):  # as fit.py does: decoded once in the main process, shared with workers
        warm.base_image(i)
    decode_s = time.perf_counter() - t0
    warm_times = []
    for e in range(max(2, cfg.infer_runs)):
        warm.set_epoch(e + 1)
        warm_times.append(epoch(warm))
    n = len(records)
    return {
        "source": str(path) if cfg.data else "bundled C-NMC sample",
        "images": n,
        "num_workers": cfg.num_workers,
        "cold_images_per_s": n / cold_s,
        "decode_only_images_per_s": n / decode_s,
        "warm_images_per_s": n / statistics.median(warm_times),
    }


# ---------------------------------------------------------------------------------------------
# Driver


def run_benchmark(cfg: BenchmarkConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure everything the module docstring lists; returns a JSON-ready dict."""

    cfg.validate()
    machine = machine_info()
    device = resolve_device("auto")
    log(f"Benchmark on {machine['cpu']}, {machine['torch_threads']} torch threads, load {machine['load_average']}.")
    # bfloat16 at no more than 512: where the CPU emulates it (1-2 GFLOP/s on AVX2) a 2048 product
    # takes over ten seconds, and the rate of a compute-bound product hardly depends on its size.
    bf16_size = cfg.matmul_size if device.type == "cuda" else min(cfg.matmul_size, 512)
    hardware = {
        "matmul_size": cfg.matmul_size,
        "fp32_gflops": matmul_gflops(torch.float32, cfg.matmul_size, device=device),
        "bf16_matmul_size": bf16_size,
        "bf16_gflops": matmul_gflops(torch.bfloat16, bf16_size, device=device),
    }
    peak = hardware["fp32_gflops"]
    log(f"matmul {cfg.matmul_size}: float32 {peak:.1f} GFLOP/s, bfloat16 {hardware['bf16_gflops']:.1f} GFLOP/s.")
    log("Data pipeline ...")
    data = bench_data(cfg)
    models = []
    with tempfile.TemporaryDirectory(prefix="leukodetect-bench-") as tmp:
        for arch in cfg.archs:
            flops = forward_flops(create_model(arch, num_classes=2), cfg.image_size)
            log(f"{arch}: {flops / 1e9:.2f} GFLOP per image forward; training ...")
            train = bench_training(arch, cfg, flops, peak)
            log(f"{arch}: inference ...")
            infer = bench_inference(arch, cfg, flops, peak, Path(tmp))
            models.append({"arch": arch, "forward_gflop_per_image": flops / 1e9, "train": train, "inference": infer,
                           "bottleneck": _bottleneck(train["ours"]["images_per_s"], data["warm_images_per_s"]),
                           "targets": _targets(train, infer)})
    machine["load_average_after"] = _load()
    return {"config": asdict(cfg), "machine": machine, "hardware": hardware, "data": data, "models": models,
            "targets": dict(TARGETS)}


def _bottleneck(train_ips: float, loader_ips: float) -> str:
    """In one process (num_workers 0) the loader's time adds to the model's; with workers it overlaps."""
    return "model" if train_ips <= loader_ips else "data loader"


def _targets(train: dict, infer: dict) -> dict[str, bool | None]:
    ours = infer["ours"]
    fastest_b1 = min(v["latency_batch1"]["p50_ms"] for k, v in infer.items() if isinstance(v, dict) and "latency_batch1" in v)
    return {
        "train_speedup": train["speedup"] is not None and train["speedup"] >= TARGETS["train_speedup"],
        "inference_speedup": ours.get("speedup") is not None and ours["speedup"] >= TARGETS["inference_speedup"],
        "latency_p50_ms": ours["latency_batch1"]["p50_ms"] <= TARGETS["latency_p50_ms"],
        "latency_p50_ms_any_path": fastest_b1 <= TARGETS["latency_p50_ms"],
    }


def render_benchmark(result: dict[str, Any]) -> list:
    """Rich tables for the terminal: machine, per-architecture figures, data pipeline."""

    m, hw, d = result["machine"], result["hardware"], result["data"]
    head = Table("machine", "value", title="leukodetect benchmark")
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    for key, value in [
        ("date", m["date"]), ("cpu", f"{m['cpu']} ({m['logical_cpus']} logical, {m['cpu_capability']})"),
        ("torch threads", m["torch_threads"]), ("native bfloat16", m["native_bf16"]), ("gpu", m["gpu"] or "none"),
        ("load average (1, 5, 15 min) before / after", f"{m['load_average']} / {m.get('load_average_after')}"),
        (f"matmul {hw['matmul_size']} float32", f"{hw['fp32_gflops']:.1f} GFLOP/s"),
        (f"matmul {hw['bf16_matmul_size']} bfloat16", f"{hw['bf16_gflops']:.1f} GFLOP/s"),
        ("versions", versions),
    ]:
        head.add_row(key, str(value))
    tables = [head]
    cfg = result["config"]
    for model in result["models"]:
        t = Table("path", "images/s", "vs naive", "GFLOP/s", "of fp32 matmul", "b1 p50 ms", "b1 p95 ms", "max |ΔP|",
                  title=f"{model['arch']} at {cfg['image_size']}x{cfg['image_size']}, "
                        f"{model['forward_gflop_per_image']:.2f} GFLOP/image forward")
        tr = model["train"]
        for name in ("ours", "naive"):
            e = tr[name]
            t.add_row(f"train {name}",
                      f"{e['images_per_s']:.2f}", _fmt_ratio(tr["speedup"] if name == "ours" else 1.0),
                      f"{e['gflops']:.1f}", f"{e['fraction_of_fp32_matmul']:.0%}", "", "", "")
        inf = model["inference"]
        for name in ("ours", "naive", "onnxruntime"):
            if name not in inf:
                continue
            e = inf[name]
            t.add_row(f"infer {name}", f"{e['images_per_s']:.2f}",
                      _fmt_ratio(e.get("speedup", 1.0)), f"{e['gflops']:.1f}", f"{e['fraction_of_fp32_matmul']:.0%}",
                      f"{e['latency_batch1']['p50_ms']:.1f}", f"{e['latency_batch1']['p95_ms']:.1f}",
                      f"{e['max_abs_diff_vs_naive']:.1e}")
        tg, o = model["targets"], tr["ours"]
        t.caption = (f"train: batch {tr['batch_size']}, AdamW; ours {o['precision']}"
                     f"{' channels-last' if o['channels_last'] else ''} on {o['device']}, naive float32 NCHW. "
                     f"infer: batch {inf['batch_size']} and batch-1 latency; max |ΔP| = P(blast) vs naive.\n"
                     f"targets: train ≥{TARGETS['train_speedup']:g}x {_yes(tg['train_speedup'])}, "
                     f"batched inference ≥{TARGETS['inference_speedup']:g}x {_yes(tg['inference_speedup'])}, "
                     f"batch-1 p50 ≤{TARGETS['latency_p50_ms']:g} ms {_yes(tg['latency_p50_ms'])}; "
                     f"bottleneck: {model['bottleneck']}")
        tables.append(t)
    dt = Table("data pipeline", "images/s", title=f"{d['source']}: {d['images']} images, {d['num_workers']} workers, "
                                                  f"resize to {cfg['image_size']} + training augmentation")
    dt.add_row("cold (decode + resize + augment)", f"{d['cold_images_per_s']:.1f}")
    dt.add_row("decode + resize only", f"{d['decode_only_images_per_s']:.1f}")
    dt.add_row("warm (cached; augment + normalise)", f"{d['warm_images_per_s']:.1f}")
    tables.append(dt)
    return tables


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _yes(ok: bool) -> str:
    return "met" if ok else "NOT met"
