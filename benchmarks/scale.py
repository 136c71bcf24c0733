"""Billion-parameter training on one machine: the train stage's own worker at real preset sizes, its peak memory
per rank measured beside the planner's prediction for the same configuration.

CPU path (the default; 2 CPU workers of a local Ray cluster, gloo): for each preset, one Ray Train run of the
engine's :class:`~ambient_ray.train.worker.Worker` under ZeRO-3 with optimizer and parameter offload
(``offload_optimizer``, ``offload_params``), the network built partitioned (``deepspeed.zero.Init``) at the preset's
size (at the image side ``--resolution``; activation checkpointing on), and on it in turn: the build; ``--steps``
full training steps (forward, backward, the optimizer step, EDM2's forced weight normalisation, the EMA update;
DeepSpeed prefetches and keeps gathered layers from the second step on); a checkpoint save (DeepSpeed's
partitions, the raw weights and
the EMA gathered a parameter at a time); a restore from it; then, on the driver, the weight export (the copy to
``OUT/model/``). Each rank's peak RSS per phase is the kernel's high-water mark (``VmHWM`` in /proc/self/status,
reset through /proc/self/clear_refs before each phase), beside the planner's per-rank bytes
(:func:`ambient_ray.train.planner.parts_bytes`: model states on the device and in host memory, buffers, the EMA;
:func:`~ambient_ray.train.planner.activations`, checkpointed) plus what the planner cannot see, the process before the
build (Python, torch, DeepSpeed, Ray: measured, ``base``). On a CPU machine device and host memory are the same RSS,
so the prediction is their sum. Goal: measured ÷ planned within 10 % at every phase's peak.

GPU path (``--gpu``, one CUDA device, one worker): ``edm2-xxl`` and ``microdit-xl-2`` in bf16 under ZeRO-3 on the
GPU, ``--gpu-steps`` steps at the planner's micro-batch, MFU (the planner's FLOPs per image × 3, over the step time
and the device's bf16 peak) and ``torch.cuda.max_memory_allocated`` beside the planner's per-GPU total.

    python benchmarks/scale.py [--presets edm2-m,edm2-l] [--workers 2] [--steps 2] [--precision bf16]
        [--resolution 32] [--batch 1] [--reduce-bucket 50000000] [--live-params 50000000] [--tmp DIR] [--keep]
    python benchmarks/scale.py --gpu [--presets edm2-xxl,microdit-xl-2] [--gpu-batch 32] [--gpu-steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

GIB = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hwm() -> int:
    """This process's peak RSS since the last :func:`reset` (bytes)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS back to the current RSS


def engine_config(args, out: str, gpu: bool = False):
    from ambient_ray.train.config import EngineConfig

    return EngineConfig(
        data="-",
        out=out,
        steps=args.gpu_steps if gpu else 1,
        batch_size=args.gpu_batch if gpu else args.batch,
        zero_stage=3,
        offload_optimizer=not gpu,
        offload_params=not gpu,
        precision="bf16" if gpu else args.precision,
        use_gpu=gpu,
        ema="warmup",
        reduce_bucket_size=None if gpu else args.reduce_bucket,
        zero3_live_parameters=None if gpu else args.live_params,
        optim=dict(name="adamw", lr=1e-4, warmup_steps=0, decay="none"),
        mlflow=dict(enabled=False),
    )


def preset(name: str, resolution: int | None) -> dict:
    from ambient_ray.train import planner

    return planner.preset_meta(name, img_resolution=resolution, checkpoint_blocks=True)


def step(w, meta: dict, batch: int, g: torch.Generator) -> float:
    """One training step of the export part: the denoising error of the arch's example inputs (random), backward,
    the optimizer step, the post-step hooks (EDM2's forced weight normalisation) and the EMA update."""
    from ambient_ray.models.registry import config_of, example_inputs

    w.begin_step()
    inputs = [t.to(w.device) for t in example_inputs(config_of(meta), batch, g)]
    loss = (w.engine(*inputs).float() - inputs[0].float()).square().mean()
    w.engine.backward(loss)
    w.engine.step()
    w.update(w.main)
    w.end_step()
    return float(loss)


def cpu_worker(config: dict) -> None:
    """A Ray Train worker: the phases of one preset, each rank's peak RSS per phase to ``config['result']``."""
    import ray.train
    import torch.distributed as dist

    from ambient_ray.models import registry
    from ambient_ray.train.worker import Worker

    meta, cfg = config["meta"], engine_config(argparse.Namespace(**config["args"]), config["out"])
    peaks, seconds = {}, {}
    dist.barrier()
    reset()
    base = hwm()

    def phase(name, fn):
        dist.barrier()
        reset()
        t = time.perf_counter()
        out = fn()
        dist.barrier()
        peaks[name], seconds[name] = hwm(), time.perf_counter() - t
        with open(os.path.join(config["out"], f"progress-{dist.get_rank()}.txt"), "a") as f:
            f.write(f"{name} {peaks[name] / GIB:.2f} GiB {seconds[name]:.1f} s\n")
        return out

    torch.manual_seed(0)
    w = phase("build", lambda: Worker(cfg, lambda: registry.build(meta), meta, {}))
    g = torch.Generator().manual_seed(w.rank)
    # the first step traces the order of the layers; from the second on DeepSpeed prefetches and keeps layers
    loss = phase("step", lambda: [step(w, meta, cfg.batch_size, g) for _ in range(config["args"]["steps"])][-1])
    ckpt = os.path.join(config["out"], "checkpoint")
    phase("save", lambda: w.save(ckpt))
    phase("restore", lambda: w.restore(ray.train.Checkpoint.from_directory(ckpt)))
    ranks = [None] * w.world
    dist.all_gather_object(ranks, {"base": base, "peaks": peaks, "seconds": seconds, "loss": loss, "step": w.step})
    if w.rank == 0:
        with open(config["result"], "w") as f:
            json.dump(ranks, f)


def planned(meta: dict, args, world: int, base: int, gpu: bool = False) -> dict[str, int]:
    """The planner's per-rank bytes at each phase's peak (plus ``base``, the process before the build): the build
    (which ends with DeepSpeed's initialize, allocating every state) all but the activations; the step, the save (a
    parameter at a time) and the restore (memory-mapped) everything the step holds."""
    from ambient_ray.train import planner

    c = planner.counts(planner.meta_model(meta))
    cfg = engine_config(args, "-", gpu)
    prec = cfg.precision
    pb = planner.parts_bytes(
        planner.task_parts(c),
        3,
        world,
        prec,
        "warmup",
        cfg.offload_optimizer,
        cfg.offload_params,
        cfg.reduce_bucket_size or planner.REDUCE_BUCKET,
        cfg.zero3_live_parameters or planner.MAX_LIVE,
    )
    act = planner.activations(meta, cfg.batch_size, prec).checkpointed
    full = base + pb.total + pb.cpu + act
    # the build ends with DeepSpeed's initialize, which allocates every model state and buffer but Adam's (lazily,
    # at the first step) and the offloaded gradient partition
    build = full - act - (8 * c.params // world if cfg.offload_optimizer else 0)
    return {"build": build, "step": full, "save": full, "restore": full}


def run_cpu(args) -> list[dict]:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ambient_ray.io import checkpoint
    from ambient_ray.train import planner

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".venv", "torch_extensions"))  # CPU Adam
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Ray's memory monitor counts the checkpoint's dirty page cache as used and kills a worker at 95 % of the
    # machine; the kernel writes those pages back under pressure instead
    os.environ.setdefault("RAY_memory_usage_threshold", "0.99")
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    rows = []
    for name in args.presets.split(","):
        meta = preset(name, args.resolution)
        c = planner.counts(planner.meta_model(meta))
        root = tempfile.mkdtemp(prefix=f"scale-{name}-", dir=args.tmp)
        print(
            f"{name}: {c.params:,} parameters, {args.workers} CPU workers, ZeRO-3, optimizer and parameter "
            f"offload, {args.precision}, {meta['model']['img_resolution']}² x batch {args.batch}",
            flush=True,
        )
        t = time.perf_counter()
        try:
            TorchTrainer(
                cpu_worker,
                train_loop_config={"meta": meta, "args": vars(args), "out": root, "result": f"{root}/result.json"},
                scaling_config=ray.train.ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
                torch_config=TorchConfig(backend="gloo"),
                run_config=ray.train.RunConfig(storage_path=f"{root}/ray", name="scale"),
            ).fit()
        except Exception as e:  # a preset that does not fit: say so, go on with the next
            print(f"  {name}: failed after {time.perf_counter() - t:.0f} s: {type(e).__name__}: {str(e)[:300]}")
            rows.append({"preset": name, "failed": f"{type(e).__name__}"})
            shutil.rmtree(root, ignore_errors=True)
            continue
        with open(f"{root}/result.json") as f:
            ranks = json.load(f)
        reset()
        t_export = time.perf_counter()
        checkpoint.export_weights(f"{root}/out", f"{root}/checkpoint")
        export = {"peak": hwm(), "seconds": time.perf_counter() - t_export}
        for r, got in enumerate(ranks):
            plan = planned(meta, args, args.workers, got["base"])
            for ph, peak in got["peaks"].items():
                rows.append(
                    {
                        "preset": name,
                        "params": c.params,
                        "rank": r,
                        "phase": ph,
                        "measured": peak,
                        "planned": plan[ph],
                        "seconds": got["seconds"][ph],
                        "base": got["base"],
                        "loss": got["loss"],
                    }
                )
        rows.append(
            {
                "preset": name,
                "params": c.params,
                "rank": "driver",
                "phase": "export",
                "measured": export["peak"],
                "planned": None,
                "seconds": export["seconds"],
            }
        )
        print(table([r for r in rows if r["preset"] == name]), flush=True)
        print(f"  ({time.perf_counter() - t:.0f} s in all)", flush=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    ray.shutdown()
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        f"  {'rank':>6s} {'phase':>8s} {'measured GiB':>13s} {'planned GiB':>12s} {'ratio':>6s} {'seconds':>8s}"
        "  (planned: the process before the build, measured, + the planner's bytes)"
    ]
    for r in rows:
        if "failed" in r:
            continue
        plan = "-" if r["planned"] is None else f"{r['planned'] / GIB:.2f}"
        ratio = "-" if r["planned"] is None else f"{r['measured'] / r['planned']:.3f}"
        base = f"  base {r['base'] / GIB:.2f}" if r.get("base") and r["phase"] == "build" else ""
        lines.append(
            f"  {r['rank']!s:>6s} {r['phase']:>8s} {r['measured'] / GIB:13.2f} {plan:>12s} {ratio:>6s} "
            f"{r['seconds']:8.1f}{base}"
        )
    return "\n".join(lines)


def run_gpu(args) -> list[dict]:
    """One GPU, one worker: bf16 ZeRO-3 steps of each preset, MFU and peak GPU memory against the planner."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ambient_ray.train import perf, planner

    ray.init(include_dashboard=False, log_to_driver=True)
    rows = []
    for name in args.presets.split(","):
        meta = preset(name, None)
        root = tempfile.mkdtemp(prefix=f"scale-gpu-{name}-", dir=args.tmp)
        try:
            TorchTrainer(
                gpu_worker,
                train_loop_config={"meta": meta, "args": vars(args), "out": root, "result": f"{root}/result.json"},
                scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=True),
                torch_config=TorchConfig(backend="nccl"),
                run_config=ray.train.RunConfig(storage_path=f"{root}/ray", name="scale-gpu"),
            ).fit()
        except Exception as e:
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
            continue
        with open(f"{root}/result.json") as f:
            got = json.load(f)
        flops = 3 * planner.flops_per_image(meta) * (4 / 3 if meta["model"].get("checkpoint_blocks") else 1)
        mfu = flops * got["images_per_s"] / (perf.peak_tflops(got["device"]) * 1e12)
        plan = planned(meta, args, 1, 0, gpu=True)["step"]
        print(
            f"{name} on {got['device']}: {got['images_per_s']:.1f} images/s, MFU {mfu:.1%}; peak GPU memory "
            f"{got['peak'] / GIB:.2f} GiB, planner {plan / GIB:.2f} GiB (ratio {got['peak'] / plan:.3f})",
            flush=True,
        )
        rows.append({"preset": name, **got, "mfu": mfu, "planned": plan})
    return rows


def gpu_worker(config: dict) -> None:
    from ambient_ray.models import registry
    from ambient_ray.train.worker import Worker

    args = argparse.Namespace(**config["args"])
    meta, cfg = config["meta"], engine_config(args, config["out"], gpu=True)
    torch.manual_seed(0)
    w = Worker(cfg, lambda: registry.build(meta), meta, {})
    g = torch.Generator().manual_seed(0)
    step(w, meta, cfg.batch_size, g)  # warm-up (kernels, the gathered layers' buffers)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.gpu_steps):
        step(w, meta, cfg.batch_size, g)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    got = {
        "images_per_s": args.gpu_steps * cfg.batch_size / seconds,
        "peak": torch.cuda.max_memory_allocated(),
        "device": torch.cuda.get_device_name(),
    }
    with open(config["result"], "w") as f:
        json.dump(got, f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--presets", default=None, help="comma-separated presets (CPU: edm2-m,edm2-l; GPU: edm2-xxl,microdit-xl-2)"
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="training steps on CPU (the peak is the second's)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--resolution", type=int, default=32, help="image (latent) side on CPU")
    ap.add_argument("--batch", type=int, default=1, help="micro-batch per CPU worker")
    ap.add_argument("--reduce-bucket", type=int, default=50_000_000, help="reduce_bucket_size on CPU (elements)")
    ap.add_argument("--live-params", type=int, default=50_000_000, help="zero3_live_parameters on CPU (elements)")
    ap.add_argument("--tmp", default=None, help="folder for the checkpoints (tens of GB at these sizes)")
    ap.add_argument("--keep", action="store_true", help="keep each preset's checkpoint and export")
    ap.add_argument("--gpu", action="store_true", help="the GPU path: one CUDA device")
    ap.add_argument("--gpu-batch", type=int, default=32)
    ap.add_argument("--gpu-steps", type=int, default=6)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    args.presets = args.presets or ("edm2-xxl,microdit-xl-2" if args.gpu else "edm2-m,edm2-l")
    rows = run_gpu(args) if args.gpu else run_cpu(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
