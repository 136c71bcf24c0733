"""The precompute stage: images -> VAE latents and captions -> text embeddings, on a Ray Data actor pool.

``ambient-ray precompute --data URI --vae URI [--text-encoder URI] --out URI`` (``python -m jobs.precompute``).
One input shard per actor call; each actor loads the encoders once (weights from a local folder or an S3
prefix copied once to the node's cache, loaded offline: :mod:`ambient_ray.models.encoders`) on ``num_gpus``
of a GPU (fractions allowed) or on CPU. Every image is centre-cropped and resized to ``resolution``
(default: the data's), mapped to [-1, 1] and encoded; every caption is tokenised and embedded.

Outputs under OUT (every input column is kept):

- ``data/<shard>.parquet``: the input rows plus ``latent`` (float32 (2c, h, w): the latent distribution's
  mean, then its std, as EDM2 stores them, so training draws a fresh latent per use) and, with a text
  encoder, ``caption_emb`` ((T, D), ``emb_dtype``) and ``caption_mask`` (uint8 (T,), 1 on real tokens);
  the tensor columns carry their dtype and shape in the schema (:mod:`ambient_ray.data.schema`);
- ``quarantine/<shard>.parquet``: rows that could not be encoded (undecodable image, NaN/inf latent), with
  the reason; rows in = rows out + rows quarantined;
- MLflow: the config as params, the row counts and images/s as metrics, the fingerprints as tags,
  ``latents.json`` as an artifact;
- ``latents.json``: the encoders' URIs and fingerprints, the latent shape and downsampling factor, and the
  per-channel normalisation ``x = (z - shift) * scale`` that training applies and sampling undoes before
  decoding (measured over the data so that each channel has std ``latent_std``, as EDM2 rescales its
  latents, unless ``latent_shift``/``latent_scale`` are given; the identity for ``pixels``).

Resumable with the shard protocol (:mod:`ambient_ray.io.shards`): a shard's done-marker in ``OUT/_done``
carries the fingerprint of the encoders, resolution and data; a killed run redoes only unfinished shards
(each shard file is written whole, so nothing is duplicated), and another set of encoders into the same
``out`` is refused unless ``overwrite``. Wrong or unreadable weights are refused by name before any work.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError
from ambient_ray.data import schema
from ambient_ray.io import shards, storage, tracking
from ambient_ray.models.encoders import image_encoder
from ambient_ray.stages.actor_stage import ActorStage
from ambient_ray.stages.precompute_config import PrecomputeConfig
from ambient_ray.stages.results import PrecomputeResult, StageFailed

# ------------------------------------------------------------------------------ the plan


def make_plan(cfg: PrecomputeConfig, out: str, files: list[str], meta) -> dict:
    """Load the encoders once here (a wrong folder is refused by name before any work) and fix what the
    outputs depend on; ``fingerprint`` hashes it."""
    from ambient_ray.data.metadata import one_shape
    from ambient_ray.models import encoders

    if cfg.resolution is None:
        res, channels = one_shape(meta, cfg.data)
    else:  # any sizes: every image is centre-cropped and resized; one channel count
        chans = sorted(set(meta["channels"].tolist())) if "channels" in meta else []
        if len(chans) != 1:
            raise ValueError(f"images in {cfg.data} have {chans or 'unknown'} channels; corrupt with --channels first")
        res, channels = cfg.resolution, int(chans[0])
    image = image_encoder(cfg.vae, cfg.vae_subfolder, channels)
    c, f = image.latent_channels, image.factor
    if res % f:
        raise ConfigError(f"config key 'resolution': {res} is not a multiple of the VAE's downsampling factor {f}")
    text = encoders.load_text_encoder(cfg.text_encoder) if cfg.text_encoder else None
    if (cfg.latent_shift is None) != (cfg.latent_scale is None):
        raise ConfigError("config keys 'latent_shift' and 'latent_scale' go together")
    for key in ("latent_shift", "latent_scale"):
        v = getattr(cfg, key)
        if v is not None and len(v) not in (1, c):
            raise ConfigError(f"config key '{key}': {len(v)} values for {c} latent channels")
    plan = {
        "out": out,
        "vae": cfg.vae,
        "vae_subfolder": cfg.vae_subfolder,
        "vae_fingerprint": image.fingerprint,
        "text_encoder": cfg.text_encoder,
        "text_fingerprint": text.fingerprint if text else None,
        "resolution": res,
        "channels": channels,
        "latent_shape": [2 * c, res // f, res // f],
        "factor": f,
        "emb_shape": [text.max_length, text.dim] if text else None,
        "emb_dtype": cfg.emb_dtype,
        "files": [
            (shards.shard_name(u), storage.filesystem(u)[0].get_file_info(storage.filesystem(u)[1]).size) for u in files
        ],
    }
    plan["fingerprint"] = shards.fingerprint(plan | {"out": None})
    plan.update(
        batch_size=cfg.batch_size,
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        debug_fail_shard=cfg.debug_fail_shard,
    )
    return plan


def specs(plan: dict) -> list[schema.TensorSpec]:
    """The tensor columns this plan writes."""
    out = [schema.TensorSpec("latent", "float32", tuple(plan["latent_shape"]))]
    if plan["emb_shape"]:
        t, _ = plan["emb_shape"]
        out += [
            schema.TensorSpec("caption_emb", plan["emb_dtype"], tuple(plan["emb_shape"])),
            schema.TensorSpec("caption_mask", "uint8", (t,)),
        ]
    return out


# ------------------------------------------------------------------------------ the actors


def prepare(images: list[bytes], size: int, channels: int) -> tuple[dict[int, np.ndarray], list[str]]:
    """Decode, centre-crop and resize a shard's images to float (C, size, size) in [-1, 1]; the reason for
    each row that cannot be used ('' if fine)."""
    from ambient_ray.data.images import decode_png, resize_square

    arrays, errors = {}, []
    for i, img in enumerate(images):
        try:
            arr = decode_png(img)
        except Exception as e:
            errors.append(f"cannot decode image: {type(e).__name__}: {e}")
            continue
        if arr.ndim != 3 or arr.shape[2] != channels:
            errors.append(f"image has {arr.shape[-1] if arr.ndim == 3 else 1} channels, the data has {channels}")
            continue
        if arr.shape[:2] != (size, size):
            arr = resize_square(arr, size)
        arrays[i] = arr.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        errors.append("")
    return arrays, errors


class PrecomputeActor:
    """Ray Data actor: loads the encoders once, then encodes one input shard per call."""

    def __init__(self, plan: dict):
        from ambient_ray.models import encoders

        self.plan = plan
        self.device = "cuda" if plan["num_gpus"] > 0 and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(plan["num_cpus"])))
        self.image = image_encoder(plan["vae"], plan["vae_subfolder"], plan["channels"], self.device)
        self.text = (
            encoders.load_text_encoder(plan["text_encoder"], device=self.device) if plan["text_encoder"] else None
        )
        for enc, key, uri in ((self.image, "vae_fingerprint", "vae"), (self.text, "text_fingerprint", "text_encoder")):
            if enc is not None and enc.fingerprint != plan[key]:
                raise RuntimeError(f"the weights at {plan[uri]} changed since the run was planned")

    def __call__(self, batch: dict) -> dict:
        """One shard; a shard that fails is reported (not raised), so the others still finish."""
        src, name = str(batch["path"][0]), str(batch["name"][0])
        try:
            summary = self.shard(src, name)
        except Exception as e:
            summary = {"name": name, "rows": 0, "rows_out": 0, "quarantined": 0, "seconds": 0.0}
            summary.update(failed=f"{type(e).__name__}: {e}", stats={})
        return {k: np.array([json.dumps(v) if isinstance(v, dict) else v]) for k, v in summary.items()}

    @torch.no_grad()
    def shard(self, src: str, name: str) -> dict:
        t0 = time.perf_counter()
        p = self.plan
        if p.get("debug_fail_shard") == name:
            raise RuntimeError(f"debug_fail_shard={name}: planted failure")
        fs, path = storage.filesystem(src)
        table = pq.read_table(path, filesystem=fs)
        table = table.drop_columns([c for c in ("latent", "caption_emb", "caption_mask") if c in table.column_names])
        arrays, errors = prepare(table.column("image").to_pylist(), p["resolution"], p["channels"])
        n = table.num_rows
        latent = np.zeros((n, *p["latent_shape"]), np.float32)
        ok = [i for i, e in enumerate(errors) if not e]
        bs = p["batch_size"]
        for s in range(0, len(ok), bs):
            rows = ok[s : s + bs]
            x = torch.from_numpy(np.stack([arrays[i] for i in rows])).to(self.device)
            mean, std = self.image.encode(x)
            latent[rows] = torch.cat([mean, std], dim=1).float().cpu().numpy()
        cols = {"latent": latent}
        if self.text is not None:
            t, d = p["emb_shape"]
            caps = table.column("caption").to_pylist() if "caption" in table.column_names else [None] * n
            emb = np.zeros((n, t, d), p["emb_dtype"])
            mask = np.zeros((n, t), np.uint8)
            for s in range(0, n, bs):
                e, m = self.text.encode([c or "" for c in caps[s : s + bs]])
                emb[s : s + bs] = e.float().cpu().numpy().astype(p["emb_dtype"])
                mask[s : s + bs] = m.cpu().numpy().astype(np.uint8)
            cols.update(caption_emb=emb, caption_mask=mask)
        reasons = np.array(errors, dtype=object)
        usable = reasons == ""
        # the tensors as plain fixed-size lists: validate encodes them by their specs and quarantines a row
        # with NaN/inf or a wrong shape, naming the column
        encoded = table.filter(pa.array(usable))
        for spec in specs(p):
            flat = cols[spec.name][usable].reshape(int(usable.sum()), -1)
            encoded = encoded.append_column(
                spec.name, pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
            )
        good, bad = schema.validate(encoded, specs(p), where=src)
        failed = table.filter(pa.array(~usable))
        n_q = self.write(name, good, pa.concat_tables([quarantine_rows(failed, reasons[~usable], src), bad]))
        # per-channel sums of the latent mean and of mean² + std² (E[z²] of the drawn latent): the driver
        # turns them into the measured normalisation
        c = p["latent_shape"][0] // 2
        lat = schema.to_numpy(good.column("latent"), specs(p)[0]).astype(np.float64)
        m, sd = lat[:, :c], lat[:, c:]
        stats = {
            "n": int(m.shape[0] * m.shape[2] * m.shape[3]),
            "sum": m.sum(axis=(0, 2, 3)).tolist(),
            "sum_sq": (m**2 + sd**2).sum(axis=(0, 2, 3)).tolist(),
        }
        summary = {
            "name": name,
            "rows": n,
            "rows_out": good.num_rows,
            "quarantined": n_q,
            "seconds": time.perf_counter() - t0,
            "failed": "",
            "stats": stats,
        }
        shards.mark_done(storage.join(p["out"], "_done"), name, p["fingerprint"], summary)
        return summary

    def write(self, name: str, good: pa.Table, quarantine: pa.Table) -> int:
        """The shard's rows (with the encoders' provenance in the Parquet metadata) and its quarantine."""
        p = self.plan
        md = dict(good.schema.metadata or {})
        keys = ("vae", "vae_fingerprint", "text_encoder", "text_fingerprint", "fingerprint")
        md[b"ambient_ray.precompute"] = json.dumps({k: p[k] for k in keys}).encode()
        storage.write_parquet(storage.join(p["out"], "data", f"{name}.parquet"), good.replace_schema_metadata(md))
        qpath = storage.join(p["out"], "quarantine", f"{name}.parquet")
        if quarantine.num_rows:
            storage.write_parquet(qpath, quarantine)
        elif storage.exists(qpath):
            storage.delete(qpath)
        return quarantine.num_rows


def quarantine_rows(failed: pa.Table, reasons, where: str) -> pa.Table:
    """Quarantine rows (:data:`schema.QUARANTINE_SCHEMA`) for input rows that could not be encoded."""

    def col(name: str) -> list:
        return failed.column(name).to_pylist() if name in failed.column_names else [None] * failed.num_rows

    return pa.Table.from_pylist(
        [
            {"id": i, "source": s or "", "locator": where, "stage": "precompute", "reason": r, "image": img}
            for i, s, r, img in zip(col("id"), col("source"), list(reasons), col("image"))
        ],
        schema=schema.QUARANTINE_SCHEMA,
    )


# ------------------------------------------------------------------------------ the stage


def normalisation(cfg: PrecomputeConfig, plan: dict, done: dict[str, dict]) -> dict:
    """``x = (z - shift) * scale`` per latent channel: configured, the identity for ``pixels``, or measured
    from the shards' sums so that each channel has mean 0 and std ``latent_std``."""
    c = plan["latent_shape"][0] // 2
    if cfg.latent_shift is not None:
        shift, scale = (np.broadcast_to(np.asarray(v, np.float64), (c,)) for v in (cfg.latent_shift, cfg.latent_scale))
        return {"shift": shift.tolist(), "scale": scale.tolist(), "how": "configured"}
    if cfg.vae == "pixels":
        return {"shift": [0.0] * c, "scale": [1.0] * c, "how": "identity (pixels)"}
    n = sum(d["stats"]["n"] for d in done.values())
    if n == 0:
        raise StageFailed("precompute: no row was encoded, so the latent normalisation cannot be measured")
    s = np.sum([d["stats"]["sum"] for d in done.values()], axis=0)
    sq = np.sum([d["stats"]["sum_sq"] for d in done.values()], axis=0)
    mean = s / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 1e-12))
    return {
        "shift": mean.tolist(),
        "scale": (cfg.latent_std / std).tolist(),
        "how": f"measured over {n // (plan['latent_shape'][1] * plan['latent_shape'][2])} rows to std {cfg.latent_std}",
    }


class Precompute(ActorStage):
    """The precompute stage on :class:`ActorStage`: the encoders on the actor pool, the normalisation and
    ``latents.json`` in :meth:`finish`."""

    label = "precompute"
    held = "a precompute with other encoders, resolution or data"
    outputs = ("data", "quarantine", "_done", "latents.json", "summary.json")

    def plan(self) -> None:
        from ambient_ray.data.metadata import data_dir, load_metadata, parquet_files

        cfg = self.cfg
        inp = data_dir(cfg.data)
        self.refuse_overlap(inp, "latents")
        self.files = parquet_files(cfg.data)  # a folder of shards or one Parquet file
        self.meta = load_metadata(cfg.data)
        self.encoders = make_plan(cfg, self.out, self.files, self.meta)
        self.fingerprint = self.encoders["fingerprint"]
        self.shards = [shards.shard_name(f) for f in self.files]
        self.manifest = {"shards": len(self.files)}

    def work(self, todo: list[str]) -> list[dict]:
        wanted = set(todo)
        files = [f for f in self.files if shards.shard_name(f) in wanted]
        return self.actors(PrecomputeActor, self.encoders, files, error=StageFailed, done="_done")

    def finish(self, done: dict[str, dict], ran: list[dict], seconds: float) -> PrecomputeResult:
        """The latents' normalisation and ``latents.json``, the summary (also to MLflow and ``summary.json``)."""
        cfg, out, plan, files, results = self.cfg, self.out, self.encoders, self.files, ran
        rows_in = sum(d["rows"] for d in done.values())
        rows_out = sum(d["rows_out"] for d in done.values())
        rows_q = sum(d["quarantined"] for d in done.values())
        self.conserve(len(self.meta), rows_in, rows_out, rows_q)
        norm = normalisation(cfg, plan, done)
        info = {
            **{k: plan[k] for k in ("vae", "vae_subfolder", "vae_fingerprint", "text_encoder", "text_fingerprint")},
            **{k: plan[k] for k in ("resolution", "channels", "factor", "latent_shape", "emb_shape", "emb_dtype")},
            "fingerprint": plan["fingerprint"],
            "latent_channels": plan["latent_shape"][0] // 2,
            **norm,
        }
        shards.write_json(storage.join(out, "latents.json"), info)
        run_rows = sum(r.get("rows", 0) for r in results)
        summary: PrecomputeResult = {
            "out": out,
            "rows_in": rows_in,
            "rows_out": rows_out,
            "rows_quarantined": rows_q,
            "shards": len(files),
            "shards_run": len(results),
            "shards_skipped": len(files) - len(results),
            "seconds": seconds,
            "images_per_s": run_rows / seconds if results and seconds > 0 else 0.0,
            "latents": info,
        }
        tags = {"stage": "precompute", "vae_fingerprint": plan["vae_fingerprint"] or ""}
        tags["text_fingerprint"] = plan["text_fingerprint"] or ""
        with tracking.run(cfg.mlflow, out, params=cfgmod.flatten(cfg), tags=tags) as (run_id, uri):
            metrics = ("rows_in", "rows_out", "rows_quarantined", "shards_run", "images_per_s")
            tracking.log_metrics(run_id, uri, {k: float(summary[k]) for k in metrics})
            tracking.log_files(run_id, uri, {"latents.json": json.dumps(info, indent=1).encode()})
            summary["mlflow_run_id"] = run_id
        shards.write_json(storage.join(out, "summary.json"), summary)
        return summary


def run(cfg: PrecomputeConfig, *, progress: bool = True) -> PrecomputeResult:
    """Run the precompute stage (Ray started in-process if not connected); returns the summary."""
    return Precompute(cfg, progress).run()
