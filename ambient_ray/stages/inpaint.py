"""The inpaint stage: restore masked images with a model trained by the ``masked`` objective (Ambient Diffusion,
Daras et al. 2023; seed paper 003).

``ambient-ray inpaint --data URI --model URI --out URI [--mode mean|sample|both]`` reads images and their masks
through the shared readers (:mod:`ambient_ray.data.sources`: an image folder with ``NAME.mask.png`` beside
``NAME.png``, or Parquet with the standard ``mask`` tensor column of :mod:`ambient_ray.data.schema`; 1 = observed),
loads the network (``model.json`` + safetensors, built with ``model.mask_input: true``) and writes, per row, the
one-step posterior mean E[x0 | A x_σ, A] (Eq. 4.1: what the network was trained to predict) and/or a sampled
restoration that keeps the observed pixels, both from :mod:`ambient_ray.sampling.masked`.

Outputs under OUT: ``data/part-NNNNN.parquet`` (``id``, ``label``, ``observed``: the input PNG, ``mask``: uint8
(1, H, W) 0/1, ``mean`` and/or ``sample``: the restorations as PNG, ``height``, ``width``, ``channels``,
``source``), ``quarantine/part-00000.parquet`` (rows that could not be restored, with the reason),
``preview.png`` (observed with hidden pixels grey | posterior mean | sample), ``images/<mode>/<id>.png`` with
``pngs``, ``config.yaml`` and ``summary.json``; an MLflow run with the counts and the preview.
Rows in = rows out + rows quarantined, checked at the end.

The network runs in this process (as ``ambient-ray sample``; on a GPU where torch sees one), a batch at a time;
rows are read a chunk at a time, so the data need not fit in memory.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError, DataError
from ambient_ray.data import schema
from ambient_ray.data.metadata import parquet_files, read_schema_names
from ambient_ray.io import storage
from ambient_ray.stages.inpaint_config import InpaintConfig

__all__ = ["InpaintConfig", "run"]

STAGE = "inpaint"
CHUNK_ROWS = 1024  # rows read, restored and written as one output shard at a time
GREY = 128  # the preview's colour of a hidden pixel


@dataclass
class Record:
    """One input row: its id, the reader's record (``image``, ``mask``, ``label``, ``source``, or ``error``) and
    where it came from (the quarantine's locator)."""

    id: str
    record: dict
    locator: str


@dataclass
class Model:
    """What the stage needs of the network: the denoiser and its interface."""

    net: Any
    resolution: int
    channels: int
    label_dim: int
    device: Any


# ------------------------------------------------------------------------------ the model


def check_model(cfg: InpaintConfig) -> Model:
    """What ``cfg.model``'s ``model.json`` says (the network not loaded yet), refused with one line where it cannot
    inpaint: not a diffusion model, no mask input, a latent or text-to-image model, a class the model does not have."""
    import torch

    from ambient_ray.models import weights
    from ambient_ray.models.registry import arch_of, takes_captions

    try:
        _, meta = weights.model_dir(cfg.model)
        weights.check_kind(cfg.model, meta, "denoiser")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key 'model': {e}") from None
    m = meta.get("model", {})
    if not m.get("mask_input"):
        raise ConfigError(
            f"config key 'model': the model in {cfg.model} was built without model.mask_input, so it cannot be told "
            "which pixels are observed; inpaint needs a model trained with --objective masked and "
            "--set model.mask_input=true (docs/stages/inpaint.md)"
        )
    if meta.get("latents"):
        raise ConfigError(
            f"config key 'model': the model in {cfg.model} was trained on VAE latents; inpaint restores pixels "
            "(a mask is over pixels)"
        )
    if takes_captions(arch_of(meta)):
        raise ConfigError(f"config key 'model': the model in {cfg.model} is text-to-image; inpaint takes pixel models")
    if m.get("in_channels") not in (1, 3):
        raise ConfigError(
            f"config key 'model': the model takes {m.get('in_channels')}-channel images; inpaint reads 1 or 3"
        )
    label_dim = int(m.get("label_dim", 0) or 0)
    if cfg.class_label is not None and not label_dim:
        raise ConfigError("config key 'class_label': the model is not class-conditional")
    if cfg.class_label is not None and cfg.class_label >= label_dim:
        raise ConfigError(f"config key 'class_label': {cfg.class_label}, the model has {label_dim} classes")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device': cuda, but torch sees no GPU here")
    device = torch.device(
        "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    return Model(None, int(m["img_resolution"]), int(m["in_channels"]), label_dim, device)


def load_net(cfg: InpaintConfig, model: Model) -> None:
    """The network's weights, on the model's device."""
    from ambient_ray.models import weights

    model.net = weights.load(cfg.model, "denoiser", cfg.weights).to(model.device)


# ------------------------------------------------------------------------------ the data


class Rows:
    """The data's rows through the shared readers (:mod:`ambient_ray.data.sources`: an image folder with
    ``NAME.mask.png`` files, WebDataset tars with ``KEY.mask.png`` members, Parquet with a ``mask`` column), a chunk
    at a time; refused with one line where nothing is hidden or a class-conditional model finds no labels."""

    def __init__(self, cfg: InpaintConfig, need_labels: bool):
        from ambient_ray.data import sources

        uri = cfg.data if cfg.data in sources.BUILTINS else storage.normalize(cfg.data)
        src_cfg = sources.SourceConfig(dataset=uri, limit=cfg.limit)
        try:
            self.source = sources.make_source(src_cfg)
            self.items = sources.list_items(self.source, src_cfg)
        except FileNotFoundError as e:
            raise DataError(str(e)) from None
        except ValueError as e:  # no images, an unknown built-in
            raise DataError(f"{cfg.data}: {e}") from None
        if not self.source.has_masks:
            raise DataError(
                f"{cfg.data}: no masks: nothing is hidden, so there is nothing to inpaint (the observed pixels are an "
                "image folder's NAME.mask.png beside NAME.png, or a Parquet 'mask' column: uint8 (1, H, W), "
                "1 = observed; docs/stages/inpaint.md)"
            )
        if need_labels and not self._has_labels():
            raise DataError(
                f"{cfg.data}: no class labels (a 'label' column, or class sub-folders), and the model is "
                "class-conditional: set class_label (--class-label K)"
            )

    def _has_labels(self) -> bool:
        from ambient_ray.data import sources

        if isinstance(self.source, sources.FolderSource):
            return bool(self.source.classes)
        if isinstance(self.source, sources.ParquetSource):
            return any("label" in read_schema_names(f) for f in parquet_files(self.source.uri))
        return True  # tar shards: a row without KEY.cls is quarantined

    @property
    def total(self) -> int:
        return len(self.items)

    def chunks(self) -> Iterator[list[Record]]:
        """Records a chunk at a time: CHUNK_ROWS items, a Parquet file's rows not split (its reader reads the
        whole file per call)."""
        from ambient_ray.data import sources

        by_file = isinstance(self.source, sources.ParquetSource)
        start = 0
        while start < len(self.items):
            end = min(start + CHUNK_ROWS, len(self.items))
            if by_file:
                f = self.items[start][1][0]
                end = start
                while end < len(self.items) and self.items[end][1][0] == f:
                    end += 1
            part = self.items[start:end]
            recs = self.source.load([loc for _, loc in part])
            yield [Record(rid, rec, self._where(loc)) for (rid, loc), rec in zip(part, recs)]
            start = end

    def _where(self, loc: Any) -> str:
        if isinstance(loc, tuple):  # (file, row) of Parquet, (tar, key) of tar shards
            return f"{loc[0]}#row={loc[1]}" if isinstance(loc[1], int) else f"{loc[0]}:{loc[1]}"
        return storage.join(self.source.uri, str(loc)) if hasattr(self.source, "uri") else str(loc)


def prepare(rec: Record, model: Model, class_label: int | None) -> tuple[tuple | None, str | None]:
    """((image uint8 (H, W, C), mask bool (H, W), label), None), or (None, reason) to quarantine the row. The
    image and its mask come from :func:`ambient_ray.data.sources.decode_masked` (the mask checked against the
    image; a row without a mask is all observed)."""
    from ambient_ray.data.sources import SourceConfig, decode_masked

    img, mask, why = decode_masked(rec.record, SourceConfig(channels=1 if model.channels == 1 else 3))
    if img is None:
        return None, why
    h, w, c = img.shape
    if (h, w) != (model.resolution, model.resolution):
        r = model.resolution
        return None, f"image is {h}x{w}; the model takes {r}x{r} images"
    mask = np.ones((h, w), bool) if mask is None else mask.astype(bool)
    label = None
    if model.label_dim:
        label = class_label if class_label is not None else rec.record.get("label")
        if label is None:
            return None, f"no label: the model is class-conditional ({model.label_dim} classes); set class_label"
        if not 0 <= int(label) < model.label_dim:
            return None, f"label {label} is not one of the model's {model.label_dim} classes"
        label = int(label)
    return (img, mask, label), None


# ------------------------------------------------------------------------------ restoring


def restore_batch(
    model: Model, imgs: np.ndarray, masks: np.ndarray, labels: list[int | None], modes: tuple[str, ...], cfg, seed: int
) -> dict[str, np.ndarray]:
    """mode -> uint8 (N, H, W, C) restorations of uint8 images (N, H, W, C) seen through bool masks (N, H, W)."""
    import torch

    from ambient_ray.diffusion.samplers import to_uint8
    from ambient_ray.sampling import masked

    dev = model.device
    y = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(dev)
    m = torch.from_numpy(masks[:, None].astype(np.float32)).to(dev)
    y = y * m  # the hidden pixels carry nothing (the network zeroes them anyway)
    cond: tuple = ()
    if model.label_dim:
        cond = (torch.nn.functional.one_hot(torch.tensor(labels), model.label_dim).float().to(dev),)

    def denoise(x, sigma, mask):
        return model.net(x, sigma, *cond, mask=mask)

    out = {}
    with torch.no_grad():
        for mode in modes:
            g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same noise on any device
            if mode == "mean":
                x = masked.posterior_mean(denoise, y, m, cfg.sigma, generator=g)
            else:
                x = masked.restore(
                    denoise,
                    y,
                    m,
                    steps=cfg.steps,
                    sigma_min=cfg.sigma_min,
                    sigma_max=cfg.sigma_max,
                    rho=cfg.rho,
                    generator=g,
                )
            out[mode] = to_uint8(x)
    return out


def _batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, np.uint64)[0] >> 1)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def png_name(rid: str) -> str:
    """A row id as a relative file path: its folders kept, odd characters as ``_``, no ``..``, ``.png`` at the end."""
    parts = [_UNSAFE.sub("_", p) for p in rid.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    name = "/".join(parts) or "row"
    return re.sub(r"\.(png|jpe?g)$", "", name, flags=re.IGNORECASE) + ".png"


def hidden_grey(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The observed image with its hidden pixels grey (for the preview)."""
    return np.where(mask[..., None], img, np.uint8(GREY)).astype(np.uint8)


# ------------------------------------------------------------------------------ the stage


def run(cfg: InpaintConfig, progress: bool = True) -> dict:
    import pyarrow as pa

    from ambient_ray.data.images import encode_png
    from ambient_ray.io import tracking
    from ambient_ray.io.progress import Progress

    t0 = time.perf_counter()
    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    data = storage.normalize(cfg.data).rstrip("/")
    if data == out.rstrip("/") or data.startswith(out.rstrip("/") + "/"):
        raise ConfigError(f"config key 'out': {out} holds the data ({cfg.data}); write the restorations elsewhere")
    model = check_model(cfg)
    rows = Rows(cfg, need_labels=bool(model.label_dim) and cfg.class_label is None)
    load_net(cfg, model)
    for stale in ("data", "quarantine", "images"):  # the folders of an earlier run into the same OUT
        if storage.exists(storage.join(out, stale)):
            storage.delete(storage.join(out, stale))
    cfgmod.save_resolved(cfg, out)

    modes = cfg.modes
    mask_spec = schema.mask_spec(model.resolution, model.resolution)
    bad: list[dict] = []
    rows_in = rows_out = batches = shards = 0
    observed: list[float] = []
    preview: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []
    with Progress("inpaint", rows.total, "images", enabled=progress) as bar:
        for chunk in rows.chunks():
            rows_in += len(chunk)
            good: list[tuple[Record, tuple]] = []
            for rec in chunk:
                got, why = prepare(rec, model, cfg.class_label)
                if got is None:
                    raw = rec.record.get("image")
                    bad.append(
                        {
                            "id": rec.id,
                            "source": rec.record.get("source") or "",
                            "locator": rec.locator,
                            "stage": STAGE,
                            "reason": why,
                            "image": raw if isinstance(raw, bytes) else None,
                        }
                    )
                    bar.update()
                else:
                    good.append((rec, got))
            out_rows: list[dict] = []
            for b in range(0, len(good), cfg.batch_size):
                part = good[b : b + cfg.batch_size]
                imgs = np.stack([g[0] for _, g in part])
                masks = np.stack([g[1] for _, g in part])
                labels = [g[2] for _, g in part]
                restored = restore_batch(model, imgs, masks, labels, modes, cfg, _batch_seed(cfg.seed, batches))
                batches += 1
                for k, (rec, (img, mask, label)) in enumerate(part):
                    row = {
                        "id": rec.id,
                        "label": label if label is not None else rec.record.get("label"),
                        "observed": encode_png(img),
                        "mask": mask[None].astype(np.uint8),
                        "height": img.shape[0],
                        "width": img.shape[1],
                        "channels": img.shape[2],
                        "source": rec.record.get("source"),
                    }
                    for mode in modes:
                        row[mode] = encode_png(restored[mode][k])
                        if cfg.pngs:
                            storage.write_bytes(storage.join(out, "images", mode, png_name(rec.id)), row[mode])
                    out_rows.append(row)
                    observed.append(float(mask.mean()))
                    if len(preview) < cfg.preview:
                        preview.append((img, mask, {mode: restored[mode][k] for mode in modes}))
                bar.update(len(part))
            if out_rows:
                uri = storage.join(out, "data", f"part-{shards:05d}.parquet")
                schema.write_table(uri, out_rows, [mask_spec], schema=_out_schema(modes, mask_spec))
                shards += 1
                rows_out += len(out_rows)
    if bad:
        storage.write_parquet(
            storage.join(out, "quarantine", "part-00000.parquet"),
            pa.Table.from_pylist(bad, schema=schema.QUARANTINE_SCHEMA),
        )
    if rows_in != rows_out + len(bad):
        raise RuntimeError(f"inpaint: {rows_in} rows in, but {rows_out} out and {len(bad)} quarantined")
    if not rows_out:
        raise DataError(
            f"{cfg.data}: none of its {rows_in} rows could be restored (first reason: {bad[0]['reason']}); "
            f"the reasons are in {storage.join(out, 'quarantine')}/"
        )

    files: dict[str, bytes] = {}
    if preview:
        files["preview.png"] = preview_png(preview, modes)
        storage.write_bytes(storage.join(out, "preview.png"), files["preview.png"])
    seconds = time.perf_counter() - t0
    summary = {
        "out": out,
        "data": storage.join(out, "data"),
        "preview": storage.join(out, "preview.png") if preview else None,
        "modes": list(modes),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_quarantined": len(bad),
        "observed_fraction": float(np.mean(observed)),
        "device": str(model.device),
        "seconds": seconds,
        "images_per_s": rows_out / seconds if seconds > 0 else 0.0,
    }
    run_id, uri = tracking.start_run(cfg.mlflow, out, params=cfgmod.flatten(cfg), tags={"stage": STAGE})
    metrics = ("rows_in", "rows_out", "rows_quarantined", "observed_fraction", "seconds", "images_per_s")
    tracking.log_metrics(run_id, uri, {k: summary[k] for k in metrics})
    tracking.log_files(run_id, uri, files)
    tracking.finish(run_id, uri)
    summary.update(mlflow_run_id=run_id, mlflow_uri=uri)
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=2).encode())
    return summary


def _out_schema(modes: tuple[str, ...], mask_spec: schema.TensorSpec):
    import pyarrow as pa

    fields = [
        pa.field("id", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("observed", pa.binary()),
        schema.tensor_field(mask_spec),
        *[pa.field(m, pa.binary()) for m in modes],
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("channels", pa.int32()),
        pa.field("source", pa.string()),
    ]
    return pa.schema(fields)


TITLES = {"mean": "posterior mean", "sample": "sample"}


def preview_png(preview: list, modes: tuple[str, ...]) -> bytes:
    """Rows of the preview: the observed images (hidden pixels grey), then each restoration."""
    from ambient_ray.io import plots

    rows = [("observed", [hidden_grey(img, mask) for img, mask, _ in preview])]
    rows += [(TITLES[mode], [r[mode] for _, _, r in preview]) for mode in modes]
    return plots.image_rows(rows, title="inpaint: observed (hidden pixels grey) and restorations")
