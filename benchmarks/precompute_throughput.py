"""Precompute throughput: the precompute stage (Ray Data actor pool) vs a plain batched loop over the same encoders.

Same data (built-in digits upscaled by the corrupt stage, several Parquet shards), same encoders (a random
diffusers ``AutoencoderKL`` big enough that encoding dominates, as with a real VAE, and the tiny random
``CLIPTextModel`` of the tests), same batch size, same device. Timed from the Parquet shards on disk to
the latents (and caption embeddings) written back:

(a) **plain**: one process, ``torch.set_num_threads(T)``, the encoders loaded once before the rounds (the
    same ``ImageEncoder`` / ``TextEncoder`` objects every round); per shard: read it with pyarrow, decode
    the PNGs, encode batches of ``--batch`` images and captions, and write the input columns plus
    ``latent``, ``caption_emb``, ``caption_mask`` back with pyarrow (zstd, as the stage). No Ray, no
    validation, no quarantine, no markers: the same work minus the framework.
(b) **precompute**: ``precompute.run`` end to end into a fresh ``out`` each round (nothing skipped): planning
    (the encoders loaded and fingerprinted once in the driver), the actor pool (each actor loads the
    encoders, then encodes one shard per call: decode, encode, validate, write Parquet and a marker), then
    the measured normalisation (``latents.json``). Ray itself is started once before the rounds.

images/s of (b) is rows / wall seconds of ``run()`` (what a user waits for; the ratio uses it); the stage's
own ``images_per_s`` (rows / its ``seconds``: the actor pool only, without the planning and the final
normalisation pass) is printed beside it. Also printed: where run()'s time goes (planning + normalisation,
the shards' own seconds from the done markers, and the rest of the pool's time: actor start-up, i.e. a fresh
worker importing torch/diffusers/transformers and loading the encoders, and scheduling), the same start-up
measured in a fresh Python process, and the steady state (rows / shard work per actor) with the row count
from which the end-to-end ratio would reach 0.9 at that fixed cost.

Two resource splits of the same cores are compared (both with ``--cpus`` threads in all):

- ``actors`` (the headline): the stage's default on a ``--cpus``-CPU cluster, ``--cpus`` actors x 1 CPU
  (1 torch thread each), against the loop with ``--cpus`` threads: how a user runs each side.
- ``threads``: 1 actor x ``--cpus`` CPUs (``--cpus`` torch threads), against the same loop: the very same
  torch work on each side, so the ratio isolates the framework's cost.

With ``--device cuda`` both sides encode on the GPU (the stage's actors take ``--num-gpus`` of it each,
fractions share it; the loop is one process). ``--no-ray`` (any device) times the actor's own per-shard
function (``PrecomputeActor.shard``: decode, encode, validate, write, marker) called in this process instead
of ``run()``: the per-shard cost of the framework without Ray's (for a GPU machine without Ray, with
``--data`` made elsewhere).

    python benchmarks/precompute_throughput.py [--repeat 2] [--limit 3000] [--shard-size 250] [--size 32]
        [--blocks 32,64,64] [--layers 2] [--batch 32] [--cpus 2] [--splits actors,threads] [--repeats 3]
        [--device cuda --num-gpus 0.5] [--no-ray] [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import timing  # benchmarks/timing.py, beside this script
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.encoders_fixtures


def make_data(root: str, repeat: int, limit: int | None, size: int, shard_size: int, name: str = "data") -> str:
    from ambient_ray.data.sources import SourceConfig
    from ambient_ray.stages.corrupt import CorruptConfig
    from ambient_ray.stages.corrupt import run as corrupt_run

    out = os.path.join(root, name)
    corrupt_run(
        CorruptConfig(
            out=out,
            source=SourceConfig(dataset="digits", repeat=repeat, limit=limit, image_size=size),
            corruptions=["blur:sigma=1"],
            clean_fraction=0.1,
            shard_size=shard_size,
            preview=0,
        ),
        progress=False,
    )
    return out


def make_vae(folder: str, blocks: tuple[int, ...], layers: int, size: int) -> str:
    """A random AutoencoderKL (RGB in, 4 latent channels, f = 2**(len(blocks)-1)) saved to ``folder``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=min(32, blocks[0]),
        sample_size=size,
    ).save_pretrained(folder)
    return folder


def shard_files(data: str) -> list[str]:
    d = os.path.join(data, "data")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".parquet"))


def plain(files: list[str], out: str, image, text, batch: int, threads: int, device: str) -> tuple[int, float]:
    """(rows, seconds) of the plain loop: read, decode, encode, write back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ambient_ray.data.images import decode_png

    torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    n = 0
    with torch.no_grad():
        for f in files:
            table = pq.read_table(f)
            imgs = table.column("image").to_pylist()
            caps = table.column("caption").to_pylist()
            lat, emb, mask = [], [], []
            for s in range(0, len(imgs), batch):
                x = np.stack([decode_png(b).transpose(2, 0, 1) for b in imgs[s : s + batch]])
                x = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).to(device)
                mean, std = image.encode(x)
                lat.append(torch.cat([mean, std], dim=1).cpu().numpy())
                e, m = text.encode([c or "" for c in caps[s : s + batch]])
                emb.append(e.cpu().numpy().astype(np.float16))
                mask.append(m.cpu().numpy().astype(np.uint8))
            for name, parts in (("latent", lat), ("caption_emb", emb), ("caption_mask", mask)):
                flat = np.concatenate(parts).reshape(table.num_rows, -1)
                table = table.append_column(
                    name, pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
                )
            pq.write_table(table, os.path.join(out, os.path.basename(f)), compression="zstd")
            n += table.num_rows
    if device == "cuda":
        torch.cuda.synchronize()
    return n, time.perf_counter() - t0


def stage_config(data, out, vae, clip, batch, actors, cpus_per_actor, num_gpus):
    from ambient_ray.stages.precompute import PrecomputeConfig

    return PrecomputeConfig(
        data=data,
        out=out,
        vae=vae,
        text_encoder=clip,
        batch_size=batch,
        concurrency=actors,
        num_cpus=cpus_per_actor,
        num_gpus=num_gpus,
    )


def stage(cfg) -> dict:
    """``run()`` end to end: rows, wall seconds, the stage's own seconds and its per-shard seconds."""
    from ambient_ray.io import shards
    from ambient_ray.stages import precompute

    t0 = time.perf_counter()
    s = precompute.run(cfg, progress=False)
    wall = time.perf_counter() - t0
    done = shards.done_all(os.path.join(cfg.out, "_done"), s["latents"]["fingerprint"])
    return {
        "rows": s["rows_in"],
        "wall": wall,
        "seconds": s["seconds"],
        "shards": [d["seconds"] for d in done.values()],
    }


def actor_direct(cfg, device: str) -> tuple[int, float]:
    """The actor's per-shard work in this process, without Ray (encoders loaded before the clock)."""
    from ambient_ray.data.metadata import data_dir, load_metadata
    from ambient_ray.io import storage
    from ambient_ray.stages import precompute

    files = storage.list_files(data_dir(cfg.data), (".parquet",))
    plan = precompute.make_plan(cfg, storage.normalize(cfg.out), files, load_metadata(cfg.data))
    actor = precompute.PrecomputeActor(plan)
    t0 = time.perf_counter()
    rows = sum(actor.shard(f, precompute._shard_name(f))["rows"] for f in files)
    if device == "cuda":
        torch.cuda.synchronize()
    return rows, time.perf_counter() - t0


def cold_start(vae: str, clip: str, device: str) -> float:
    """Seconds a fresh Python process takes to import the stage and load both encoders (each actor pays it)."""
    code = (
        "from ambient_ray.models import encoders\n"
        "from ambient_ray.models.encoders import image_encoder\n"
        f"image_encoder({vae!r}, None, 3, {device!r})\n"
        f"encoders.load_text_encoder({clip!r}, device={device!r})\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, capture_output=True)
    return time.perf_counter() - t0


def report(split: str, label: str, st: dict, runs: list[dict], actors: int, threads: int) -> float:
    """Print one split's figures; returns its ratio (run() wall)."""
    p, s = st["plain"], st["precompute"]
    own = [r["rows"] / r["seconds"] for r in runs]
    rows = runs[0]["rows"]
    ratio = timing.ratio(p, s)
    print(f"[{split}{' (headline)' if split == 'actors' else ''}] precompute {label} vs plain loop {threads} threads")
    for name, st1 in (("plain loop", p), ("precompute run() wall", s)):
        lo, hi = 1 / max(st1.values), 1 / min(st1.values)
        print(f"  {name:24s} {1 / st1.median:8.1f} images/s [{lo:.1f}..{hi:.1f}] spread {st1.spread:.1%}")
    print(
        f"  {'precompute images_per_s':24s} {float(np.median(own)):8.1f} images/s [{min(own):.1f}..{max(own):.1f}] "
        "(the stage's own figure: the actor pool only)"
    )
    print(f"  ratio precompute / plain (run() wall): {ratio:.3f}  (goal >= 0.9)")
    wall = float(np.median([r["wall"] for r in runs]))
    pool = float(np.median([r["seconds"] for r in runs]))
    work = float(np.median([sum(r["shards"]) / actors for r in runs]))
    per_shard = float(np.median([np.median(r["shards"]) for r in runs]))
    loop = p.median * rows
    print(
        f"  where run()'s {wall:.2f} s go (medians): plan + normalisation {wall - pool:.2f} s, actor pool "
        f"{pool:.2f} s = shard work {work:.2f} s per actor ({per_shard:.3f} s a shard of "
        f"{rows // len(runs[0]['shards'])} rows; from the done markers) + actor start-up and scheduling "
        f"{pool - work:.2f} s; the plain loop: {loop:.2f} s"
    )
    fixed, r_s, r_p = wall - work, rows / work, 1 / p.median
    line = f"  steady state (shard work only): {r_s:.1f} images/s, ratio {r_s / r_p:.3f}"
    if r_s > 0.9 * r_p:
        line += f"; with {fixed:.1f} s fixed per run(), ratio 0.9 from {fixed / (1 / (0.9 * r_p) - 1 / r_s):,.0f} rows"
    print(line)
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="tile the 1,797 built-in digits this many times")
    ap.add_argument("--limit", type=int, default=3000, help="then use the first N rows")
    ap.add_argument("--shard-size", type=int, default=250, help="rows per input shard")
    ap.add_argument("--size", type=int, default=32, help="image size (digits are upscaled to it)")
    ap.add_argument("--blocks", default="32,64,64", help="the VAE's block_out_channels (f = 2**(len-1))")
    ap.add_argument("--layers", type=int, default=2, help="the VAE's layers_per_block")
    ap.add_argument("--batch", type=int, default=32, help="images (and captions) per encoder call, both sides")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray cluster = threads of the plain loop")
    ap.add_argument("--splits", default="actors,threads", help="actors (N x 1 CPU) and/or threads (1 x N CPUs)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--num-gpus", type=float, default=0.5, help="with --device cuda: GPU per actor (fractions)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of every side, after an untimed one")
    ap.add_argument("--no-ray", action="store_true", help="(b) = the actor's shard function called directly")
    ap.add_argument("--data", help="an existing corrupt output to use (e.g. made elsewhere, for a machine without Ray)")
    args = ap.parse_args()
    blocks = tuple(int(b) for b in args.blocks.split(","))
    dev = args.device
    num_gpus = args.num_gpus if dev == "cuda" else 0.0
    root = tempfile.mkdtemp(prefix="precompute-bench-")
    t_start = time.perf_counter()
    try:
        from ambient_ray.models import encoders
        from ambient_ray.models.encoders import image_encoder
        from tests.encoders_fixtures import make_tiny_clip_text

        if not args.no_ray:  # Ray once, before everything (the corrupt stage joins it); its start-up is not timed
            from ambient_ray.io import ray_runtime

            gpus = {"num_gpus": 1} if dev == "cuda" else {}
            ray_runtime.ray_init(None, num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, **gpus)
        data = args.data or make_data(root, args.repeat, args.limit, args.size, args.shard_size)
        files = shard_files(data)
        vae = make_vae(os.path.join(root, "vae"), blocks, args.layers, args.size)
        clip = make_tiny_clip_text(os.path.join(root, "clip"))
        image = image_encoder(vae, None, 3, dev)  # the loop's encoders, loaded once
        text = encoders.load_text_encoder(clip, device=dev)
        import pyarrow.parquet as pq

        n_img = sum(pq.read_metadata(f).num_rows for f in files)
        print(
            f"{n_img} digits {args.size}x{args.size} (grey, fed to the VAE as RGB) in {len(files)} shards; "
            f"VAE AutoencoderKL blocks {blocks} x {args.layers} layers, f={image.factor}, "
            f"latent {image.latent_shape(1, args.size, args.size)} (mean and std stored); tiny CLIP text "
            f"(77 x 32); batch {args.batch}; device {dev}",
            flush=True,
        )
        counter = iter(range(1_000_000))

        def fresh(tag: str) -> str:
            return os.path.join(root, f"{tag}-{next(counter)}")

        def plain_side(r: int) -> float:  # seconds per image
            out = fresh("plain")
            n, t = plain(files, out, image, text, args.batch, args.cpus, dev)
            shutil.rmtree(out, ignore_errors=True)
            return t / n

        if args.no_ray:
            import ray

            ray.shutdown()  # the corrupt stage's in-process Ray, if it started one

            def direct_side(r: int) -> float:
                out = fresh("direct")
                cfg = stage_config(data, out, vae, clip, args.batch, 1, float(args.cpus), 1.0 if dev == "cuda" else 0)
                n, t = actor_direct(cfg, dev)
                shutil.rmtree(out, ignore_errors=True)
                return t / n

            st = timing.interleave({"plain": plain_side, "actor shard()": direct_side}, args.repeats)
            p, d = st["plain"], st["actor shard()"]
            print(f"plain loop             {1 / p.median:8.1f} images/s  ({p.show(1e3, 'ms/image')})")
            print(f"actor shard(), no Ray  {1 / d.median:8.1f} images/s  ({d.show(1e3, 'ms/image')})")
            print(f"ratio shard() / plain: {timing.ratio(p, d):.3f} (goal >= 0.9)")
            return

        cold = cold_start(vae, clip, dev)
        print(f"a fresh Python process importing the stage and loading both encoders: {cold:.2f} s", flush=True)
        splits = {  # name: (actors, CPUs per actor)
            "actors": (args.cpus if dev == "cpu" else max(1, int(1 / num_gpus)), 1.0),
            "threads": (1, float(args.cpus)),
        }
        results = []
        for split in args.splits.split(","):
            actors, per = splits[split]
            runs: list[dict] = []

            def stage_side(r: int, actors=actors, per=per, runs=runs, split=split) -> float:
                out = fresh(f"stage-{split}")
                res = stage(stage_config(data, out, vae, clip, args.batch, actors, per, num_gpus))
                if r >= 0:
                    runs.append(res)
                shutil.rmtree(out, ignore_errors=True)
                return res["wall"] / res["rows"]

            label = f"{actors} actor{'s' if actors > 1 else ''} x {per:g} CPU" + (
                f" {num_gpus:g} GPU" if num_gpus else ""
            )
            print(f"split '{split}': precompute {label} vs plain loop {args.cpus} threads", flush=True)
            st = timing.interleave({"plain": plain_side, "precompute": stage_side}, args.repeats)
            results.append((split, label, st, runs, actors))
        print(f"\nimages/s: median [min..max] of {args.repeats} interleaved rounds after an untimed one each")
        for split, label, st, runs, actors in results:
            report(split, label, st, runs, actors, args.cpus)
        print(f"(the whole benchmark: {time.perf_counter() - t_start:.0f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
