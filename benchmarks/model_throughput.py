"""Training throughput of the large-model presets: images/s, TFLOP/s and MFU, ZeRO-3 ÷ ZeRO-2, peak memory.

Per preset, the same training step (the ambient denoiser's forward at σ from EDM2's log-normal, a squared
error, backward, optimizer step, then for EDM2 the forced weight normalisation of the master weights) runs three
ways, each for ``--steps`` timed steps after ``--warmup`` untimed ones, in one run on the same device and
data. The MoE DiT presets (``dit-tiny``, ``microdit-xl-2``) take the registry's example inputs (caption tokens
and their mask) and train with ``--mask-ratio`` of their patches dropped (default 0.75, MicroDiT's
pretraining; the loss on the kept patches only); their FLOPs are those of the masked step (each expert on the
tokens it takes), so their MFU is counted on the active parameters:

- ``plain``: a baseline without DeepSpeed: the module in fp32, ``torch.autocast`` to bf16 on GPU (fp32 on
  CPU), ``torch.optim.Adam`` (fused on GPU), forced normalisation on the whole weights;
- ``zero2`` and ``zero3``: ambient-ray's path, ``deepspeed.initialize`` with the engine's own config
  (:func:`ambient_ray.train.parts.deepspeed_config`: bf16 on GPU, fp32 on CPU) and its
  :class:`~ambient_ray.train.weight_norm.ForcedWeightNorm` post-step hook, on ``--world`` processes
  (``torch.multiprocessing``; NCCL on GPUs, gloo on CPU), micro-batch ``--batch`` each.

Printed per preset: parameters (and active ones, and kept tokens per image, for the DiT), model FLOPs per
image (a multiply-add is 2 FLOPs, counted on the meta device by :mod:`ambient_ray.train.perf`; EDM2's paper
counts it as 1), step time, images/s, TFLOP/s, MFU against the device's dense bf16 peak (GPU only), peak memory
per process, and the ratios zero2 ÷ plain (images/s of the whole machine: ``--world`` processes against one)
and zero3 ÷ zero2 (step time). Beside the measured peak, :mod:`ambient_ray.train.planner`'s prediction for
that stage (model states, DeepSpeed's buffers and activations per GPU; no EMA here). On CPU the peak is the
process's RSS (the libraries included), on GPU ``torch.cuda.max_memory_allocated``.

    python benchmarks/model_throughput.py [--presets edm2-tiny,dit-tiny] [--batch 4] [--steps 5] [--warmup 2]
        [--world 1] [--resolution 64 --channels 4 --label-dim 1000] [--mask-ratio 0.75] [--checkpoint-blocks]

Defaults: on CPU ``edm2-tiny`` and ``dit-tiny`` at 32x32x4 (seconds); on GPU every EDM2 preset at the paper's
64x64x4 with 1000 classes and batch 32 per GPU, and ``microdit-xl-2`` at 256² (32x32x4 latents, 77 x 1024
caption tokens) in bf16 with 75% masking and batch 128 per GPU (the planner's micro-batch for 8 x 80 GB).
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


def arch_of(preset: str) -> str:
    from ambient_ray.train.planner import resolve

    return resolve(preset)


def model_config(preset: str, args):
    """The preset's model config at the benchmark's interface: EDM2 at --resolution/--channels/--label-dim; the
    DiT at --resolution (default 32: 256² through an f=8 VAE) and --channels, its preset's caption width."""
    from ambient_ray.models import dit, edm2

    if arch_of(preset) == "dit":
        return dit.DiTConfig(
            preset=preset,
            img_resolution=args.resolution or 32,
            in_channels=args.channels,
            checkpoint_blocks=args.checkpoint_blocks,
        )
    return edm2.EDM2Config(
        preset=preset,
        img_resolution=args.resolution or (64 if torch.cuda.is_available() else 32),
        in_channels=args.channels,
        label_dim=args.label_dim,
        checkpoint_blocks=args.checkpoint_blocks,
    )


def meta_of(cfg) -> dict:
    return {"kind": "denoiser", "arch": cfg.arch, "model": cfg.model_dump(), "sigma_data": 0.5}


def mask_ratio(cfg, args) -> float:
    return (0.75 if args.mask_ratio is None else args.mask_ratio) if cfg.arch == "dit" else 0.0


def build(preset: str, args):
    from ambient_ray.models import registry

    cfg = model_config(preset, args)
    return cfg, registry.build(meta_of(cfg))


def batch(cfg, n: int, device, g: torch.Generator, args):
    """One micro-batch: (the network's inputs, the loss's pixel mask or None). EDM2: x, σ, labels; the DiT: the
    registry's example inputs (x, σ, caption tokens and mask, and with masking the kept patch indices)."""
    from ambient_ray.models import dit, registry

    sigma = torch.exp(torch.randn(n, generator=g) * 1.0 - 0.4)
    if cfg.arch == "dit":
        r = mask_ratio(cfg, args)
        x, _, captions, cmask, *keep = registry.example_inputs(cfg, n, g, mask_ratio=r)
        pixels = dit.patch_mask(keep[0], cfg.tokens(), cfg.patch, cfg.img_resolution).to(device) if keep else None
        return tuple(t.to(device) for t in (x, sigma, captions, cmask, *keep)), pixels
    x = torch.randn(n, cfg.in_channels, cfg.img_resolution, cfg.img_resolution, generator=g)
    labels = torch.randint(0, cfg.label_dim, (n,), generator=g).to(device) if cfg.label_dim else None
    return (x.to(device), sigma.to(device), labels), None


def loss_of(net, data):
    """EDM-weighted squared error at σ (EDM2: with its learned log-variance u; the DiT: on the kept patches)."""
    (x, sigma, *cond), pixels = data
    noisy = x + sigma.view(-1, 1, 1, 1) * torch.randn_like(x)
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    if pixels is None and len(cond) == 1:  # EDM2
        d, u = net(noisy, sigma, *cond, return_logvar=True)
        per = w * (d.float() - x).square().mean(dim=(1, 2, 3))
        return (per / u.reshape(-1).exp() + u.reshape(-1)).mean()
    err = (net(noisy, sigma, *cond).float() - x).square()
    if pixels is not None:
        err = err * pixels
        return (w * err.sum(dim=(1, 2, 3)) / (pixels.sum(dim=(1, 2, 3)) * x.shape[1])).mean()
    return (w * err.mean(dim=(1, 2, 3))).mean()


def normalizer(cfg):
    """EDM2's forced weight normalisation of a module (a no-op for the other archs)."""
    from ambient_ray.models import edm2

    return edm2.force_normalize_ if cfg.arch == "edm2" else (lambda net: None)


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
    """The baseline: fp32 module, autocast bf16 on GPU, torch Adam, (EDM2) forced normalisation of whole weights."""
    torch.manual_seed(0)
    cfg, net = build(preset, args)
    net = net.to(device).train()
    normalize = normalizer(cfg)
    normalize(net)
    fused = device.type == "cuda"
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=fused)
    g = torch.Generator().manual_seed(1)
    data = [batch(cfg, args.batch, device, g, args) for _ in range(2)]
    k = [0]

    def step():
        d = data[k[0] % 2]
        k[0] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_of(net, d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        normalize(net)

    reset_peak(device)
    seconds = timed(step, args.steps, args.warmup, device)
    return {"seconds": seconds, "peak": peak_bytes(device)}


def deepspeed_worker(rank: int, world: int, port: int, preset: str, stage: int, args, out: str) -> None:
    """One rank of the ZeRO runs: the engine's DeepSpeed config and (EDM2) forced-normalisation hook."""
    import types

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    import deepspeed

    from ambient_ray.models import edm2
    from ambient_ray.train.config import EngineConfig
    from ambient_ray.train.parts import deepspeed_config
    from ambient_ray.train.weight_norm import ForcedWeightNorm

    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)
    cfg, net = build(preset, args)
    normalizer(cfg)(net)
    ecfg = EngineConfig(data="-", out="-", batch_size=args.batch, zero_stage=stage, optim=dict(grad_clip=0))
    params = [p for p in net.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.99))
    engine, *_ = deepspeed.initialize(
        model=net, model_parameters=params, optimizer=opt, config=deepspeed_config(ecfg, bf16=cuda)
    )
    w = types.SimpleNamespace(zero3=stage == 3, device=device, world=world)
    hook = ForcedWeightNorm(w, edm2.mp_weights(engine.module)) if cfg.arch == "edm2" else (lambda w: None)
    g = torch.Generator().manual_seed(1 + rank)
    data = [batch(cfg, args.batch, device, g, args) for _ in range(2)]
    k = [0]

    def step():
        d = data[k[0] % 2]
        k[0] += 1
        engine.backward(loss_of(engine, d))
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


def planned(cfg, args) -> dict[int, int]:
    """The planner's bytes per GPU by ZeRO stage for this run (``--world`` ranks, ``--batch``, bf16 on GPU and fp32
    on CPU, the run's masking and checkpointing): model states, DeepSpeed's buffers, activations; no EMA."""
    from ambient_ray.train import planner

    meta = meta_of(cfg)
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    c = planner.counts(planner.meta_model(meta))
    act = planner.activations(meta, args.batch, precision, mask_ratio(cfg, args))
    a = act.checkpointed if args.checkpoint_blocks and act.checkpointed is not None else act.saved
    out = {}
    for stage in (2, 3):
        s = planner.model_states(c, stage, args.world, precision)
        out[stage] = s.gpu + s.buffers + a
    return out


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--presets",
        default="edm2-xs,edm2-s,edm2-m,edm2-l,edm2-xl,edm2-xxl,microdit-xl-2" if gpu else "edm2-tiny,dit-tiny",
        help="comma-separated EDM2 and DiT presets",
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="micro-batch per process (default: 32 on GPU, 128 for the DiT; 8 on CPU)",
    )
    ap.add_argument("--steps", type=int, default=10 if gpu else 20)
    ap.add_argument("--warmup", type=int, default=3 if gpu else 5)
    ap.add_argument("--world", type=int, default=torch.cuda.device_count() if gpu else 2, help="DeepSpeed processes")
    ap.add_argument("--resolution", type=int, default=None, help="latent side (default: EDM2 64 on GPU, else 32)")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--label-dim", type=int, default=1000 if gpu else 10)
    ap.add_argument("--checkpoint-blocks", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--mask-ratio", type=float, default=None, help="the DiT's share of patches dropped (0.75)")
    ap.add_argument("--skip-plain", action="store_true")
    args = ap.parse_args()

    from ambient_ray.train import perf

    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if gpu else "CPU"
    peak = perf.peak_tflops(name) if gpu else None
    batch_arg = args.batch
    print(
        f"model throughput on {name} (peak bf16 {peak or '-'} TFLOP/s), {args.world} DeepSpeed processes, "
        f"{'bf16' if gpu else 'fp32'}{', activation checkpointing' if args.checkpoint_blocks else ''}"
        + (f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if not gpu else "")
    )
    for preset in args.presets.split(","):
        cfg = model_config(preset, args)
        args.batch = batch_arg or ((128 if cfg.arch == "dit" else 32) if gpu else 8)
        side = cfg.img_resolution
        costs = perf.count_denoiser(meta_of(cfg), mask_ratio(cfg, args))
        where = f"{side}x{side}x{cfg.in_channels}"
        if cfg.arch == "dit":
            where += (
                f", captions {cfg.caption_tokens}x{cfg.caption_dim}, {mask_ratio(cfg, args):.0%} of patches masked "
                f"({costs.tokens_per_image} of {cfg.tokens()} tokens kept)"
            )
        else:
            where += f", {cfg.label_dim} classes"
        active = f" ({costs.active_parameters / 1e6:.1f}M active)" if costs.active_parameters else ""
        print(
            f"{preset} at {where}, batch {args.batch} per process: {costs.parameters / 1e6:.1f}M parameters{active}, "
            f"{costs.flops_forward / 1e9:.1f} GFLOP forward, {costs.flops_train / 1e9:.1f} GFLOP per trained image"
        )
        plan = planned(cfg, args)
        rows = {}
        if not args.skip_plain:
            rows["plain"] = (plain(preset, args, device), 1)
        for stage in (2, 3):
            rows[f"zero{stage}"] = (zero(preset, stage, args), args.world)
        for label, (r, procs) in rows.items():
            ips = args.batch * procs / r["seconds"]
            tf = perf.achieved(costs, ips, 1.0, procs, peak)
            mfu = f"  MFU {tf['mfu'] * 100:5.1f}%" if "mfu" in tf else ""
            stage = int(label[-1]) if label.startswith("zero") else None
            planner = f"  (planner {plan[stage] / 2**30:.2f} GiB)" if stage in plan else ""
            tokens = f"  {tf['tokens_per_s']:10.0f} tokens/s" if "tokens_per_s" in tf else ""
            print(
                f"  {label:6s} step {r['seconds'] * 1e3:8.1f} ms  {ips:8.1f} images/s{tokens}  "
                f"{tf.get('tflop_per_s', 0):7.3f} TFLOP/s{mfu}  peak {r['peak'] / 2**30:6.2f} GiB{planner}"
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
