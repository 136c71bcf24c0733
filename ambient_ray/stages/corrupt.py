"""The corrupt stage: make a mixed-quality dataset from a clean one, on Ray.

Plan (on the driver, cheap): list the source's ids in a stable order; pick the clean subset by seed
(the ``round(clean_fraction * N)`` ids with the smallest seeded hash); split the rest evenly among
the corruption specs; give each row its own seed; cut the rows, in source order, into shards of
``shard_size``. Work (one Ray task per shard): load, decode and validate the
shard's rows, corrupt them (batched numpy/PIL), and write

    OUT/data/shard-NNNNN.parquet        rows: id, image (PNG), height, width, channels, label, caption,
                                        source, quality, corruption, seed
    OUT/quarantine/shard-NNNNN.parquet  rows that could not be used: id, source, locator, reason, image
    OUT/_done/shard-NNNNN.json          the shard's counts, written last: the shard's commit marker
                                        (a done-marker of :mod:`ambient_ray.io.shards`, with the plan's fingerprint)

Masks (Ambient Diffusion: the mask is data): when a corruption hides pixels (``mask``, ``block_mask``,
``box_mask``, any registered with ``masks=True``) or the source brings its own masks
(:mod:`ambient_ray.data.sources`), every row of every shard carries a ``mask`` tensor column (uint8
(1, H, W), 1 = observed; :mod:`ambient_ray.data.masks`): the corruption's mask (and the user's), all
ones for clean rows and rows of other corruptions. One mask shape per dataset: the driver takes it
from ``source.image_size`` or the first row that decodes, and rows of another shape are quarantined.
A row whose user mask hides pixels is ``quality=corrupted``; its ``corruption`` is ``user_mask`` (kept
clean by the plan) or ``SPEC+user_mask``.

Noisy data (Denoising Score Distillation: the noisy observation is data): when a corruption adds noise of a known
level (``noise:sigma=``, any registered with ``noisy=True``) or the source brings its own noisy data, every row
of every shard carries a ``noisy`` tensor column (float32 (C, H, W), the [-1, 1] data scale, never clipped or
quantised; :mod:`ambient_ray.data.noisy`) and a float64 ``sigma_n`` column: y = (2x − 1) + σ_n·z and σ_n for a
noisy row, the row's own image as floats (2·image/255 − 1) and 0 for every other row. The PNG ``image`` is y
clipped and quantised, a preview. One shape per dataset, as for masks (from ``source.image_size`` and
``source.channels`` or the first row that decodes). A source with noisy data is only ingested (``clean_fraction``
1): another corruption would change its σ_n. A user's noisy row with σ_n > 0 is ``quality=corrupted``,
``corruption`` ``user_noise``. Noise on a row whose own mask hides pixels: the hidden pixels are −1 in ``noisy``
(0 in the image), with no noise.

Each file is written atomically, and a shard counts as done only once its marker exists, so a
re-run after a kill redoes exactly the unfinished shards and never duplicates a row. The plan is
fingerprinted in ``OUT/_manifest.json``: re-running with a different plan into the same ``out`` is
refused unless ``overwrite`` is set. Rows in = rows out + rows quarantined, checked at the end.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from ambient_ray import config as cfgmod
from ambient_ray import corruptions
from ambient_ray.config import flag
from ambient_ray.data import noisy as noisy_data
from ambient_ray.data import schema
from ambient_ray.data.images import encode_png
from ambient_ray.data.schema import DATA_SCHEMA, QUARANTINE_SCHEMA
from ambient_ray.data.sources import SourceConfig, decode, decode_row, list_items, make_source, unjson
from ambient_ray.io import ray_runtime, shards, storage
from ambient_ray.stages.actor_stage import ActorStage, ShardedConfig
from ambient_ray.stages.results import StageFailed


class CorruptConfig(ShardedConfig):
    """Config of ``ambient-ray corrupt`` (YAML keys; ``--set source.image_size=32`` and so on)."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    corruptions: list[str] = Field(
        default_factory=lambda: ["blur:sigma=1.0"],
        min_length=1,
        description="corruption specs NAME:KEY=V,...; the non-clean rows are split evenly among them",
        json_schema_extra=flag(
            "--corruption", "corruption spec, e.g. blur:sigma=0.6 (repeat to split the corrupted part)"
        ),
    )
    clean_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="fraction of rows kept clean (the ids with the smallest seeded hash)",
        json_schema_extra=flag("--clean-fraction", "fraction of rows kept clean"),
    )
    seed: int = Field(
        0,
        ge=0,
        description="seed of the clean subset and of each row's corruption",
        json_schema_extra=flag("--seed", "seed for the clean subset and the corruptions"),
    )
    shard_size: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="rows per output shard (and per Ray task)",
        json_schema_extra=flag("--shard-size", "rows per output shard"),
    )
    plugins: list[str] = Field(
        default_factory=list,
        description="modules that register extra corruptions",
        json_schema_extra=flag("--plugin", "module registering extra corruptions (repeatable)"),
    )
    overwrite: bool = Field(
        False,
        description="replace a corrupt run in 'out' whose plan (config or source) differs",
        json_schema_extra=flag("--overwrite", "replace an existing run with a different plan"),
    )
    num_cpus_per_task: float = Field(1.0, gt=0, description="CPUs each shard's Ray task reserves")
    task_retries: int = Field(
        3, ge=0, description="retries of a shard whose worker died (Ray's own default retries forever)"
    )
    preview: int = Field(8, ge=0, description="rows per corruption shown in preview.png (0: none)")

    @field_validator("corruptions")
    @classmethod
    def _specs_nonempty(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("corruption specs must not be empty")
        return v


@dataclass
class CorruptResult:
    out: str
    rows_in: int
    rows_out: int
    rows_quarantined: int
    shards_total: int
    shards_run: int
    shards_skipped: int
    rows_run: int
    seconds: float
    images_per_s: float

    def summary(self) -> str:
        return (
            f"corrupt: {self.rows_in} rows in, {self.rows_out} out, {self.rows_quarantined} quarantined; "
            f"{self.shards_run} shards run, {self.shards_skipped} already done (of {self.shards_total}); "
            f"{self.rows_run} rows in {self.seconds:.1f}s = {self.images_per_s:.0f} images/s -> {self.out}"
        )


def load_plugins(modules: list[str]) -> None:
    """Import modules that register corruptions, and ship them to Ray workers by value."""
    import ray.cloudpickle

    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            raise cfgmod.ConfigError(f"config key 'plugins': cannot import {name!r}: {e}") from None
        ray.cloudpickle.register_pickle_by_value(mod)


def _hash(*parts: Any) -> int:
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1  # fits int64


def plan_rows(ids: list[str], n_specs: int, clean_fraction: float, seed: int) -> tuple[list[str], list[int]]:
    """Roles (``clean``, ``c<i>`` for spec i, or ``dup`` for a repeated id) and per-row seeds."""
    roles = ["dup"] * len(ids)
    seen: set[str] = set()
    unique: list[int] = []
    for i, rid in enumerate(ids):
        if rid not in seen:
            seen.add(rid)
            unique.append(i)
    order = sorted(unique, key=lambda i: _hash("clean", seed, ids[i]))
    n_clean = int(round(clean_fraction * len(unique)))
    for rank, i in enumerate(order):
        roles[i] = "clean" if rank < n_clean else f"c{(rank - n_clean) % n_specs}"
    seeds = [_hash("row", seed, rid) for rid in ids]
    return roles, seeds


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


USER_MASK = "user_mask"  # the corruption column of a row whose own mask hides pixels
USER_NOISE = "user_noise"  # the corruption column of a row of the user's noisy data with σ_n > 0
NOISY_SCHEMA = DATA_SCHEMA.append(pa.field(noisy_data.SIGMA_N, pa.float64()))  # + the noisy tensor column


def process_shard(
    batch: dict,
    *,
    source,
    source_cfg: SourceConfig,
    specs: list,
    out: str,
    fingerprint: str = "",
    mask_hw: list[int] | tuple[int, int] | None = None,
    noisy_chw: list[int] | tuple[int, int, int] | None = None,
) -> dict:
    """One shard in (its plan as a one-row batch), its summary row out; runs as a Ray task. With ``mask_hw``
    (H, W) every row gets a ``mask`` column of that shape; with ``noisy_chw`` (C, H, W) a ``noisy`` column of that
    shape and ``sigma_n``."""
    t0 = time.perf_counter()
    k = int(batch["shard"][0])
    payload = json.loads(batch["payload"][0])
    ids, roles, seeds = payload["ids"], payload["roles"], payload["seeds"]
    locs = [unjson(x) for x in payload["locs"]]
    try:
        records = source.load(locs)
    except Exception as e:  # a shard-level read failure: every row of it goes to quarantine with the reason
        records = [{"error": f"cannot load: {type(e).__name__}: {e}", "image": b""} for _ in locs]

    good: list[dict] = []
    bad: list[dict] = []

    def quarantine(i: int, reason: str) -> None:
        raw = records[i].get("image")
        bad.append(
            {
                "id": ids[i],
                "source": records[i].get("source") or getattr(source, "name", ""),
                "locator": json.dumps(payload["locs"][i]),
                "stage": "corrupt",
                "reason": reason,
                "image": raw if isinstance(raw, bytes) else (encode_png(raw) if isinstance(raw, np.ndarray) else b""),
            }
        )

    arrays: dict[int, np.ndarray] = {}
    user_masks: dict[int, np.ndarray] = {}  # the rows whose own mask hides pixels
    user_noisy: dict[int, tuple[np.ndarray, float]] = {}  # the rows of the user's noisy data: (y, σ_n)
    hw = tuple(mask_hw) if mask_hw is not None else None
    chw = tuple(noisy_chw) if noisy_chw is not None else None
    for i, rec in enumerate(records):
        if roles[i] == "dup":
            quarantine(i, f"duplicate id {ids[i]!r} (an earlier row has the same id)")
            continue
        if hw is None and chw is None:
            arr, err = decode(rec, source_cfg)
        else:
            arr, umask, uy, usigma, err = decode_row(rec, source_cfg)
            if not err and hw is not None and arr.shape[:2] != hw:
                err = (
                    f"image is {arr.shape[0]}x{arr.shape[1]}, the dataset's masks are {hw[0]}x{hw[1]} "
                    "(a dataset with masks has one image shape: set source.image_size)"
                )
            if not err and chw is not None and arr.shape != (chw[1], chw[2], chw[0]):
                h, w, c = arr.shape
                err = (
                    f"{'noisy data' if uy is not None else 'image'} is {c}x{h}x{w} (CxHxW), the dataset's noisy "
                    f"data is {chw[0]}x{chw[1]}x{chw[2]} (a dataset with noisy data has one shape: set "
                    "source.image_size and source.channels)"
                )
            if not err and umask is not None:
                user_masks[i] = umask
            if not err and uy is not None:
                user_noisy[i] = (uy, usigma)
        if err:
            quarantine(i, err)
        else:
            arrays[i] = arr

    def emit(
        i: int,
        arr: np.ndarray,
        quality: str,
        spec: str,
        mask: np.ndarray | None = None,
        noisy: np.ndarray | None = None,
        sigma_n: float = 0.0,
    ) -> None:
        rec = records[i]
        h, w, c = arr.shape
        row = {
            "id": ids[i],
            "image": encode_png(arr),
            "height": h,
            "width": w,
            "channels": c,
            "label": rec.get("label"),
            "caption": rec.get("caption"),
            "source": rec.get("source") or source.name,
            "quality": quality,
            "corruption": spec,
            "seed": seeds[i],
        }
        if hw is not None:
            row["mask"] = (np.ones((h, w), np.uint8) if mask is None else mask)[None]
        if chw is not None:  # a row without noise holds its image, as floats in the [-1, 1] data scale
            row[noisy_data.NOISY] = noisy_data.from_image(arr) if noisy is None else noisy
            row[noisy_data.SIGMA_N] = float(sigma_n)
        good.append(row)

    by_role: dict[str, list[int]] = {}
    for i in arrays:
        by_role.setdefault(roles[i], []).append(i)
    for role, idx in by_role.items():
        if role == "clean":
            for i in idx:
                y, sigma = user_noisy.get(i, (None, 0.0))
                kinds = ([USER_NOISE] if sigma > 0 else []) + ([USER_MASK] if i in user_masks else [])
                quality = "corrupted" if kinds else "clean"
                emit(i, arrays[i], quality, "+".join(kinds), user_masks.get(i), y, sigma)
            continue
        spec = specs[int(role[1:])]
        try:
            a = corruptions.apply_all(spec, [arrays[i] for i in idx], [seeds[i] for i in idx])
            results = list(zip(idx, a.images, a.masks, a.noisy, a.sigma_n))
        except Exception:  # isolate the rows that fail
            results = []
            for i in idx:
                try:
                    a = corruptions.apply_all(spec, [arrays[i]], [seeds[i]])
                    results.append((i, a.images[0], a.masks[0], a.noisy[0], a.sigma_n[0]))
                except Exception as e:
                    quarantine(i, f"corruption {spec.spec} failed: {type(e).__name__}: {e}")
        for i, arr, mask, y, sigma in results:
            if i in user_masks:  # hidden by the user or by the corruption
                mask = mask & user_masks[i]
                if y is not None:  # a hidden pixel is the image's 0 (−1 in the data scale), without noise
                    y = np.where(mask[None] != 0, y, np.float32(-1.0))
                emit(i, arr * mask[..., None], "corrupted", f"{spec.spec}+{USER_MASK}", mask, y, sigma)
            else:
                emit(i, arr, "corrupted", spec.spec, mask if spec.masks else None, y, sigma)

    order = {rid: n for n, rid in enumerate(ids)}
    good.sort(key=lambda r: order[r["id"]])
    name = _shard_name(k)
    data_uri = storage.join(out, "data", f"{name}.parquet")
    if hw is None and chw is None:
        table = pa.Table.from_pylist(good, schema=DATA_SCHEMA)
        refused = pa.Table.from_pylist([], schema=QUARANTINE_SCHEMA)
    else:  # the tensor columns through the schema's validation: a row it refuses goes to quarantine
        specs = ([schema.mask_spec(*hw)] if hw is not None else []) + (
            [schema.noisy_spec(*chw)] if chw is not None else []
        )
        table, refused = schema.validate(
            good, specs, schema=NOISY_SCHEMA if chw is not None else DATA_SCHEMA, where=data_uri
        )
    if bad or refused.num_rows:
        quarantined = pa.concat_tables([pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA), refused])
        storage.write_parquet(storage.join(out, "quarantine", f"{name}.parquet"), quarantined)
    storage.write_parquet(data_uri, table)
    summary = {
        "shard": k,
        "rows_in": len(ids),
        "rows_out": table.num_rows,
        "rows_quarantined": len(bad) + refused.num_rows,
        "seconds": time.perf_counter() - t0,
    }
    if summary["rows_out"] + summary["rows_quarantined"] != summary["rows_in"]:
        raise RuntimeError(f"shard {k}: row count mismatch {summary}")
    shards.mark_done(storage.join(out, "_done"), name, fingerprint, summary)
    return {key: np.array([v]) for key, v in summary.items()}


def _fingerprint(cfg: CorruptConfig, ids: list[str], source_masks: bool = False, source_noisy: bool = False) -> str:
    keep = cfg.model_dump(mode="json", exclude={"out", "overwrite", "num_cpus_per_task", "task_retries", "preview"})
    if keep["source"].get("sigma_n") is None:  # a plan without noisy data keeps its old fingerprint
        keep["source"].pop("sigma_n", None)
    if source_masks:  # the source's own masks change the output (a plan without them keeps its old fingerprint)
        keep["source_masks"] = True
    if source_noisy:
        keep["source_noisy"] = True
    return shards.fingerprint(keep, ids)


def first_shape(source, source_cfg: SourceConfig, items: list, chunk: int = 16) -> tuple[int, int, int] | None:
    """The (H, W, C) of the first row (in listing order) that decodes (its noisy data's, for a row of noisy data);
    None if none does (then every row is quarantined anyway)."""
    for s in range(0, len(items), chunk):
        locs = [loc for _, loc in items[s : s + chunk]]
        try:
            records = source.load(locs)
        except Exception:  # the shard's own task quarantines these rows with the reason
            continue
        for rec in records:
            arr, _, _, _, err = decode_row(rec, source_cfg)
            if not err:
                return arr.shape
    return None


def mask_shape(source, source_cfg: SourceConfig, items: list, chunk: int = 16) -> tuple[int, int] | None:
    """The (H, W) of a dataset's masks: ``source.image_size``'s square, or the shape of the first row (in
    listing order) that decodes; None if none does (then every row is quarantined anyway)."""
    if source_cfg.image_size is not None:
        return source_cfg.image_size, source_cfg.image_size
    shape = first_shape(source, source_cfg, items, chunk)
    return None if shape is None else shape[:2]


def noisy_shape(source, source_cfg: SourceConfig, items: list, chunk: int = 16) -> tuple[int, int, int] | None:
    """The (C, H, W) of a dataset's noisy data: ``source.channels`` and ``source.image_size``'s square where set,
    the rest from the first row that decodes; None if none does."""
    size, channels = source_cfg.image_size, source_cfg.channels
    if size is not None and channels is not None:
        return channels, size, size
    shape = first_shape(source, source_cfg, items, chunk)
    if shape is None:
        return None
    h, w, c = shape
    return (channels or c, *((size, size) if size is not None else (h, w)))


def done_shards(out: str, fingerprint: str) -> dict[int, dict]:
    """The shards of this plan that have their done-marker (a marker of another plan does not count)."""
    return {int(s["shard"]): s for s in shards.done_all(storage.join(out, "_done"), fingerprint).values()}


class Corrupt(ActorStage):
    """The corrupt stage on :class:`ActorStage`: one Ray task per shard of the source's listing (Ray Core's
    retries bound the retries of a shard whose worker died)."""

    label = "corrupt"
    held = "a corrupt run with a different plan (config or source changed)"
    replace = " to replace it"

    def check(self) -> None:
        load_plugins(self.cfg.plugins)
        self.specs = [corruptions.parse(s) for s in self.cfg.corruptions]  # clear errors before any work

    def plan(self) -> None:
        cfg = self.cfg
        if storage.is_s3(cfg.source.dataset):
            storage.check_reachable(cfg.source.dataset)
        self.source = make_source(cfg.source)
        self.items = list_items(self.source, cfg.source)
        self.ids = [i for i, _ in self.items]
        self.roles, self.seeds = plan_rows(self.ids, len(self.specs), cfg.clean_fraction, cfg.seed)
        n_shards = (len(self.items) + cfg.shard_size - 1) // cfg.shard_size
        source_masks = bool(getattr(self.source, "has_masks", False))
        source_noisy = bool(getattr(self.source, "has_noisy", False))
        if source_noisy and cfg.clean_fraction < 1:
            raise cfgmod.ConfigError(
                f"config key 'clean_fraction': {cfg.source.dataset} brings noisy data (a '{noisy_data.NOISY}' "
                "column or .npy arrays), which is ingested as it is: set --clean-fraction 1 (another corruption on "
                "top would change its σ_n)"
            )
        if cfg.source.sigma_n is not None and not source_noisy:
            raise cfgmod.ConfigError(
                f"config key 'source.sigma_n': {cfg.source.dataset} has no noisy data (a Parquet "
                f"'{noisy_data.NOISY}' column, or a folder of .npy arrays) for it to describe; drop it (the noise "
                "corruption is --corruption noise:sigma=S)"
            )
        self.fingerprint = _fingerprint(cfg, self.ids, source_masks, source_noisy)
        self.shards = [_shard_name(k) for k in range(n_shards)]
        self.manifest = {"rows": len(self.items), "shards": n_shards, "shard_size": cfg.shard_size}
        self.mask_hw = self.noisy_chw = None
        if source_masks or any(s.masks for s in self.specs):
            self.mask_hw = mask_shape(self.source, cfg.source, self.items) or (1, 1)
            self.manifest["mask"] = list(self.mask_hw)
        if source_noisy or any(s.noisy for s in self.specs):
            self.noisy_chw = noisy_shape(self.source, cfg.source, self.items) or (1, 1, 1)
            self.manifest["noisy"] = list(self.noisy_chw)

    def work(self, todo: list[str]) -> list[dict]:
        cfg, size = self.cfg, self.cfg.shard_size
        index = {name: k for k, name in enumerate(self.shards)}
        batches = []
        for name in todo:
            k = index[name]
            s = slice(k * size, (k + 1) * size)
            payload = {
                "ids": self.ids[s],
                "locs": [loc for _, loc in self.items[s]],
                "roles": self.roles[s],
                "seeds": self.seeds[s],
            }
            batches.append({"shard": [k], "payload": [json.dumps(payload)]})
        try:
            # one Ray task per shard: Ray Core's max_retries bounds the retries of a shard whose worker died
            # (Ray Data's map_batches takes it only through the deprecated ray_remote_args)
            summaries = ray_runtime.run_tasks(
                process_shard,
                batches,
                label="corrupt",
                unit="shards",
                num_cpus=cfg.num_cpus_per_task,
                max_retries=cfg.task_retries,
                kwargs={
                    "source": self.source,
                    "source_cfg": cfg.source,
                    "specs": self.specs,
                    "out": self.out,
                    "fingerprint": self.fingerprint,
                    "mask_hw": self.mask_hw,
                    "noisy_chw": self.noisy_chw,
                },
                enabled=self.progress,
            )
        except Exception as e:
            finished = len(done_shards(self.out, self.fingerprint))
            cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise StageFailed(
                f"corrupt stage failed with {finished} of {len(self.shards)} shards complete in {self.out}: {cause}\n"
                "completed shards are kept; re-run the same command to resume"
            ) from e
        return [{k: v[0] for k, v in summary.items()} for summary in summaries]

    def finish(self, done: dict[str, dict], ran: list[dict], seconds: float) -> CorruptResult:
        rows_in = sum(d["rows_in"] for d in done.values())
        rows_out = sum(d["rows_out"] for d in done.values())
        rows_q = sum(d["rows_quarantined"] for d in done.values())
        self.conserve(len(self.items), rows_in, rows_out, rows_q)
        rows_run = sum(int(r["rows_in"]) for r in ran)
        result = CorruptResult(
            out=self.out,
            rows_in=rows_in,
            rows_out=rows_out,
            rows_quarantined=rows_q,
            shards_total=len(self.shards),
            shards_run=len(ran),
            shards_skipped=len(self.shards) - len(ran),
            rows_run=rows_run,
            seconds=seconds,
            images_per_s=rows_run / seconds if seconds > 0 and rows_run else 0.0,
        )
        storage.write_bytes(storage.join(self.out, "summary.json"), json.dumps(asdict(result), indent=1).encode())
        if self.cfg.preview:
            from ambient_ray.data.preview import corruption_preview

            corruption_preview(
                self.out, self.source, self.cfg, self.items, self.roles, self.specs, per_spec=self.cfg.preview
            )
        return result


def run(cfg: CorruptConfig, *, progress: bool = True) -> CorruptResult:
    """Run the corrupt stage (connecting to Ray, or starting it in-process)."""
    return Corrupt(cfg, progress).run()
