"""Training throughput of the large-model presets: images/s, TFLOP/s and MFU, ZeRO-3 ÷ ZeRO-2, peak memory.

Per preset, the same training step (the ambient denoiser's forward at σ from EDM2's log-normal, a squared
error, backward, optimizer step, then the forced weight normalisation of the master weights) runs three
ways, each for ``--steps`` timed steps after ``--warmup`` untimed ones, in one run on the same device and
data:

- ``plain``: a baseline without DeepSpeed: the module in fp32, ``torch.autocast`` to bf16 on GPU (fp32 on
  CPU), ``torch.optim.Adam`` (fused on GPU), forced normalisation on the whole weights;
- ``zero2`` and ``zero3``: ambient-ray's path, ``deepspeed.initialize`` with the engine's own config
  (:func:`ambient_ray.train.engine.deepspeed_config`: bf16 on GPU, fp32 on CPU) and its
  :class:`~ambient_ray.train.engine.ForcedWeightNorm` post-step hook, on ``--world`` processes
  (``torch.multiprocessing``; NCCL on GPUs, gloo on CPU), micro-batch ``--batch`` each.

Printed per preset: parameters, model FLOPs per image (a multiply-add is 2 FLOPs, counted on the meta
device by :mod:`ambient_ray.train.perf`; EDM2's paper counts it as 1), step time, images/s, TFLOP/s, MFU
against the device's dense bf16 peak (GPU only), peak memory per process, and the ratios zero2 ÷ plain
(images/s of the whole machine: ``--world`` processes against one) and zero3 ÷ zero2 (step time). Where
:mod:`ambient_ray.train.planner` exists, its predicted model-state bytes per GPU are printed beside the
measured peak.

    python benchmarks/model_throughput.py [--presets edm2-tiny,edm2-xs] [--batch 4] [--steps 5] [--warmup 2]
        [--world 1] [--resolution 64 --channels 4 --label-dim 1000] [--checkpoint-blocks]

Defaults: on CPU ``edm2-tiny`` at 32x32x4 (seconds); on GPU every EDM2 preset at the paper's 64x64x4 with
1000 classes and batch 32 per GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import time

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(preset: str, args):
    from ambient_ray.models import edm2

    cfg = edm2.EDM2Config(
        preset=preset,
        img_resolution=args.resolution,
        in_channels=args.channels,
        label_dim=args.label_dim,
        checkpoint_blocks=args.checkpoint_blocks,
    )
    return cfg, edm2.build_denoiser(cfg)


def batch(cfg, n: int, device, g: torch.Generator):
    x = torch.randn(n, cfg.in_channels, cfg.img_resolution, cfg.img_resolution, generator=g).to(device)
    sigma = torch.exp(torch.randn(n, generator=g) * 1.0 - 0.4).to(device)
    labels = torch.randint(0, cfg.label_dim, (n,), generator=g).to(device) if cfg.label_dim else None
    return x, sigma, labels


def loss_of(net, x, sigma, labels):
    noisy = x + sigma.view(-1, 1, 1, 1) * torch.randn_like(x)
    d, u = net(noisy, sigma, labels, return_logvar=True)
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    per = w * (d.float() - x).square().mean(dim=(1, 2, 3))
    return (per / u.reshape(-1).exp() + u.reshape(-1)).mean()


def timed(step, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> float:
    from ambient_ray.train.perf import peak_memory

    rss, cuda = peak_memory(device).tolist()
    return cuda if device.type == "cuda" else rss


def plain(preset: str, args, device) -> dict:
    """The baseline: fp32 module, autocast bf16 on GPU, torch Adam, forced normalisation of whole weights."""
    from ambient_ray.models import edm2

    torch.manual_seed(0)
    cfg, net = build(preset, args)
    net = net.to(device).train()
    edm2.force_normalize_(net)
    fused = device.type == "cuda"
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=fused)
    g = torch.Generator().manual_seed(1)
    data = [batch(cfg, args.batch, device, g) for _ in range(2)]
    k = [0]

    def step():
        x, s, c = data[k[0] % 2]
        k[0] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_of(net, x, s, c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        edm2.force_normalize_(net)

    reset_peak(device)
    seconds = timed(step, args.steps, args.warmup, device)
    return {"seconds": seconds, "peak": peak_bytes(device)}


def deepspeed_worker(rank: int, world: int, port: int, preset: str, stage: int, args, out: str) -> None:
    """One rank of the ZeRO runs: the engine's DeepSpeed config and forced-normalisation hook."""
    import types

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    import deepspeed

    from ambient_ray.models import edm2
    from ambient_ray.train.engine import EngineConfig, ForcedWeightNorm, deepspeed_config

    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)
    cfg, net = build(preset, args)
    edm2.force_normalize_(net)
    ecfg = EngineConfig(data="-", out="-", batch_size=args.batch, zero_stage=stage, optim=dict(grad_clip=0))
    params = [p for p in net.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.99))
    engine, *_ = deepspeed.initialize(
        model=net, model_parameters=params, optimizer=opt, config=deepspeed_config(ecfg, bf16=cuda)
    )
    w = types.SimpleNamespace(zero3=stage == 3, device=device, world=world)
    hook = ForcedWeightNorm(w, edm2.mp_weights(engine.module))
    g = torch.Generator().manual_seed(1 + rank)
    data = [batch(cfg, args.batch, device, g) for _ in range(2)]
    k = [0]

    def step():
        x, s, c = data[k[0] % 2]
        k[0] += 1
        engine.backward(loss_of(engine, x, s, c))
        engine.step()
        hook(w)

    reset_peak(device)
    seconds = timed(step, args.steps, args.warmup, device)
    t = torch.tensor([seconds, peak_bytes(device)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"seconds": float(t[0]), "peak": float(t[1])}, f)
    torch.distributed.destroy_process_group()


def zero(preset: str, stage: int, args) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        mp.spawn(deepspeed_worker, args=(args.world, free_port(), preset, stage, args, out), nprocs=args.world)
        with open(out) as f:
            return json.load(f)


def planned_bytes(preset: str, stage: int, args) -> float | None:
    """The planner's model-state bytes per GPU, where the planner exists (None otherwise)."""
    try:
        from ambient_ray.train import planner
    except ImportError:
        return None
    fn = getattr(planner, "model_state_bytes", None)
    if fn is None:
        return None
    try:
        return float(
            fn(preset=preset, stage=stage, world=args.world, bf16=torch.cuda.is_available(), **interface(args))
        )
    except TypeError:
        return None


def interface(args) -> dict:
    return {"img_resolution": args.resolution, "in_channels": args.channels, "label_dim": args.label_dim}


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--presets",
        default="edm2-xs,edm2-s,edm2-m,edm2-l,edm2-xl,edm2-xxl" if gpu else "edm2-tiny",
        help="comma-separated EDM2 presets",
    )
    ap.add_argument("--batch", type=int, default=32 if gpu else 8, help="micro-batch per process")
    ap.add_argument("--steps", type=int, default=10 if gpu else 20)
    ap.add_argument("--warmup", type=int, default=3 if gpu else 5)
    ap.add_argument("--world", type=int, default=torch.cuda.device_count() if gpu else 2, help="DeepSpeed processes")
    ap.add_argument("--resolution", type=int, default=64 if gpu else 32)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--label-dim", type=int, default=1000 if gpu else 10)
    ap.add_argument("--checkpoint-blocks", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--skip-plain", action="store_true")
    args = ap.parse_args()

    from ambient_ray.models import edm2, registry
    from ambient_ray.train import perf

    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if gpu else "CPU"
    peak = perf.peak_tflops(name) if gpu else None
    print(
        f"model throughput on {name} (peak bf16 {peak or '-'} TFLOP/s), {args.resolution}x{args.resolution}x"
        f"{args.channels}, {args.label_dim} classes, batch {args.batch} per process, {args.world} DeepSpeed "
        f"processes, {'bf16' if gpu else 'fp32'}{', activation checkpointing' if args.checkpoint_blocks else ''}"
    )
    for preset in args.presets.split(","):
        cfg = edm2.EDM2Config(preset=preset, **interface(args))
        meta = {"kind": "denoiser", "arch": "edm2", "model": cfg.model_dump()}
        costs = perf.count(lambda: registry.build(meta), perf.denoiser_inputs(cfg))
        print(
            f"{preset}: {costs.parameters / 1e6:.1f}M parameters, {costs.flops_forward / 1e9:.1f} GFLOP forward, "
            f"{costs.flops_train / 1e9:.1f} GFLOP per trained image"
        )
        rows = {}
        if not args.skip_plain:
            rows["plain"] = (plain(preset, args, device), 1)
        for stage in (2, 3):
            rows[f"zero{stage}"] = (zero(preset, stage, args), args.world)
        for label, (r, procs) in rows.items():
            ips = args.batch * procs / r["seconds"]
            tf = perf.achieved(costs, ips, 1.0, procs, peak)
            mfu = f"  MFU {tf['mfu'] * 100:5.1f}%" if "mfu" in tf else ""
            planned = planned_bytes(preset, int(label[-1]), args) if label.startswith("zero") else None
            plan = f"  (planner: model states {planned / 2**30:.2f} GiB)" if planned else ""
            print(
                f"  {label:6s} step {r['seconds'] * 1e3:8.1f} ms  {ips:8.1f} images/s  "
                f"{tf.get('tflop_per_s', 0):7.3f} TFLOP/s{mfu}  peak {r['peak'] / 2**30:6.2f} GiB{plan}"
            )
        if "plain" in rows:  # the same machine training images: ours on `world` processes, plain on one
            ips = {k: args.batch * p / r["seconds"] for k, (r, p) in rows.items()}
            print(f"  ratio zero2 / plain images/s: {ips['zero2'] / ips['plain']:.2f} ({args.world} processes vs 1)")
        z3 = rows["zero3"][0]["seconds"] / rows["zero2"][0]["seconds"]
        print(f"  ratio zero3 / zero2 step time: {z3:.2f}")
        if math.isnan(z3):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
