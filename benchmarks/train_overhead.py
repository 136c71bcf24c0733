"""Training overhead, measured in one run on the same model, batch and data:

(a) the train stage (Ray Train ``TorchTrainer``, one worker, DeepSpeed ZeRO-2, the σ-first sampler,
    the ambient loss, EMA) against a plain single-process PyTorch loop doing the same work (AdamW,
    the same LR schedule, gradient clipping, EMA, the same σ-first batches and ambient loss);
(b) that plain loop with the ambient objective (σ-first sampler, σ_n noise, ambient loss) against a
    plain EDM loop (uniform rows, log-normal σ, EDM loss).

Step times exclude start-up and warm-up: the train stage's is read from the worker's own timing of
its last logging interval (``images_per_s``, no checkpoint inside it); the plain loops time the steps
after ``--warmup``. The three sides run in turns (:mod:`benchmarks.timing`): one untimed round, then
``--repeats`` rounds of plain ambient, plain EDM, train stage; printed are the medians, their spread
and the ratios of the medians. Ray stays up throughout, so its idle daemons share every side's CPUs.

    python benchmarks/train_overhead.py [--cpus 2] [--steps 60] [--repeats 3] [--batch 64] [--size 16]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time

import numpy as np
import timing  # benchmarks/timing.py, beside this script
import torch

from ambient_ray.data import metadata
from ambient_ray.data.images import decode_png
from ambient_ray.data.metadata import data_dir
from ambient_ray.data.sources import SourceConfig
from ambient_ray.diffusion import ambient, edm
from ambient_ray.models.ddpmpp import UNetConfig, build_denoiser
from ambient_ray.stages import train
from ambient_ray.stages.corrupt import CorruptConfig
from ambient_ray.stages.corrupt import run as corrupt_run
from ambient_ray.train.schedules import lr_lambda
from ambient_ray.train.tasks.denoiser_data import resolve_sigmas


def load_images(cfg: train.TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows as uint8 (N, C, H, W) and their σ_min, as the train stage resolves them."""
    import pyarrow.parquet as pq

    from ambient_ray.io import storage

    meta = metadata.load_metadata(cfg.data)
    smin, _, _ = resolve_sigmas(meta, cfg)
    by_id = {}
    for f in storage.list_files(data_dir(cfg.data), (".parquet",)):
        t = pq.read_table(f, columns=["id", "image"]).to_pydict()
        by_id.update(zip(t["id"], t["image"]))
    imgs = np.stack([decode_png(by_id[i]).transpose(2, 0, 1) for i in meta["id"]])
    return torch.from_numpy(imgs), torch.from_numpy(smin)


def plain_loop(cfg: train.TrainConfig, images, smin, steps: int, warmup: int, objective: str, device: str) -> float:
    """Seconds per optimizer step of a plain PyTorch loop ('ambient' or 'edm' objective)."""
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    net = build_denoiser(cfg.model, cfg.ambient.sigma_data).to(dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype != torch.float32:
        net = net.to(dtype)
    params = list(net.parameters())
    ema = [p.detach().clone().float() for p in params]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o, warmup + steps))
    a = cfg.ambient
    sampler = ambient.SigmaSampler(smin, lambda_max=a.lambda_max, p_mean=a.p_mean, p_std=a.p_std)
    gen = torch.Generator().manual_seed(0)
    n = len(images)
    for i in range(warmup + steps):
        if i == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if objective == "ambient":
            b = ambient.ambient_batch(sampler, images, smin, cfg.batch_size, gen)
            d = net(b.x_sigma.to(dev, dtype), b.sigma.to(dev, dtype)).float()
            loss, _ = ambient.batch_loss(d, b, a.sigma_data)
        else:
            idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
            sigma = edm.lognormal_sigma(cfg.batch_size, a.p_mean, a.p_std, gen)
            y = images[idx].float() / 127.5 - 1.0
            x = y + sigma.view(-1, 1, 1, 1) * torch.randn(y.shape, generator=gen)
            d = net(x.to(dev, dtype), sigma.to(dev, dtype)).float()
            loss = edm.edm_loss(d, y.to(dev), sigma.to(dev), a.sigma_data).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            dcy = min(cfg.ema_decay, (2 + i) / (11 + i))
            for e, p in zip(ema, params):
                e.mul_(dcy).add_(p.detach().float(), alpha=1 - dcy)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cpus", type=int, default=os.cpu_count() or 2, help="CPUs (threads) for the worker and the plain loop"
    )
    ap.add_argument("--steps", type=int, default=60, help="timed steps")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of every side, after an untimed one")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=16, help="image side (digits are resized)")
    ap.add_argument("--channels", type=int, default=32, help="model_channels of the U-Net")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()

    import ray

    from ambient_ray.io import ray_runtime

    tmp = tempfile.mkdtemp(prefix="ambient-bench-train-")
    gpu = args.device == "cuda"
    try:
        ray_runtime.ray_init(
            None, num_cpus=args.cpus, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False
        )
        data = f"{tmp}/data"
        src = SourceConfig(dataset="digits", image_size=args.size)
        corrupt_run(
            CorruptConfig(out=data, source=src, corruptions=["blur:sigma=1.0"], clean_fraction=0.3, preview=0),
            progress=False,
        )

        model = UNetConfig(img_resolution=args.size, in_channels=1, model_channels=args.channels)
        # the train stage times interval [steps/2 .. steps]: warm-up + timed steps, split in two intervals
        interval = max(args.warmup, args.steps)
        cfg = train.TrainConfig(
            data=data,
            out=f"{tmp}/run",
            model=model,
            batch_size=args.batch,
            steps=2 * interval,
            log_every=interval,
            checkpoint_every=2 * interval,
            num_workers=1,
            zero_stage=2,
            cpus_per_worker=args.cpus,
            use_gpu=gpu,
            sample_grid=0,
            ambient=dict(corrupted_sigma_min=1.0),
            mlflow=dict(enabled=False),
        )
        images, smin = load_images(cfg)
        torch.set_num_threads(args.cpus)

        def plain(objective: str):
            return lambda r: plain_loop(cfg, images, smin, args.steps, args.warmup, objective, args.device)

        def stage(r: int) -> float:  # a fresh run folder each time (a used one would resume)
            summary = train.run(cfg.model_copy(update={"out": f"{tmp}/run{r + 1}"}))
            return args.batch / summary["metrics"]["images_per_s"]

        names = ("plain loop, ambient objective", "plain loop, EDM objective", "Ray Train + DeepSpeed ZeRO-2, 1 worker")
        stats = timing.interleave(dict(zip(names, (plain("ambient"), plain("edm"), stage))), args.repeats)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    plain_ambient, plain_edm, ray_step = (stats[n] for n in names)
    n_params = sum(p.numel() for p in build_denoiser(model).parameters())
    print(
        f"train overhead: {args.size}x{args.size} grey, U-Net {n_params / 1e6:.2f}M params, batch {args.batch}, "
        f"{args.cpus} CPUs, device {args.device}, {args.steps} timed steps; "
        f"median of {args.repeats} interleaved rounds [min..max] after a warm-up round"
    )
    for st in (plain_ambient, plain_edm, ray_step):
        print(f"  {st.name:40s} {st.show(1000, 'ms/step')}  {args.batch / st.median:7.0f} images/s")
    a, b = timing.ratio(ray_step, plain_ambient), timing.ratio(plain_ambient, plain_edm)
    print(f"(a) Ray Train + DeepSpeed ZeRO-2 / plain loop: {a:.3f}  (ratio of medians; goal <= 1.10)")
    print(f"(b) ambient objective / plain EDM objective:  {b:.3f}  (ratio of medians; goal <= 1.03)")
    if not math.isfinite(ray_step.median):
        raise SystemExit("the train stage reported no images/s")


if __name__ == "__main__":
    main()
