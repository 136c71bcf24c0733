"""Image sources: built-in datasets (no download) and user data (image folders, WebDataset tars, Parquet).

A source is read in two steps so that stages can shard work deterministically and resume it:
``list_items()`` returns ``(id, locator)`` pairs in a stable order (cheap: names, not pixels), and
``load(locators)`` returns the records for some of them (run inside Ray Data tasks). A record is a
dict with ``id``, ``image`` (encoded bytes, or a uint8 array for built-ins), ``label``, ``caption``
and ``source``; :func:`decode` turns it into a validated uint8 (H, W, C) array or a reason to
quarantine it. :func:`read` gives any source as a Ray Dataset of the stored schema
(docs/design/notes.md, "The stored schema").

Users' own masks (Ambient Diffusion's observed pixels, :mod:`ambient_ray.data.masks`): an image folder's
``NAME.mask.png`` beside ``NAME.png`` (or ``NAME.jpg``), a WebDataset member ``KEY.mask.png``, or a Parquet
``mask`` column (a tensor or list column of 0/1, or PNG bytes). A record then carries ``mask`` (the raw value)
and ``mask_where`` (which file, column and row, for the quarantine's reason); :func:`decode_masked` checks it
against the image and resizes it with the image. A source's ``has_masks`` says, after ``list_items()``,
whether any of its rows may carry one.

Users' noisy data (Denoising Score Distillation: rows observed only as y = x + σ_n·z, :mod:`ambient_ray.data.noisy`):
a Parquet ``noisy`` column (a float tensor or list column, (C, H, W) in the [-1, 1] data scale) with a ``sigma_n``
column or ``source.sigma_n`` for every row, or a folder of ``.npy`` arrays (:class:`NpySource`). A record then
carries ``noisy`` (the raw array), ``sigma_n`` (the raw value, or None: ``source.sigma_n`` applies) and
``noisy_where`` / ``sigma_where`` (for the quarantine's reasons); :func:`decode_row` checks them. A source's
``has_noisy`` says, after ``list_items()``, whether its rows may carry noisy data. Noisy data is never resized or
converted (that would change its noise): ``image`` of such a row is a preview of it (clipped, quantised).

Built-ins: ``digits`` (scikit-learn, 1,797 8x8 grey), ``faces`` (scikit-image ``lfw_subset``, 200
25x25 grey), ``photos`` (crops of scikit-image's bundled photographs, RGB, for out-of-distribution
use).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from ambient_ray.config import DataError, Strict, flag
from ambient_ray.data import noisy as noisy_data
from ambient_ray.data.images import decode_png, encode_png, resize_square
from ambient_ray.data.masks import MASK, MASK_SUFFIX, check_mask, mask_cells, resize_mask
from ambient_ray.data.metadata import FILTER_FIELDS, match, parquet_files, read_schema_names
from ambient_ray.data.noisy import NOISY, SIGMA_N
from ambient_ray.io import storage

BUILTINS = ("digits", "faces", "photos")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PHOTO_FILES = (
    "astronaut.png",
    "camera.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "coins.png",
    "moon.png",
    "page.png",
    "text.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "horse.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "retina.jpg",
    "cell.png",
    "color.png",
)


class SourceConfig(Strict):
    """Where images come from and how they are normalised."""

    dataset: str = Field(
        "digits",
        description="built-in name (digits, faces, photos) or a URI of user data",
        json_schema_extra=flag(
            "--dataset", "built-in (digits, faces, photos) or URI of an image folder, tar shards or Parquet"
        ),
    )
    format: Literal["auto", "builtin", "folder", "webdataset", "parquet", "npy"] = Field(
        "auto",
        description="how 'dataset' is read; auto: a built-in name is builtin, a .tar (or a folder of them) "
        "webdataset, a .parquet (or a folder of them) parquet, a folder of .npy arrays (noisy data) and no "
        "images npy, any other folder an image folder",
    )
    image_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="resize to this square size (centre crop first)",
        json_schema_extra=flag("--image-size"),
    )
    channels: Literal[1, 3] | None = Field(
        None,
        description="convert grey<->RGB to this many channels; None keeps each image's own",
        json_schema_extra=flag("--channels"),
    )
    repeat: int = Field(1, ge=1, description="tile the source this many times with distinct ids (benchmarks)")
    limit: int | None = Field(None, ge=1, description="use only the first N items")
    photos_count: int = Field(2000, ge=1, description="number of crops for the built-in 'photos'")
    photos_crop: int = Field(32, ge=4, description="crop size for the built-in 'photos'")
    holdout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="fraction of items held out, chosen by a hash of the id (the same for every seed)",
    )
    part: Literal["train", "holdout"] = Field(
        "train", description="with holdout > 0: read the training part or the held-out part"
    )
    sigma_n: float | None = Field(
        None,
        ge=0.0,
        allow_inf_nan=False,
        description="noisy data (a .npy folder, a Parquet 'noisy' column): the σ_n of its noise in the [-1, 1] "
        "data scale, for every row without its own (Parquet 'sigma_n' column, the folder's sigma_n.json)",
    )


# ------------------------------------------------------------------------------ built-ins


@lru_cache(maxsize=4)
def _builtin_arrays(name: str, photos_count: int, photos_crop: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W, C), labels or None) for a built-in dataset."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        imgs = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
        return imgs, d.target.astype(np.int64)
    if name == "faces":
        from skimage.data import lfw_subset

        faces = lfw_subset()  # (200, 25, 25) floats in [0, 1]
        return np.round(faces * 255.0).astype(np.uint8)[..., None], None
    if name == "photos":
        return _photo_crops(photos_count, photos_crop), None
    raise ValueError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTINS)}")


def _photo_crops(count: int, crop: int) -> np.ndarray:
    import os

    import skimage.data

    folder = os.path.dirname(skimage.data.__file__)
    photos = []
    for fname in PHOTO_FILES:
        path = os.path.join(folder, fname)
        if os.path.exists(path):
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
            if min(arr.shape[:2]) >= crop:
                photos.append(arr)
    if not photos:
        raise RuntimeError("no bundled scikit-image photographs found for the 'photos' dataset")
    rng = np.random.default_rng(0)
    out = np.empty((count, crop, crop, 3), np.uint8)
    for i in range(count):
        p = photos[i % len(photos)]
        top = int(rng.integers(0, p.shape[0] - crop + 1))
        left = int(rng.integers(0, p.shape[1] - crop + 1))
        out[i] = p[top : top + crop, left : left + crop]
    return out


# ------------------------------------------------------------------------------ sources


class Source:
    """Base class: ``list_items`` and ``load``; subclasses are picklable (sent to Ray tasks)."""

    name: str
    has_masks: bool = False  # set by list_items(): some rows may carry a user's mask
    has_noisy: bool = False  # set by list_items(): some rows may carry a user's noisy data

    def list_items(self) -> list[tuple[str, Any]]:
        raise NotImplementedError

    def load(self, locators: list[Any]) -> list[dict]:
        raise NotImplementedError


class BuiltinSource(Source):
    def __init__(self, cfg: SourceConfig):
        if cfg.dataset not in BUILTINS:
            raise ValueError(f"unknown built-in dataset {cfg.dataset!r}; known: {', '.join(BUILTINS)}")
        self.name = cfg.dataset
        self.cfg = cfg

    def _arrays(self):
        return _builtin_arrays(self.name, self.cfg.photos_count, self.cfg.photos_crop)

    def list_items(self):
        n = len(self._arrays()[0])
        items = []
        for r in range(self.cfg.repeat):
            suffix = f"-r{r}" if self.cfg.repeat > 1 else ""
            items.extend((f"{self.name}-{i:06d}{suffix}", i) for i in range(n))
        return items

    def load(self, locators):
        imgs, labels = self._arrays()
        return [
            {
                "image": imgs[i],
                "label": None if labels is None else int(labels[i]),
                "caption": builtin_caption(self.name, None if labels is None else int(labels[i])),
                "source": self.name,
            }
            for i in locators
        ]


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def builtin_caption(name: str, label: int | None) -> str:
    """The caption of a built-in row, so the text-to-image path has real captions to run on: ``a handwritten
    digit seven`` (digits, from the label), ``a photo of a face`` (faces), ``a crop of a photograph`` (photos)."""
    if name == "digits":
        return f"a handwritten digit {DIGIT_WORDS[label]}"
    return {"faces": "a photo of a face", "photos": "a crop of a photograph"}[name]


def mask_name(rel: str) -> str:
    """The mask file of image ``rel`` in an image folder: ``a/NAME.png`` (or ``.jpg``, ``.jpeg``) ->
    ``a/NAME.mask.png``."""
    return rel[: rel.rfind(".")] + MASK_SUFFIX


class FolderSource(Source):
    """PNG/JPEG files under a folder; a first-level sub-folder name is the class (label = its index).

    A file ``NAME.mask.png`` is not an image but the mask of ``NAME.png`` / ``NAME.jpg`` beside it."""

    def __init__(self, uri: str):
        self.uri = storage.normalize(uri)
        self.name = self.uri.rstrip("/").rsplit("/", 1)[-1]
        self.classes: list[str] = []
        self.masks: dict[str, str] = {}  # image -> its mask file

    def list_items(self):
        files = storage.list_files(self.uri, IMAGE_SUFFIXES)
        rels = [f[len(self.uri) :].lstrip("/") for f in files]
        masks = {r.lower(): r for r in rels if r.lower().endswith(MASK_SUFFIX)}
        rels = [r for r in rels if not r.lower().endswith(MASK_SUFFIX)]
        self.masks = {r: masks[mask_name(r).lower()] for r in rels if mask_name(r).lower() in masks}
        self.has_masks = bool(self.masks)
        if rels and all("/" in r for r in rels):
            self.classes = sorted({r.split("/", 1)[0] for r in rels})
        return [(r, r) for r in rels]

    def load(self, locators):
        out = []
        for rel in locators:
            label = self.classes.index(rel.split("/", 1)[0]) if self.classes else None
            try:
                data = storage.read_bytes(storage.join(self.uri, rel))
                rec = {"image": data, "label": label, "caption": None, "source": self.name}
                if rel in self.masks:
                    rec["mask"] = storage.read_bytes(storage.join(self.uri, self.masks[rel]))
                    rec["mask_where"] = f"file {self.masks[rel]}"
                out.append(rec)
            except OSError as e:
                out.append({"error": f"cannot read {rel}: {e}", "image": b"", "source": self.name})
        return out


class WebDatasetSource(Source):
    """WebDataset-style tar shards: members ``KEY.png|jpg|jpeg`` with optional ``KEY.cls``, ``KEY.txt`` and
    ``KEY.mask.png`` (the image's mask)."""

    def __init__(self, uri: str):
        self.uri = storage.normalize(uri)
        self.name = self.uri.rstrip("/").rsplit("/", 1)[-1]

    def _tars(self) -> list[str]:
        if self.uri.endswith(".tar"):
            return [self.uri]
        return storage.list_files(self.uri, (".tar",))

    @staticmethod
    def _members(tar_uri: str) -> dict[str, dict[str, bytes]]:
        groups: dict[str, dict[str, bytes]] = defaultdict(dict)
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(tar_uri))) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                key, dot, ext = base.partition(".")
                prefix = m.name[: len(m.name) - len(base)]
                f = tf.extractfile(m)
                groups[prefix + key][ext.lower()] = f.read() if f else b""
        return groups

    def list_items(self):
        items = []
        for t in self._tars():
            rel = t[len(self.uri) :].lstrip("/") or t.rsplit("/", 1)[-1]
            for key, g in self._members(t).items():
                items.append((f"{rel}:{key}", (t, key)))
                self.has_masks = self.has_masks or MASK_SUFFIX[1:] in g
        return items

    def load(self, locators):
        by_tar: dict[str, list[int]] = defaultdict(list)
        for i, (t, _) in enumerate(locators):
            by_tar[t].append(i)
        out: list[dict] = [{}] * len(locators)
        for t, idx in by_tar.items():
            groups = self._members(t)
            for i in idx:
                key = locators[i][1]
                g = groups.get(key, {})
                img = next((g[e] for e in ("png", "jpg", "jpeg") if e in g), None)
                rec: dict = {"image": img or b"", "source": self.name, "caption": None, "label": None}
                if img is None:
                    rec["error"] = (
                        f"tar {t} key {key}: no .png/.jpg/.jpeg member (has: {', '.join(sorted(g)) or 'nothing'})"
                    )
                if "cls" in g:
                    try:
                        rec["label"] = int(g["cls"].decode().strip())
                    except ValueError:
                        rec["error"] = f"tar {t} key {key}: .cls is not an integer"
                for e in ("txt", "caption"):
                    if e in g:
                        rec["caption"] = g[e].decode(errors="replace")
                if MASK_SUFFIX[1:] in g:
                    rec["mask"] = g[MASK_SUFFIX[1:]]
                    rec["mask_where"] = f"tar {t} member {key}{MASK_SUFFIX}"
                out[i] = rec
        return out


class ParquetSource(Source):
    """Parquet shards with an ``image`` column of encoded bytes (the stored schema, docs/design/notes.md) and
    an optional ``mask`` column: a tensor or list column of 0/1 ((1, H, W), (H, W) or (H, W, 1)), or PNG bytes;
    a null mask hides nothing. Noisy data: a ``noisy`` column (a float tensor or list column, (C, H, W) in the
    [-1, 1] data scale; the ``image`` column may then be absent) and an optional ``sigma_n`` column; a row whose
    ``noisy`` is null is read from its ``image``."""

    def __init__(self, uri: str):
        self.uri = storage.normalize(uri)
        # a stage output folder keeps its rows under data/
        data = storage.join(self.uri, "data")
        if not self.uri.endswith(".parquet") and storage.is_dir(data):
            self.uri = data
        self.name = self.uri.rstrip("/").rsplit("/", 1)[-1]

    def _files(self) -> list[str]:
        return parquet_files(self.uri)

    def _read(self, f: str, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(f)
        names = _parquet_names(f)  # checked while listing, on the driver: a DataError there
        cols = None if columns is None else [c for c in columns if c in names]
        return pq.read_table(path, filesystem=fs, columns=cols)

    def list_items(self):
        items = []
        for f in self._files():
            rel = f[len(self.uri) :].lstrip("/") or f.rsplit("/", 1)[-1]
            names = _parquet_names(f)
            self.has_masks = self.has_masks or MASK in names
            self.has_noisy = self.has_noisy or NOISY in names
            t = self._read(f, ["id"])
            ids = t.column("id").to_pylist() if "id" in t.column_names else [None] * t.num_rows
            for row, rid in enumerate(ids):
                items.append((str(rid) if rid is not None else f"{rel}#{row}", (f, row)))
        return items

    def load(self, locators):
        by_file: dict[str, list[int]] = defaultdict(list)
        for i, (f, _) in enumerate(locators):
            by_file[f].append(i)
        out: list[dict] = [{}] * len(locators)
        for f, idx in by_file.items():
            t = self._read(f, ["image", "label", "caption", "source", MASK, NOISY, SIGMA_N])
            t = t.take([locators[i][1] for i in idx])
            masks = mask_cells(t.column(MASK)) if MASK in t.column_names else None
            noisy = mask_cells(t.column(NOISY)) if NOISY in t.column_names else None  # any numeric tensor's cells
            sigmas = t.column(SIGMA_N).to_pylist() if noisy is not None and SIGMA_N in t.column_names else None
            rows = t.select([c for c in t.column_names if c in ("image", "label", "caption", "source")]).to_pylist()
            rel = f[len(self.uri) :].lstrip("/") or f.rsplit("/", 1)[-1]
            for k, (i, r) in enumerate(zip(idx, rows)):
                row = locators[i][1]
                out[i] = {
                    "image": r.get("image") or b"",
                    "label": r.get("label"),
                    "caption": r.get("caption"),
                    "source": r.get("source") or self.name,
                }
                if masks is not None and masks[k] is not None:
                    out[i]["mask"] = masks[k]
                    out[i]["mask_where"] = f"column {MASK!r}, row {row} of {rel}"
                if noisy is not None:
                    out[i][NOISY] = noisy[k]
                    out[i]["noisy_where"] = f"column {NOISY!r}, row {row} of {rel}"
                    if sigmas is not None:
                        out[i][SIGMA_N] = sigmas[k]
                        out[i]["sigma_where"] = f"column {SIGMA_N!r}, row {row} of {rel}"
        return out


def _parquet_names(f: str) -> list[str]:
    """The columns of a Parquet source file; a DataError naming it when it has neither ``image`` nor ``noisy``."""
    names = read_schema_names(f)
    if "image" not in names and NOISY not in names:
        raise DataError(f"{f}: missing column 'image' (or '{NOISY}' for noisy data) (columns: {', '.join(names)})")
    return names


SIGMA_FILE = "sigma_n.json"  # a .npy folder's σ_n per file: {"a.npy": 0.1, "sub/b.npy": 0.2}


class NpySource(Source):
    """A folder of ``.npy`` arrays, each one noisy image: float (C, H, W) with C = 1 or 3 (or (H, W)) in the
    [-1, 1] data scale, y = x + σ_n·z. σ_n: the folder's ``sigma_n.json`` (``{"RELATIVE/PATH.npy": σ_n}``) for the
    files it names, else ``source.sigma_n``. A first-level sub-folder name is the class, as for an image folder."""

    has_noisy = True

    def __init__(self, uri: str):
        self.uri = storage.normalize(uri)
        self.name = self.uri.rstrip("/").rsplit("/", 1)[-1]
        self.classes: list[str] = []
        self.sigmas: dict[str, Any] = {}

    def list_items(self):
        files = storage.list_files(self.uri, (".npy",))
        rels = [f[len(self.uri) :].lstrip("/") for f in files]
        sigma_file = storage.join(self.uri, SIGMA_FILE)
        if storage.exists(sigma_file):
            try:
                sigmas = json.loads(storage.read_bytes(sigma_file))
            except ValueError as e:
                raise DataError(f"{sigma_file}: not JSON ({e})") from None
            if not isinstance(sigmas, dict):
                raise DataError(f'{sigma_file}: expected an object {{"FILE.npy": sigma_n, ...}}')
            unknown = sorted(set(sigmas) - set(rels))
            if unknown:
                raise DataError(f"{sigma_file}: names files that are not in {self.uri}: {unknown[:5]}")
            self.sigmas = sigmas
        if rels and all("/" in r for r in rels):
            self.classes = sorted({r.split("/", 1)[0] for r in rels})
        return [(r, r) for r in rels]

    def load(self, locators):
        out = []
        for rel in locators:
            label = self.classes.index(rel.split("/", 1)[0]) if self.classes else None
            rec = {"image": b"", "label": label, "caption": None, "source": self.name}
            try:
                data = storage.read_bytes(storage.join(self.uri, rel))
            except OSError as e:
                out.append({**rec, "error": f"cannot read {rel}: {e}"})
                continue
            try:
                arr = np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                out.append({**rec, "error": f"noisy (file {rel}): not a .npy array ({type(e).__name__}: {e})"})
                continue
            rec.update({NOISY: arr, "noisy_where": f"file {rel}"})
            if rel in self.sigmas:
                rec.update({SIGMA_N: self.sigmas[rel], "sigma_where": f"{SIGMA_FILE}, file {rel}"})
            out.append(rec)
        return out


def make_source(cfg: SourceConfig) -> Source:
    fmt = cfg.format
    if fmt == "auto":
        if cfg.dataset in BUILTINS:
            fmt = "builtin"
        elif cfg.dataset.endswith(".tar"):
            fmt = "webdataset"
        elif cfg.dataset.endswith(".parquet"):
            fmt = "parquet"
        else:
            if not storage.exists(cfg.dataset):
                raise FileNotFoundError(
                    f"no such file or folder: {cfg.dataset} (nor a built-in dataset: {', '.join(BUILTINS)})"
                )
            names = storage.list_files(cfg.dataset)
            if any(n.endswith(".parquet") for n in names):
                fmt = "parquet"
            elif any(n.endswith(".tar") for n in names):
                fmt = "webdataset"
            elif any(n.endswith(".npy") for n in names) and not any(n.lower().endswith(IMAGE_SUFFIXES) for n in names):
                fmt = "npy"
            else:
                fmt = "folder"
    kinds = {
        "builtin": BuiltinSource,
        "folder": FolderSource,
        "webdataset": WebDatasetSource,
        "parquet": ParquetSource,
        "npy": NpySource,
    }
    return kinds[fmt](cfg if fmt == "builtin" else cfg.dataset)


def list_items(source: Source, cfg: SourceConfig) -> list[tuple[str, Any]]:
    items = source.list_items()
    if cfg.repeat > 1 and not isinstance(source, BuiltinSource):
        items = [(f"{i}-r{r}", loc) for r in range(cfg.repeat) for i, loc in items]
    if cfg.holdout > 0:
        ranked = sorted(
            range(len(items)), key=lambda i: hashlib.blake2b(f"holdout/{items[i][0]}".encode(), digest_size=8).digest()
        )
        held = set(ranked[: int(round(cfg.holdout * len(items)))])
        items = [it for i, it in enumerate(items) if (i in held) == (cfg.part == "holdout")]
    if cfg.limit is not None:
        items = items[: cfg.limit]
    if not items:
        raise ValueError(f"dataset {cfg.dataset!r} holds no images")
    return items


# ------------------------------------------------------------------------------ decoding


def decode(record: dict, cfg: SourceConfig) -> tuple[np.ndarray | None, str | None]:
    """A record's image as validated uint8 (H, W, C), or ``(None, reason)`` to quarantine it."""
    arr, err = _decode_image(record)
    if err:
        return None, err
    return _normalise(arr, cfg), None


def decode_masked(record: dict, cfg: SourceConfig) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """:func:`decode`, and the record's own mask as uint8 (H, W), 1 = observed (None if it has none or hides
    nothing): ``(image, mask, None)`` or ``(None, None, reason)``.

    The mask is checked against the image as read (its H x W; values 0/1, or 0/255 for a PNG), then goes
    through the same centre crop and resize (a pixel stays observed only where every source pixel under it
    is); the image's hidden pixels are set to 0."""
    arr, err = _decode_image(record)
    if err:
        return None, None, err
    raw = record.get("mask")
    mask = None
    if raw is not None and not (isinstance(raw, (bytes, bytearray)) and not raw):
        mask, problem = check_mask(raw, arr.shape[:2])
        if problem:
            return None, None, f"mask ({record.get('mask_where') or f'column {MASK!r}'}): {problem}"
        if mask.all():
            mask = None
    if mask is not None:
        arr = arr * mask[..., None]
    arr = _normalise(arr, cfg)
    if mask is not None and arr.shape[:2] != mask.shape:
        mask = resize_mask(mask, arr.shape[0])
        arr = arr * mask[..., None]
    return arr, mask, None


def decode_row(
    record: dict, cfg: SourceConfig
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, float | None, str | None]:
    """:func:`decode_masked`, and the record's own noisy data: ``(image, mask, noisy, sigma_n, None)`` or
    ``(None, None, None, None, reason)``; ``noisy`` float32 (C, H, W) and ``sigma_n`` are None for a row without
    noisy data.

    A row with noisy data (:func:`ambient_ray.data.noisy.check_noisy`; σ_n its own, else ``source.sigma_n``) is
    not resized or converted: one of another size than ``source.image_size`` or other channels than
    ``source.channels`` is refused. Its image is the preview of the data (clipped, quantised); its own mask, if
    any, is checked against its H x W and its hidden pixels are set to −1 in the data (0 in the image). A row whose
    ``noisy`` is null is read from its image, and must have no σ_n but 0."""
    if record.get("error"):
        return None, None, None, None, record["error"]
    raw = record.get(NOISY)
    sigma_raw = record.get(SIGMA_N)
    if raw is None:
        if sigma_raw is not None and not (isinstance(sigma_raw, (int, float)) and sigma_raw == 0):
            where = record.get("sigma_where") or f"column {SIGMA_N!r}"
            return None, None, None, None, f"sigma_n ({where}) is {sigma_raw!r}, but the row has no noisy data"
        arr, mask, err = decode_masked(record, cfg)
        return arr, mask, None, None, err
    where = record.get("noisy_where") or f"column {NOISY!r}"
    y, problem = noisy_data.check_noisy(raw)
    if problem:
        return None, None, None, None, f"noisy ({where}): {problem}"
    if sigma_raw is None and cfg.sigma_n is not None:
        sigma_raw, sigma_where = cfg.sigma_n, "source.sigma_n"
    else:
        sigma_where = record.get("sigma_where") or f"column {SIGMA_N!r}"
    sigma, problem = noisy_data.check_sigma_n(sigma_raw)
    if problem == "missing":
        return (
            None,
            None,
            None,
            None,
            (
                f"sigma_n of the noisy data ({where}): missing (set source.sigma_n, or give each row's: a Parquet "
                f"{SIGMA_N!r} column, a .npy folder's {SIGMA_FILE})"
            ),
        )
    if problem:
        return None, None, None, None, f"sigma_n ({sigma_where}): {problem}"
    problem = noisy_data.check_range(y, sigma)
    if problem:
        return None, None, None, None, f"noisy ({where}): {problem}"
    c, h, w = y.shape
    if cfg.image_size is not None and (h, w) != (cfg.image_size, cfg.image_size):
        return (
            None,
            None,
            None,
            None,
            (
                f"noisy ({where}): {h}x{w}, source.image_size is {cfg.image_size} (noisy data is never resized: "
                "that would change its noise)"
            ),
        )
    if cfg.channels is not None and c != cfg.channels:
        return (
            None,
            None,
            None,
            None,
            (f"noisy ({where}): {c} channels, source.channels is {cfg.channels} (noisy data is never converted)"),
        )
    mask = None
    mask_raw = record.get("mask")
    if mask_raw is not None and not (isinstance(mask_raw, (bytes, bytearray)) and not mask_raw):
        mask, problem = check_mask(mask_raw, (h, w))
        if problem:
            return None, None, None, None, f"mask ({record.get('mask_where') or f'column {MASK!r}'}): {problem}"
        if mask.all():
            mask = None
        else:
            y[:, mask == 0] = -1.0
    return noisy_data.preview(y), mask, y, sigma, None


def _decode_image(record: dict) -> tuple[np.ndarray | None, str | None]:
    """A record's image as uint8 (H, W, C) with 1 or 3 channels, as stored (no conversion, no resize); for a
    record of noisy data without image bytes, the data's preview."""
    if record.get("error"):
        return None, record["error"]
    img = record.get("image")
    if (img is None or (isinstance(img, (bytes, bytearray)) and not img)) and record.get(NOISY) is not None:
        y, problem = noisy_data.check_noisy(record[NOISY])
        if problem:
            return None, f"noisy ({record.get('noisy_where') or f'column {NOISY!r}'}): {problem}"
        return noisy_data.preview(y), None
    if isinstance(img, np.ndarray):
        arr = img if img.ndim == 3 else img[..., None]
    else:
        if not img:
            return None, "empty image bytes"
        try:
            with Image.open(io.BytesIO(img)) as im:
                im.load()
                mode = im.mode
                if mode in ("L", "RGB"):
                    arr = np.asarray(im)
                elif mode in ("P", "1"):
                    arr = np.asarray(im.convert("RGB" if mode == "P" else "L"))
                else:
                    return (
                        None,
                        f"unsupported image mode {mode} ({len(im.getbands())} channels); "
                        "expected 1 (L) or 3 (RGB) channels",
                    )
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            return None, f"undecodable image: {type(e).__name__}: {e}"
        if arr.ndim == 2:
            arr = arr[..., None]
    if arr.dtype != np.uint8:
        return None, f"image dtype {arr.dtype}, expected uint8"
    h, w, c = arr.shape
    if h == 0 or w == 0:
        return None, f"zero-size image {h}x{w}"
    if c not in (1, 3):
        return None, f"image has {c} channels; expected 1 or 3"
    return arr, None


def _normalise(arr: np.ndarray, cfg: SourceConfig) -> np.ndarray:
    """The source config's channel conversion and square resize."""
    h, w, c = arr.shape
    if cfg.channels is not None and c != cfg.channels:
        arr = np.repeat(arr, 3, axis=2) if c == 1 else np.asarray(Image.fromarray(arr).convert("L"))[..., None]
    if cfg.image_size is not None and (h, w) != (cfg.image_size, cfg.image_size):
        arr = resize_square(arr, cfg.image_size)
    return np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------ stage outputs


# ------------------------------------------------------------------------------ Ray Data


def read(uri_or_cfg: str | SourceConfig, *, chunk: int = 512):
    """Any source as a Ray Dataset of ``id, image (PNG), height, width, channels, label, caption, source``
    plus ``error`` (empty when the row decoded; otherwise the reason, and ``image`` holds the raw bytes).

    A folder written by a stage (Parquet shards under ``data/``) is read with ``ray.data.read_parquet``.
    """
    import ray.data

    cfg = uri_or_cfg if isinstance(uri_or_cfg, SourceConfig) else SourceConfig(dataset=uri_or_cfg)
    source = make_source(cfg)
    if isinstance(source, ParquetSource) and cfg.image_size is None and cfg.channels is None and cfg.repeat == 1:
        fs, path = storage.filesystem(source.uri)
        return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])
    items = list_items(source, cfg)
    chunks = [
        {
            "ids": json.dumps([i for i, _ in items[s : s + chunk]]),
            "locs": json.dumps([loc for _, loc in items[s : s + chunk]]),
        }
        for s in range(0, len(items), chunk)
    ]

    def load_chunk(batch: dict) -> dict:
        cols: dict[str, list] = defaultdict(list)
        for ids_json, locs_json in zip(batch["ids"], batch["locs"]):
            ids, locs = json.loads(ids_json), [unjson(x) for x in json.loads(locs_json)]
            for rid, rec in zip(ids, source.load(locs)):
                arr, err = decode(rec, cfg)
                raw = rec.get("image")
                cols["id"].append(rid)
                cols["image"].append(encode_png(arr) if arr is not None else (raw if isinstance(raw, bytes) else b""))
                h, w, c = arr.shape if arr is not None else (0, 0, 0)
                cols["height"].append(h)
                cols["width"].append(w)
                cols["channels"].append(c)
                cols["label"].append(rec.get("label"))
                cols["caption"].append(rec.get("caption"))
                cols["source"].append(rec.get("source", source.name))
                cols["error"].append(err or "")
        return {
            k: np.array(v, dtype=object) if k in ("image", "label", "caption") else np.array(v) for k, v in cols.items()
        }

    return ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(load_chunk, batch_size=1)


def unjson(loc: Any) -> Any:
    """Locators go through JSON: tuples come back as lists."""
    return tuple(loc) if isinstance(loc, list) else loc


def read_array(uri: str, where: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 images (N, H, W, C), labels or None) of a built-in dataset name, a ``.npy`` file or a
    sample output folder (``samples.npy``), or a stage output's Parquet rows (those ``where`` selects)."""
    import pandas as pd
    import pyarrow.parquet as pq

    if uri in BUILTINS:
        if where:
            raise ValueError(f"row filter {where!r}: the built-in {uri!r} has no row columns; corrupt it first")
        imgs, labels = _builtin_arrays(uri, 2000, 32)
        return imgs, labels
    uri = storage.normalize(uri)
    npy = uri if uri.endswith(".npy") else storage.join(uri, "samples.npy")
    if storage.exists(npy):
        if where:
            raise ValueError(f"row filter {where!r}: {npy} is an image array without row columns")
        arr = np.load(io.BytesIO(storage.read_bytes(npy)), allow_pickle=False)
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4 or arr.dtype != np.uint8:
            raise ValueError(f"{npy}: expected uint8 images (N, H, W, C), got {arr.dtype} {arr.shape}")
        return arr, None
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"no images at {uri}: no such file or folder (expected a built-in name ({', '.join(BUILTINS)}), a .npy "
            "file, a sample output (samples.npy), a stage output with Parquet shards or a Parquet file)"
        )
    frames = []
    for f in parquet_files(uri):
        fs, path = storage.filesystem(f)
        names = read_schema_names(f, ("image",))
        cols = [c for c in ("id", "image", "label", *FILTER_FIELDS) if c in names]
        frames.append(pq.read_table(path, filesystem=fs, columns=list(dict.fromkeys(cols))).to_pandas())
    meta = pd.concat(frames, ignore_index=True)
    if where:
        meta = meta[match(meta, where)]
    if meta.empty:
        raise ValueError(f"no rows in {uri}" + (f" match {where!r}" if where else ""))
    imgs = [decode_png(b) for b in meta["image"]]
    shapes = {a.shape for a in imgs}
    if len(shapes) > 1:
        raise ValueError(f"images of mixed shapes in {uri}: {sorted(shapes)[:4]}")
    labels = None
    if "label" in meta and meta["label"].notna().all():
        labels = meta["label"].to_numpy(dtype=np.int64)
    return np.stack(imgs), labels
