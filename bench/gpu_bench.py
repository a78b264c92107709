"""Every figure of issue 28 on one GPU, each against its baseline, measured in one run.

    python bench/gpu_bench.py --out OUT/gpu              # on a GPU: about --budget (390 s) at most
    python bench/gpu_bench.py --smoke --out /tmp/smoke   # tiny sizes on the CPU: the script's own test

Run it on an idle GPU (`scripts/gpu_session.sh bench OUT` does, with the CUDA tests first).
It prints each figure beside its target as it goes and writes into `--out`:
`results.json` (every figure, its baseline, ratio and target), `summary.md` (the same as a
table, with the device, torch version and date) and `profile.txt` (where the surgery
kernels spend their time). Sections, each timed against a baseline in this run:

1. ELBO surgery at N = M = 50,000, D = 40 (synthetic posteriors shaped like a trained
   40-D MNIST VAE's, `bench/surgery_speed.py`): MI + marginal KL, and TC + dimension-wise
   KL over all M, against a naive chunked torch.distributions computation (10 samples at a
   time over all N, which yields log q(z) and every log q(z_d)); the MI kernel also with
   the CPU's block walk on this GPU (the walk before issue 28); the error against float64
   on 200 samples; a profile at N = M = 10,000 (the top kernels and host synchronizations).
2. Importance-sampled log p(x), K = 5000 on 10,000 points, against the bare decoder
   passes over the same latent samples in the same call shapes; a random untrained gated
   z = 40 model (its speed is what matters), or `--checkpoint`.
3. Training a gated z = 40 VAE (500 steps of batch 100 an epoch, with validation) through
   `train.py` on synthetic grey-level data of MNIST's shape: one run alone with the
   trainer's defaults and, where the trainer config has a `compile` key, with
   `trainer.compile=false` (eager) and `=true` (`--compile` names other values); then 4
   and 8 runs sharing the GPU; per-epoch seconds from each run's metrics.jsonl (the first
   epoch left out); and the time of the whole prior comparison (4 priors x 3 seeds x
   ~1,400 epochs) at that rate.

A section that fails prints its error and the rest go on; `--budget` seconds bound the
whole run (a section that would not fit is skipped and says so).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from surgery_speed import baseline_log_q, reference_log_q, synthetic_posteriors  # noqa: E402

import priors.densities as densities  # noqa: E402
from priors.gaussian import GaussianPrior  # noqa: E402
from surgery.decomposition import aggregate_terms, importance_batch_shape, importance_log_likelihood  # noqa: E402

#: Issue 28's targets (idle H100 or H200).
TARGETS = {
    "mi_marginal_kl_s": ("<=", 0.3),
    "tc_dimwise_all_m_s": ("<=", 2.0),
    "log_px_ratio": ("<=", 1.5),
    "epoch_alone_s": ("<=", 0.5),
    "epoch_8_shared_s": ("<=", 1.0),
    "error_nats": ("<=", 1e-10),
}

FULL = {
    "n": 50_000,
    "d": 40,
    "active": 15,
    "ref_rows": 200,
    "profile_n": 10_000,
    "is_points": 10_000,
    "is_samples": 5000,
    "train_points": 50_000,
    "eval_points": 10_000,
    "epochs": 4,
    "concurrency": (4, 8),
    "run_timeout": 300,
}
SMOKE = {
    "n": 600,
    "d": 6,
    "active": 2,
    "ref_rows": 30,
    "profile_n": 200,
    "is_points": 8,
    "is_samples": 64,
    "train_points": 600,
    "eval_points": 200,
    "epochs": 2,
    "concurrency": (2,),
    "run_timeout": 240,
}


class Bench:
    """The run's clock, device and collected figures."""

    def __init__(self, device: torch.device, out: Path, budget: float, sizes: dict) -> None:
        self.device, self.out, self.budget, self.sizes = device, out, budget, sizes
        self.started = time.perf_counter()
        self.figures: list[dict] = []
        self.notes: list[str] = []

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn):
        """(seconds, result) of fn(), the device's queue drained before and after."""
        self.sync()
        started = time.perf_counter()
        result = fn()
        self.sync()
        return time.perf_counter() - started, result

    def figure(self, key: str, label: str, value: float, unit: str, baseline: float | None = None, note: str = ""):
        """Record and print one figure, with its baseline, ratio and target (if it has them)."""
        target = TARGETS.get(key)
        met = None
        if target is not None and value is not None and math.isfinite(value):
            met = value <= target[1]
        ratio = value / baseline if baseline else None
        self.figures.append(
            {
                "key": key,
                "label": label,
                "value": value,
                "unit": unit,
                "baseline": baseline,
                "ratio_to_baseline": ratio,
                "target": None if target is None else f"{target[0]} {target[1]:g}",
                "met": met,
                "note": note,
            }
        )
        parts = [f"  {label}: {value:.4g} {unit}"]
        if baseline is not None:
            parts.append(f"baseline {baseline:.4g} {unit} (ours/baseline {ratio:.3g})")
        if target is not None:
            parts.append(f"target {target[0]} {target[1]:g} {unit}: {'MET' if met else 'not met'}")
        if note:
            parts.append(note)
        print(", ".join(parts), flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


@contextlib.contextmanager
def section(bench: Bench, name: str, needs: float):
    """Run a section if `needs` seconds are left; print and keep going on an error."""
    print(f"\n== {name} ({bench.left():.0f} s of the budget left)", flush=True)
    if bench.left() < needs:
        bench.note(f"{name}: skipped, {bench.left():.0f} s left of the budget, it needs ~{needs:.0f} s")
        yield False
        return
    started = time.perf_counter()
    try:
        yield True
    except Exception as e:  # noqa: BLE001 - a failed section must not stop the others
        bench.note(f"{name}: FAILED: {type(e).__name__}: {e}")
        traceback.print_exc()
    print(f"  ({name}: {time.perf_counter() - started:.1f} s)", flush=True)


# ---- 1. surgery --------------------------------------------------------------------------------


def surgery(bench: Bench) -> None:
    sz, device = bench.sizes, bench.device
    n, d = sz["n"], sz["d"]
    mu, logvar, z = (t.to(device) for t in synthetic_posteriors(n, d, sz["active"]))
    prior = GaussianPrior(d).to(device)
    index = torch.arange(n, device=device)

    def ours():
        return aggregate_terms(mu, logvar, prior, z, index, dimwise_samples=None)

    # Warm-up at a small size: CUDA context, cuBLAS handles, the allocator.
    small = max(64, n // 20)
    aggregate_terms(mu[:small], logvar[:small], prior, z[:small], index[:small], dimwise_samples=None)
    runs = [bench.timed(ours) for _ in range(2)]
    best = min(runs, key=lambda r: r[1].seconds_aggregate + r[1].seconds_dimwise)
    terms = best[1]
    mi_kl, tc_dw = terms.seconds_aggregate, terms.seconds_dimwise
    each = ", ".join(f"{r[1].seconds_aggregate:.3f} + {r[1].seconds_dimwise:.3f} s" for r in runs)
    print(
        f"  MI = {terms.mutual_info.value:.4f}, marginal KL = {terms.marginal_kl.value:.4f}, "
        f"TC = {terms.total_correlation.value:.4f}, dimension-wise KL = {terms.dimwise_kl.value:.4f}, "
        f"log N = {math.log(n):.4f} (runs: {each})",
        flush=True,
    )

    # The naive baseline: all rows unless that would take more than a minute (then extrapolated).
    probe_rows = min(n, 500 if device.type == "cuda" else 50)
    probe, _ = bench.timed(lambda: baseline_log_q(z[:probe_rows], mu, logvar))
    rows = n if probe * n / probe_rows < 60 else max(probe_rows, int(60 * probe_rows / max(probe, 1e-9)) // 10)
    base_time, (base_joint, base_dims) = bench.timed(lambda: baseline_log_q(z[:rows], mu, logvar))
    base_full = base_time * n / rows
    how = "all M" if rows == n else f"{rows:,} of M, extrapolated linearly"
    bench.figure(
        "mi_marginal_kl_s",
        f"MI + marginal KL, N = M = {n:,}, D = {d}",
        mi_kl,
        "s",
        base_full,
        f"naive torch.distributions baseline ({how}) also yields every log q(z_d)",
    )
    bench.figure("tc_dimwise_all_m_s", f"TC + dimension-wise KL over all M = {n:,}", tc_dw, "s")
    bench.figure("surgery_total_s", "MI + marginal KL + TC + dimension-wise KL", mi_kl + tc_dw, "s", base_full)

    # The MI kernel with the CPU's block walk (cache-sized blocks, as before issue 28) on this device.
    if device.type == "cuda" and bench.left() > 120:
        real = densities._block_profile
        cpu_walk = real(torch.device("cpu"))
        densities._block_profile = lambda dev: cpu_walk
        try:
            old_time, old_lq = bench.timed(lambda: _log_q(mu, logvar, z))
        finally:
            densities._block_profile = real
        new_time, new_lq = bench.timed(lambda: _log_q(mu, logvar, z))
        bench.figure(
            "mi_kernel_gpu_walk_s",
            "the MI kernel alone (log q(z) at all M), GPU block walk",
            new_time,
            "s",
            old_time,
            "baseline: the CPU's cache-sized blocks on this GPU; "
            f"max |difference| {(new_lq - old_lq).abs().max().item():.1e}",
        )

    # Exactness against float64 on the first rows.
    rr = min(sz["ref_rows"], n)
    ref_joint, ref_dims = reference_log_q(z[:rr], mu, logvar)
    log_q_ours = (terms.marginal_kl_per_sample + prior.log_prob(z).double())[:rr]
    dims_ours = densities.gaussian_mixture_marginals_logsumexp(z[:rr], mu, logvar) - math.log(n)
    err_joint = (log_q_ours - ref_joint).abs().max().item()
    err_dims = (dims_ours - ref_dims).abs().max().item()
    bench.figure("error_nats", f"log q(z) error vs float64 ({rr} samples)", err_joint, "nats")
    bench.figure("error_nats", f"log q(z_d) error vs float64 ({rr} samples, all D)", err_dims, "nats")
    base_err = (base_dims[:rr].double() - ref_dims).abs().max().item()
    bench.note(f"the naive baseline's log q(z_d) error: {base_err:.1e} nats (float32)")
    stats: dict = {}
    densities.gaussian_mixture_marginals_logsumexp(z, mu, logvar, stats=stats)
    bench.note(f"marginals at all M: {stats}")


def _log_q(mu, logvar, z):
    with torch.inference_mode():
        mixture = densities.DiagonalGaussianMixture(mu, logvar, small_components=0)
        return mixture.log_prob(z, out_dtype=torch.float64)


def profile_surgery(bench: Bench) -> None:
    """torch.profiler over the two kernels at a smaller size: what dominates, and how many host waits."""
    from torch.profiler import ProfilerActivity, profile

    n, d = bench.sizes["profile_n"], bench.sizes["d"]
    device = bench.device
    mu, logvar, z = (t.to(device) for t in synthetic_posteriors(n, d, bench.sizes["active"]))
    _log_q(mu, logvar, z)  # warm-up
    densities.gaussian_mixture_marginals_logsumexp(z, mu, logvar)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    lines = [f"profile at N = M = {n:,}, D = {d} on {bench.device}"]
    for name, fn in (
        ("MI kernel (log q(z))", lambda: _log_q(mu, logvar, z)),
        ("marginals (all log q(z_d))", lambda: densities.gaussian_mixture_marginals_logsumexp(z, mu, logvar)),
    ):
        with profile(activities=activities) as prof:
            bench.timed(fn)
        events = prof.key_averages()
        waits = {
            e.key: e.count
            for e in events
            if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy")
        }
        launches = sum(
            e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        sort_key = "self_cpu_time_total"
        if device.type == "cuda":
            sort_key = (
                "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
            )
        table = events.table(sort_by=sort_key, row_limit=12)
        lines += [f"\n### {name}: host waits and copies {waits}, kernel launches {launches}", table]
        print(f"  {name}: host waits/copies {waits}, kernel launches {launches}", flush=True)
        print("\n".join(table.splitlines()[:8]), flush=True)
    (bench.out / "profile.txt").write_text("\n".join(lines) + "\n")


# ---- 2. log p(x) ------------------------------------------------------------------------------


def gated_model(device: torch.device, checkpoint: str | None):
    from vae.model import VAE
    from vae.networks import GatedMLPDecoder, GatedMLPEncoder

    if checkpoint:
        from lab.checkpoint import load_model

        return load_model(checkpoint, device=device)[0].to(device).eval()
    torch.manual_seed(0)
    model = VAE(GatedMLPEncoder(784, 40), GatedMLPDecoder(784, 40), GaussianPrior(40))
    return model.to(device).eval()


def log_likelihood(bench: Bench, checkpoint: str | None) -> None:
    sz, device = bench.sizes, bench.device
    model = gated_model(device, checkpoint)
    points, k = sz["is_points"], sz["is_samples"]
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((points, 784), 0.13), generator=g)
    default_elements = 2_000_000  # conf/surgery's is_batch_elements
    s, b = importance_batch_shape(k, 784, default_elements, device)
    with torch.inference_mode():
        importance_log_likelihood(model, x[:2], min(k, 200))  # warm-up
        is_time, values = bench.timed(lambda: importance_log_likelihood(model, x, k))
        z_batch = torch.randn(b, s, 40, device=device)
        calls = math.ceil(points / b) * math.ceil(k / s)

        def floor():
            for _ in range(calls):
                model.decode(z_batch)

        floor_time, _ = bench.timed(floor)
    bench.figure(
        "log_px_ratio",
        f"log p(x), K = {k} on {points:,} points: importance sampling / bare decoder passes",
        is_time / floor_time,
        "x",
        note=f"{is_time:.2f} s vs {floor_time:.2f} s; calls of {b} points x {s} samples; mean log p(x) "
        f"{values.mean().item():.2f} (untrained model)"
        if not checkpoint
        else f"{is_time:.2f} s vs {floor_time:.2f} s",
    )


# ---- 3. training ------------------------------------------------------------------------------


def synthetic_npz(directory: Path, train: int, evaluate: int) -> Path:
    """Grey levels of MNIST's shape (bytes 0-255, blurred random strokes are not needed: speed only)."""
    import numpy as np

    rng = np.random.default_rng(0)

    def split(count):
        return (rng.random((count, 28, 28)) < 0.13).astype(np.uint8) * 255

    path = directory / "synthetic_mnist.npz"
    np.savez(path, train=split(train), val=split(evaluate), test=split(evaluate))
    return path


def trainer_has(key: str) -> bool:
    """Whether the trainer config group (conf/trainer/default.yaml) has `key`."""
    from omegaconf import OmegaConf

    return key in OmegaConf.load(ROOT / "conf" / "trainer" / "default.yaml")


def launch_runs(bench: Bench, data: Path, work: Path, name: str, count: int, extra: list[str]) -> list[float]:
    """`count` train.py runs at once; the median per-epoch seconds of each (the first epoch left out)."""
    device = "cuda" if bench.device.type == "cuda" else "cpu"
    epochs = bench.sizes["epochs"]
    procs = []
    # One thread each on a CPU: runs with more threads than cores' share stall on each other.
    threads = max(1, (os.cpu_count() or 2) // count) if bench.device.type == "cuda" else 1
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    for i in range(count):
        run_dir = work / f"{name}-{i}"
        cmd = [
            sys.executable,
            "train.py",
            "vae=gated_mlp",
            "vae.latent_dim=40",
            "prior=gaussian",
            "data=npz",
            f"data.path={data}",
            "logger=none",
            "surgery.enabled=false",
            "trainer.progress=false",
            "trainer.batch_size=100",
            f"trainer.max_epochs={epochs}",
            f"device={device}",
            f"seed={i}",
            "hydra.mode=RUN",
            f"hydra.run.dir={run_dir}",
            *extra,
        ]
        log = open(work / f"{name}-{i}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), run_dir, log))
    per_run = []
    deadline = time.perf_counter() + min(bench.sizes["run_timeout"], max(bench.left() - 5, 30))
    for proc, run_dir, log in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode != 0:
            tail = (work / f"{run_dir.name}.log").read_text()[-1500:]
            raise RuntimeError(f"{name}: train.py exited {proc.returncode}:\n{tail}")
        seconds = [json.loads(line)["seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        per_run.append(statistics.median(seconds[1:] if len(seconds) > 1 else seconds))
    return per_run


def training(bench: Bench, compile_values: list, no_compile_why: str = "") -> None:
    sz = bench.sizes
    work = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    try:
        data = synthetic_npz(work, sz["train_points"], sz["eval_points"])
        steps = math.ceil(sz["train_points"] / 100)
        alone = launch_runs(bench, data, work, "alone", 1, [])[0]
        bench.figure(
            "epoch_alone_s",
            f"gated z = 40 epoch ({steps} steps of batch 100, with validation), one run alone, trainer default",
            alone,
            "s",
        )
        best = alone
        if compile_values:
            for value in compile_values:
                if bench.left() < 150:
                    bench.note(f"trainer.compile={value} skipped: {bench.left():.0f} s left")
                    continue
                extra = [f"trainer.compile={value}"]
                try:
                    t = launch_runs(bench, data, work, f"alone-compile-{value}", 1, extra)[0]
                except RuntimeError as e:  # a refused value must not cost the concurrency figures
                    bench.note(f"trainer.compile={value}: {e}")
                    continue
                best = min(best, t)
                bench.figure(
                    "epoch_alone_s",
                    f"the same with trainer.compile={value}",
                    t,
                    "s",
                    alone,
                    "baseline: trainer default",
                )
        else:
            bench.note(f"the compiled step was not measured: {no_compile_why}")
        for count in sz["concurrency"]:
            if bench.left() < 30 + 10 * count:
                bench.note(f"{count} concurrent runs skipped: {bench.left():.0f} s left")
                continue
            per_run = launch_runs(bench, data, work, f"shared{count}", count, [])
            worst = max(per_run)
            key = "epoch_8_shared_s" if count == 8 else f"epoch_{count}_shared_s"
            bench.figure(
                key,
                f"{count} runs sharing the device: slowest run's epoch",
                worst,
                "s",
                alone,
                f"each run {', '.join(f'{s:.2f}' for s in per_run)} s; "
                f"throughput {count / statistics.mean(per_run):.2f} epochs/s vs {1 / alone:.2f} alone",
            )
            if count == max(sz["concurrency"]):
                # 4 priors x 3 seeds x ~1,400 epochs, at this sharing's throughput (Gaussian-prior epochs).
                epochs_total = 12 * 1400
                hours = epochs_total / (count / statistics.mean(per_run)) / 3600
                bench.figure(
                    "comparison_hours",
                    f"the prior comparison (12 runs x 1,400 epochs) at {count} runs at a time",
                    hours,
                    "h",
                    epochs_total * best / 3600,
                    "baseline: one run at a time; Gaussian-prior epochs (VampPrior and flow epochs cost more)",
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- the run ----------------------------------------------------------------------------------


def header(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,utilization.gpu,memory.used", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
    return info


def write_summary(bench: Bench, info: dict) -> None:
    (bench.out / "results.json").write_text(
        json.dumps({"info": info, "figures": bench.figures, "notes": bench.notes}, indent=2) + "\n"
    )
    rows = ["| figure | value | baseline | ours / baseline | target | met |", "|---|---|---|---|---|---|"]
    for f in bench.figures:
        base = "" if f["baseline"] is None else f"{f['baseline']:.4g} {f['unit']}"
        ratio = "" if f["ratio_to_baseline"] is None else f"{f['ratio_to_baseline']:.3g}"
        met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
        rows.append(f"| {f['label']} | {f['value']:.4g} {f['unit']} | {base} | {ratio} | {f['target'] or ''} | {met} |")
    text = [
        "# GPU benchmark (issue 28)",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        "",
        *rows,
        "",
        *(f"- {n}" for n in bench.notes),
    ]
    (bench.out / "summary.md").write_text("\n".join(text) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu"), help="output directory")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a check of the script itself, on any device)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--budget", type=float, default=390.0, help="seconds for the whole run")
    parser.add_argument("--checkpoint", default=None, help="a model for the log p(x) section (default: random)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["surgery", "profile", "logpx", "training"])
    parser.add_argument(
        "--compile", nargs="*", default=None, help="trainer.compile values to time, if it exists (default: false true)"
    )
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # the smoke run checks the script, not the speed: no thread contention
    bench = Bench(device, out, args.budget, SMOKE if args.smoke else FULL)
    info = header(device)
    info["mode"] = "smoke" if args.smoke else "full"
    print(json.dumps(info, indent=2), flush=True)

    if "surgery" not in args.skip:
        with section(bench, "1. surgery", needs=60 if not args.smoke else 5) as go:
            if go:
                surgery(bench)
    if "profile" not in args.skip:
        with section(bench, "1b. profile", needs=30 if not args.smoke else 5) as go:
            if go:
                profile_surgery(bench)
    if "logpx" not in args.skip:
        with section(bench, "2. log p(x)", needs=40 if not args.smoke else 5) as go:
            if go:
                log_likelihood(bench, args.checkpoint)
    if "training" not in args.skip:
        with section(bench, "3. training", needs=90 if not args.smoke else 20) as go:
            if go:
                values = args.compile if args.compile is not None else ["false", "true"]
                why = ""
                if not trainer_has("compile"):
                    values, why = [], "conf/trainer/default.yaml has no `compile` key"
                elif args.smoke and args.compile is None:
                    values, why = [], "a smoke run skips it (compiling on a CPU takes minutes; --compile names it)"
                training(bench, values, why)
    info["seconds"] = round(time.perf_counter() - bench.started, 1)
    write_summary(bench, info)
    print(f"\ntotal {info['seconds']} s; wrote {out / 'results.json'}, {out / 'summary.md'}", flush=True)


if __name__ == "__main__":
    main()
