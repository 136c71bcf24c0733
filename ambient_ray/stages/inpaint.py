"""The inpaint stage: restore masked images with a model trained by the ``masked`` objective (Ambient Diffusion,
Daras et al. 2023; seed paper 003).

``ambient-ray inpaint --data URI --model URI --out URI [--mode mean|sample|both]`` reads images and their masks
(an image folder with ``NAME.mask.png`` beside ``NAME.png``, or Parquet with the standard ``mask`` tensor column,
:mod:`ambient_ray.data.schema`; nonzero = observed), loads the network (``model.json`` + safetensors, built with
``model.mask_input: true``) and writes, per row, the one-step posterior mean E[x0 | A x_σ, A] (Eq. 4.1: what the
network was trained to predict) and/or a sampled restoration that keeps the observed pixels, both from
:mod:`ambient_ray.sampling.masked`.

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
    """One input row: its id, encoded image, mask (uint8 (1, H, W) or (H, W), or PNG bytes; None: all observed),
    label, source and where it came from; ``error`` set: quarantined as is."""

    id: str
    image: Any
    mask: Any = None
    label: int | None = None
    source: str = ""
    locator: str = ""
    error: str | None = None


@dataclass
class Model:
    """What the stage needs of the network: the denoiser and its interface."""

    net: Any
    resolution: int
    channels: int
    label_dim: int
    device: Any


# ------------------------------------------------------------------------------ the model


def load_model(cfg: InpaintConfig) -> Model:
    """The network of ``cfg.model``, refused with one line where it cannot inpaint: not a diffusion model, no mask
    input, a latent or text-to-image model, a class the model does not have."""
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
    label_dim = int(m.get("label_dim", 0) or 0)
    if cfg.class_label is not None and not label_dim:
        raise ConfigError("config key 'class_label': the model is not class-conditional")
    if cfg.class_label is not None and cfg.class_label >= label_dim:
        raise ConfigError(f"config key 'class_label': {cfg.class_label}, the model has {label_dim} classes")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device': cuda, but torch sees no GPU here")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    net = weights.load(cfg.model, "denoiser", cfg.weights).to(device)
    return Model(net, int(m["img_resolution"]), int(m["in_channels"]), label_dim, device)


# ------------------------------------------------------------------------------ the data


def _is_parquet(uri: str) -> bool:
    if uri.lower().endswith(".parquet"):
        return True
    if not storage.exists(uri):
        raise DataError(f"no such file or folder: {uri}")
    if not storage.is_dir(uri):
        raise DataError(f"{uri} is a file, not an image folder, a Parquet file or a folder of Parquet shards")
    return any(f.endswith(".parquet") for f in storage.list_files(uri))


class ParquetRows:
    """Rows of Parquet shards with ``image`` and the ``mask`` tensor column (a file without it: all observed)."""

    def __init__(self, uri: str, need_labels: bool):
        self.files = parquet_files(uri)
        self.names = {f: read_schema_names(f, ("image",)) for f in self.files}
        self.specs: dict[str, schema.TensorSpec | None] = {}
        self.rows: dict[str, int] = {}
        import pyarrow.parquet as pq

        for f in self.files:
            fs, path = storage.filesystem(f)
            pf = pq.ParquetFile(path, filesystem=fs)
            self.rows[f] = pf.metadata.num_rows
            spec = None
            if "mask" in self.names[f]:
                spec = schema.specs_of(pf.schema_arrow).get("mask")
                if spec is None:
                    typ = pf.schema_arrow.field("mask").type
                    raise DataError(
                        f"{f}: column 'mask' is {typ}, not a tensor column (uint8 or bool (1, H, W): "
                        "schema.mask_spec, docs/design/notes.md)"
                    )
            self.specs[f] = spec
        if not any(self.specs.values()):
            raise DataError(
                f"{uri}: no 'mask' column in any of its {len(self.files)} Parquet files: nothing is hidden, so there "
                "is nothing to inpaint (the observed pixels are a uint8 (1, H, W) 'mask' tensor column, nonzero = "
                "observed)"
            )
        if need_labels and not any("label" in n for n in self.names.values()):
            raise DataError(
                f"{uri}: no 'label' column, and the model is class-conditional: set class_label (--class-label K)"
            )

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def chunks(self, limit: int | None) -> Iterator[list[Record]]:
        import pyarrow.parquet as pq

        left = limit if limit is not None else self.total
        for f in self.files:
            if left <= 0:
                return
            fs, path = storage.filesystem(f)
            want = [c for c in ("id", "image", "label", "source", "mask") if c in self.names[f]]
            table = pq.read_table(path, filesystem=fs, columns=want)
            table = table.slice(0, min(table.num_rows, left))
            left -= table.num_rows
            for start in range(0, table.num_rows, CHUNK_ROWS):
                yield self._records(f, start, table.slice(start, CHUNK_ROWS))

    def _records(self, f: str, start: int, t) -> list[Record]:
        n = t.num_rows
        col = {c: t.column(c).to_pylist() for c in ("id", "image", "label", "source") if c in t.column_names}
        masks: list[Any] = [None] * n
        errors: list[str | None] = [None] * n
        spec = self.specs[f]
        if spec is not None:  # the schema's own check: shape, dtype, missing values (a bad row is quarantined)
            values, reasons = schema._decode(t.column("mask"), spec)
            values, checked = schema._check(values, spec)
            for i in range(n):
                why = reasons[i] if reasons else None
                why = why or (checked[i] if checked else None)
                if why:
                    errors[i] = f"column 'mask': {why}"
                else:
                    masks[i] = values[i]
        out = []
        for i in range(n):
            rid = col.get("id", [None] * n)[i]
            rel = f.rsplit("/", 1)[-1]
            out.append(
                Record(
                    id=str(rid) if rid is not None else f"{rel}#{start + i}",
                    image=col["image"][i],
                    mask=masks[i],
                    label=col.get("label", [None] * n)[i],
                    source=col.get("source", [None] * n)[i] or rel,
                    locator=f"{f}#row={start + i}",
                    error=errors[i],
                )
            )
        return out


class FolderRows:
    """An image folder: ``NAME.png`` (or .jpg) with ``NAME.mask.png`` beside it (none: all observed); a first-level
    sub-folder names the class, as for every image folder (:class:`~ambient_ray.data.sources.FolderSource`)."""

    def __init__(self, uri: str, need_labels: bool):
        from ambient_ray.data.sources import FolderSource

        self.source = FolderSource(uri)
        self.items = self.source.list_items()
        if not self.items:
            raise DataError(f"{uri}: no images (.png, .jpg, .jpeg) in the folder")
        self.uri = self.source.uri
        if not self._any_mask():
            raise DataError(
                f"{uri}: no mask files: nothing is hidden, so there is nothing to inpaint (the observed pixels of "
                "NAME.png are NAME.mask.png beside it, nonzero = observed)"
            )
        if need_labels and not self.source.classes:
            raise DataError(
                f"{uri}: no class sub-folders, and the model is class-conditional: set class_label (--class-label K)"
            )

    def _any_mask(self) -> bool:
        masks = getattr(self.source, "masks", None)
        if masks is not None:  # the reader lists them
            return bool(masks)
        return any(f.endswith(".mask.png") for f in storage.list_files(self.uri, (".png",)))

    @property
    def total(self) -> int:
        return len(self.items)

    def chunks(self, limit: int | None) -> Iterator[list[Record]]:
        items = self.items[:limit] if limit is not None else self.items
        for start in range(0, len(items), CHUNK_ROWS):
            part = items[start : start + CHUNK_ROWS]
            recs = self.source.load([loc for _, loc in part])
            yield [
                Record(
                    id=rid,
                    image=rec.get("image"),
                    mask=rec.get("mask"),
                    label=rec.get("label"),
                    source=rec.get("source") or self.source.name,
                    locator=storage.join(self.uri, str(loc)),
                    error=rec.get("error") or rec.get("mask_error"),
                )
                for (rid, loc), rec in zip(part, recs)
            ]


def open_rows(cfg: InpaintConfig, need_labels: bool) -> ParquetRows | FolderRows:
    uri = storage.normalize(cfg.data)
    return ParquetRows(uri, need_labels) if _is_parquet(uri) else FolderRows(uri, need_labels)


def _mask_array(mask: Any) -> np.ndarray:
    """A row's mask as bool (H, W) from what a reader gives: an array (H, W), (1, H, W) or (H, W, 1), or PNG bytes;
    nonzero = observed. A ValueError says what it is otherwise."""
    if isinstance(mask, (bytes, bytearray)):
        from ambient_ray.data.images import decode_png

        mask = decode_png(bytes(mask))
    a = np.asarray(mask)
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])
    if a.ndim != 2:
        raise ValueError(f"mask of shape {a.shape}, expected one channel (1, H, W)")
    return a != 0


def prepare(rec: Record, model: Model, class_label: int | None) -> tuple[tuple[np.ndarray, np.ndarray, int | None], str | None]:
    """((image uint8 (H, W, C), mask bool (H, W), label), None), or (None, reason) to quarantine the row."""
    from ambient_ray.data.sources import SourceConfig, decode

    if rec.error:
        return None, rec.error
    img, why = decode({"image": rec.image}, SourceConfig(channels=1 if model.channels == 1 else 3))
    if img is None:
        return None, why
    h, w, c = img.shape
    if c != model.channels:
        return None, f"image has {c} channels; the model takes {model.channels}"
    if (h, w) != (model.resolution, model.resolution):
        r = model.resolution
        return None, f"image is {h}x{w}; the model takes {r}x{r} images"
    if rec.mask is None:
        mask = np.ones((h, w), bool)
    else:
        try:
            mask = _mask_array(rec.mask)
        except (ValueError, OSError) as e:
            return None, f"mask: {e}"
        if mask.shape != (h, w):
            return None, f"mask is {mask.shape[0]}x{mask.shape[1]}, the image {h}x{w}: it does not fit"
    label = None
    if model.label_dim:
        label = class_label if class_label is not None else rec.label
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
            g = torch.Generator(device=dev).manual_seed(seed)
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
    from ambient_ray.io import plots, tracking
    from ambient_ray.io.progress import Progress

    t0 = time.perf_counter()
    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    model = load_model(cfg)
    rows = open_rows(cfg, need_labels=bool(model.label_dim) and cfg.class_label is None)
    total = min(rows.total, cfg.limit) if cfg.limit is not None else rows.total
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
    with Progress("inpaint", total, "images", enabled=progress) as bar:
        for chunk in rows.chunks(cfg.limit):
            rows_in += len(chunk)
            good: list[tuple[Record, tuple]] = []
            for rec in chunk:
                got, why = prepare(rec, model, cfg.class_label)
                if got is None:
                    raw = rec.image if isinstance(rec.image, bytes) else None
                    bad.append(
                        {"id": rec.id, "source": rec.source, "locator": rec.locator, "stage": STAGE, "reason": why, "image": raw}
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
                        "label": label if label is not None else rec.label,
                        "observed": encode_png(img),
                        "mask": mask[None].astype(np.uint8),
                        "height": img.shape[0],
                        "width": img.shape[1],
                        "channels": img.shape[2],
                        "source": rec.source,
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
                table = pa.Table.from_pylist(out_rows, schema=_out_schema(modes, mask_spec))
                schema.write_table(storage.join(out, "data", f"part-{shards:05d}.parquet"), table, [mask_spec])
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
