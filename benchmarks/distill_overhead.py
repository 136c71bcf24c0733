"""Distillation overhead: one DSD iteration (Phase II) on Ray Train + DeepSpeed against a plain PyTorch loop.

(a) the distill stage (Ray Train ``TorchTrainer``, one worker, DeepSpeed ZeRO-2: one engine for the generator
    and one for the fake score, the frozen teacher as a plain module, the generator's fp32 EMA; MLflow off, no
    proximal FD, no sample grid, a checkpoint only at the end) against
(b) a plain single-process PyTorch loop doing the same iteration on the same networks and batch: three modules
    built from the same teacher folder, two ``torch.optim.Adam`` (the generator's betas and lr; the fake score's
    with β₁ 0), the same constant LR schedule, and per iteration the same two sub-steps with the same functions
    of :mod:`ambient_ray.diffusion.dsd`: a fake-score step (G(z) without gradients, ỹ = G(z) + σ_n·ε, σ > σ_n,
    the Phase-I loss) and a generator step (SiD's σ, the fake score in eval mode with its parameters out of the
    graph, the teacher, SiD's loss), then the generator's fp32 warm-up EMA.

The teacher is a randomly initialised ``ddpmpp`` denoiser saved as a model folder (``model.json`` with
``noisy: {sigma_n: 0.2, way: adjusted}``, ``ema.safetensors``, ``model.safetensors``); the run has no data (σ_n
the teacher's, no labels). Step times exclude start-up and warm-up: the stage's is read from the worker's own
timing of its last logging interval (``images_per_s`` counts the fake-score step's images: one batch per
iteration; no checkpoint inside it); the plain loop times the iterations after ``--warmup``. The sides run in
turns (:mod:`benchmarks.timing`): one untimed round, then ``--repeats`` rounds; printed are the medians, their
spread and the ratio of the medians. Ray stays up throughout, so its idle daemons share both sides' CPUs.

    python benchmarks/distill_overhead.py [--cpus 2] [--steps 30] [--warmup 5] [--repeats 3] [--batch 32]
        [--size 16] [--channels 32] [--device cpu|cuda]

On CUDA the stage runs in bf16 (DeepSpeed's bf16 with fp32 master weights, the teacher in bf16); the plain loop
then keeps fp32 modules under ``torch.autocast`` (bf16) with the teacher in bf16: close, not identical.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
import time

import timing  # benchmarks/timing.py, beside this script
import torch

from ambient_ray.diffusion import dsd
from ambient_ray.diffusion.edm import bcast
from ambient_ray.models import registry, weights
from ambient_ray.models.ddpmpp_config import UNetConfig
from ambient_ray.stages import distill
from ambient_ray.train.schedules import lr_lambda
from ambient_ray.train.tasks.distill_config import DistillConfig

SIGMA_N = 0.2


def save_teacher(folder: str, model: UNetConfig, seed: int = 0) -> dict:
    """A randomly initialised ddpmpp denoiser as a Phase-I teacher's model folder; returns its model.json."""
    from safetensors.torch import save_file

    meta = {
        "kind": "denoiser",
        "arch": "ddpmpp",
        "model": model.model_dump(mode="json"),
        "sigma_data": 0.5,
        "noisy": {"sigma_n": SIGMA_N, "way": "adjusted"},
    }
    torch.manual_seed(seed)
    net = registry.build(meta)
    state = {n: p.detach().float().contiguous() for n, p in net.named_parameters()}
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "ema.safetensors"))
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump(meta, f)
    return meta


def plain_loop(cfg: DistillConfig, meta: dict, steps: int, warmup: int, device: str) -> float:
    """Seconds per distillation iteration (fake-score step + generator step + EMA) of a plain PyTorch loop."""
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def net(trained: bool) -> torch.nn.Module:
        m = weights.load_into(registry.build(meta), cfg.teacher, cfg.distill.teacher_weights).to(dev)
        if trained:
            return m.train()
        m.requires_grad_(False)  # frozen, in eval mode (load_into's), in bf16 on CUDA as the engine keeps it
        return m.to(torch.bfloat16) if cuda else m

    gen, fake, teacher = net(True), net(True), net(False)
    gen_params, fake_params = list(gen.parameters()), list(fake.parameters())
    o, d = cfg.optim, cfg.distill
    total = warmup + steps
    opt_g = torch.optim.Adam(gen_params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    opt_f = torch.optim.Adam(fake_params, lr=d.fake_lr or o.lr, betas=(0.0, o.betas[1]), weight_decay=o.weight_decay)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(o, total))
    sched_f = torch.optim.lr_scheduler.LambdaLR(opt_f, lr_lambda(o, total))
    ema = [p.detach().clone().float() for p in gen_params]
    cfg_m = registry.config_of(meta)
    shape = (cfg.batch_size, cfg_m.in_channels, cfg_m.img_resolution, cfg_m.img_resolution)
    sd = meta.get("sigma_data", 0.5)
    g = torch.Generator().manual_seed(cfg.seed * 1000)
    sn = torch.full((cfg.batch_size,), SIGMA_N)
    sn_d = sn.to(dev)
    s_init = torch.full((cfg.batch_size,), d.sigma_init, device=dev)
    sums = torch.zeros(2, dtype=torch.float64, device=dev)  # the losses a plain loop would report

    def amp():
        return torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=g).to(dev)

    for i in range(total):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        # 1. the fake score learns G's samples corrupted to σ_n (the adjusted way: Phase-I loss at σ > σ_n)
        z = randn()
        with torch.no_grad(), amp():
            x_g = gen(d.sigma_init * z, s_init).float()
        sigma = dsd.sigma_above(sn, d.p_mean, d.p_std, g)
        e1, e2 = randn(), randn()
        y = x_g + bcast(sn_d, x_g) * e1
        x_s = y + bcast((sigma**2 - sn**2).sqrt().to(dev), y) * e2
        sigma_d = sigma.to(dev)
        with amp():
            den = fake(x_s, sigma_d).float()
        per = dsd.fake_score_loss(den, x_s, y, sigma_d, sn_d, sd).flatten(1).mean(1)
        opt_f.zero_grad(set_to_none=True)
        per.mean().backward()
        opt_f.step()
        sched_f.step()
        sums[0] += per.detach().sum()
        # 2. the generator learns from SiD's loss; the fake score in eval mode, its parameters out of the graph
        z = randn()
        with amp():
            x_g = gen(d.sigma_init * z, s_init).float()
        sigma = dsd.sid_sigmas(cfg.batch_size, g, t_max=d.t_max).to(dev)
        x_t = x_g + bcast(sigma, x_g) * randn()
        fake.eval().requires_grad_(False)
        with amp():
            f_fake = fake(x_t, sigma).float()
            f_teacher = teacher(x_t, sigma).float()
        fake.train().requires_grad_(True)
        per = dsd.generator_loss(f_teacher, f_fake, x_g, d.alpha)
        opt_g.zero_grad(set_to_none=True)
        per.mean().backward()
        opt_g.step()
        sched_g.step()
        sums[1] += per.detach().sum()
        with torch.no_grad():
            dcy = min(cfg.ema_decay, (2 + i) / (11 + i))  # the engine's warm-up EMA after update i + 1
            for e, p in zip(ema, gen_params):
                e.mul_(dcy).add_(p.detach().float(), alpha=1 - dcy)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    if not bool(torch.isfinite(sums).all()):
        raise SystemExit(f"the plain loop's losses are not finite: {sums.tolist()}")
    return seconds


def run_distill(cfg: DistillConfig) -> dict:
    """``distill.run(cfg)``, run once more (into ``OUT-retry``) where Ray Train's detached PlacementGroupCleaner
    removed the live run's placement group ("A worker health check failed ... its placement group was removed";
    a State API lookup that misses the live controller on a loaded machine; as in train_memory.py)."""
    try:
        return distill.run(cfg.model_copy(deep=True))
    except Exception as e:  # Ray Train's WorkerGroupError
        if "placement group was removed" not in str(e):
            raise
        print("  (Ray Train's placement group cleaner removed a live run's placement group: run again)", flush=True)
        return distill.run(cfg.model_copy(update={"out": cfg.out + "-retry"}, deep=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cpus", type=int, default=os.cpu_count() or 2, help="CPUs (threads) for the worker and the plain loop"
    )
    ap.add_argument("--steps", type=int, default=30, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of every side, after an untimed one")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=16, help="image side")
    ap.add_argument("--channels", type=int, default=32, help="model_channels of the U-Net")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()

    import ray

    from ambient_ray.io import ray_runtime

    tmp = tempfile.mkdtemp(prefix="ambient-bench-distill-")
    gpu = args.device == "cuda"
    model = UNetConfig(img_resolution=args.size, in_channels=1, model_channels=args.channels)
    try:
        ray_runtime.ray_init(
            None, num_cpus=args.cpus, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False
        )
        meta = save_teacher(f"{tmp}/teacher", model)
        # the stage times interval [steps/2 .. steps]: warm-up + timed iterations, split in two intervals
        interval = max(args.warmup, args.steps)
        cfg = DistillConfig(
            teacher=f"{tmp}/teacher",
            out=f"{tmp}/run",
            batch_size=args.batch,
            steps=2 * interval,
            log_every=interval,
            checkpoint_every=2 * interval,
            num_workers=1,
            zero_stage=2,
            cpus_per_worker=args.cpus,
            use_gpu=gpu,
            sample_grid=0,
            grid_every=0,
            mlflow=dict(enabled=False),
        )
        torch.set_num_threads(args.cpus)

        def plain(r: int) -> float:
            return plain_loop(cfg, meta, args.steps, args.warmup, args.device)

        def stage(r: int) -> float:  # a fresh run folder each time (a used one would resume)
            summary = run_distill(cfg.model_copy(update={"out": f"{tmp}/run{r + 1}"}, deep=True))
            return args.batch / summary["metrics"]["images_per_s"]

        names = ("plain PyTorch loop", "distill stage: Ray Train + DeepSpeed ZeRO-2, 1 worker")
        stats = timing.interleave(dict(zip(names, (plain, stage))), args.repeats)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    plain_step, ray_step = (stats[n] for n in names)
    n_params = sum(p.numel() for p in registry.build(meta).parameters())
    print(
        f"distill overhead: {args.size}x{args.size} grey, 3 U-Nets of {n_params / 1e6:.2f}M params, "
        f"batch {args.batch}, "
        f"{args.cpus} CPUs, device {args.device}, {args.steps} timed iterations (fake-score + generator step); "
        f"median of {args.repeats} interleaved rounds [min..max] after a warm-up round"
    )
    for st in (plain_step, ray_step):
        print(f"  {st.name:55s} {st.show(1000, 'ms/iter')}  {args.batch / st.median:7.0f} images/s")
    ratio = timing.ratio(ray_step, plain_step)
    print(f"Ray Train + DeepSpeed ZeRO-2 / plain loop: {ratio:.3f}  (ratio of medians; goal <= 1.10)")
    if not math.isfinite(ray_step.median):
        raise SystemExit("the distill stage reported no images/s")


if __name__ == "__main__":
    main()
