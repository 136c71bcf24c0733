"""Inference weights on storage: a folder with ``model.json`` (what the network is) and safetensors.

Written by the training engine (``OUT/model/``); read here (:func:`load`, for every kind and arch) for
sampling, annotation and the locality map. Nothing is unpickled. A folder of the wrong kind (a denoiser where
a classifier is wanted, a crops classifier where a noise classifier is wanted) or for another image size is
refused with a message that says what it is.
"""

from __future__ import annotations

import json

import torch

from ambient_ray.io import storage

KIND_NAMES = {
    "denoiser": "diffusion model (ambient-ray train)",
    "noise": "noise classifier",
    "crops": "crops classifier",
}


def model_dir(uri: str) -> tuple[str, dict]:
    """The folder holding ``model.json`` (``uri`` or ``uri/model``) and its contents."""
    uri = storage.normalize(uri)
    d = storage.join(uri, "model") if storage.exists(storage.join(uri, "model", "model.json")) else uri
    try:
        meta = json.loads(storage.read_bytes(storage.join(d, "model.json")))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no model.json in {uri} (nor in {uri}/model): not a training output or model folder"
        ) from None
    return d, meta


def check_kind(uri: str, meta: dict, wanted: str) -> None:
    kind = meta.get("kind", "denoiser")
    if kind != wanted:
        raise ValueError(f"{uri} holds a {KIND_NAMES.get(kind, kind)}, not a {KIND_NAMES[wanted]}")


def load_into(net: torch.nn.Module, d: str, weights: str = "ema") -> torch.nn.Module:
    """Load ``d/{ema,model}.safetensors`` into ``net`` (every tensor must fit) a tensor at a time (a DeepSpeed
    ZeRO-3 partitioned parameter takes only this rank's partition: :func:`assign_`); returns it in eval mode."""
    import tempfile

    from safetensors import safe_open

    fname = "ema.safetensors" if weights == "ema" else "model.safetensors"
    path, own = storage.join(d, fname), dict(net.named_parameters())
    with tempfile.TemporaryDirectory() as tmp:
        if storage.is_s3(path):  # a local copy, read a tensor at a time like a local file
            storage.download(path, local := f"{tmp}/{fname}")
            path = local
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            missing, unexpected = sorted(set(own) - names), sorted(names - set(own))
            wrong = [k for k in own if k in names and tuple(f.get_slice(k).get_shape()) != full_shape(own[k])]
            if missing or unexpected or wrong:
                raise ValueError(
                    f"weights in {d}/{fname} do not fit the model of its model.json: "
                    f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}"
                )
            for k, p in own.items():
                assign_(p, f.get_tensor(k))
    return net.eval()


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's whole shape (a DeepSpeed ZeRO-3 parameter's ``ds_shape``: its ``shape`` is a placeholder)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def partition_span(p: torch.Tensor, rank: int | None = None) -> tuple[int, int]:
    """A DeepSpeed ZeRO-3 parameter's partition on ``rank`` (default this process's rank in its partition group):
    the index of its first element in the flat parameter and its real elements. ZeRO-3 pads the flattened
    parameter to a multiple of the group's size and gives rank r the slice [r·s, (r + 1)·s) in ``p.ds_tensor``
    (``s`` elements; the padding at the end of the last ranks' slices, none real where the parameter is small).
    Plain attributes (``ds_tensor``, ``ds_numel``, ``ds_process_group``): no DeepSpeed import."""
    import torch.distributed as dist

    size = p.ds_tensor.numel()
    if rank is None:
        rank = dist.get_rank(group=getattr(p, "ds_process_group", None))
    start = min(rank * size, p.ds_numel)
    return start, min(size, p.ds_numel - start)


@torch.no_grad()
def assign_(p: torch.Tensor, full: torch.Tensor) -> None:
    """Set parameter ``p`` to ``full`` (its whole value). A DeepSpeed ZeRO-3 parameter takes its partition's slice
    alone (:func:`partition_span`), and its whole copy too where one is gathered."""
    part = getattr(p, "ds_tensor", None)
    if part is None:
        p.copy_(full)
        return
    flat = full.reshape(-1)
    start, n = partition_span(p)
    part.data.view(-1)[:n].copy_(flat[start : start + n])
    if p.data.numel() == flat.numel():
        p.data.copy_(full.view(p.data.shape))


def load(
    uri: str,
    kind: str | None = None,
    weights: str = "ema",
    *,
    img_resolution: int | None = None,
    channels: int | None = None,
) -> torch.nn.Module:
    """Any trained network of ambient-ray: rebuilt from ``model.json`` through the model registry (its ``arch``;
    a file without one is ``ddpmpp``) and loaded from safetensors, in eval mode, with ``.meta`` = its model.json.

    ``kind`` (``denoiser``, ``noise``, ``crops``) refuses a folder of another kind; ``img_resolution`` and
    ``channels`` check the network against the data (a crops classifier takes any crop size)."""
    from ambient_ray.models import registry

    d, meta = model_dir(uri)
    if kind is not None:
        check_kind(uri, meta, kind)
    kind = meta.get("kind", "denoiser")
    model = meta["model"]
    name = KIND_NAMES.get(kind, kind)
    if channels is not None and model["in_channels"] != channels:
        raise ValueError(f"the {name} in {uri} takes {model['in_channels']}-channel images; the data has {channels}")
    if kind != "crops" and img_resolution is not None and model["img_resolution"] != img_resolution:
        res = model["img_resolution"]
        raise ValueError(
            f"the {name} in {uri} was trained on {res}x{res} images; the data is {img_resolution}x{img_resolution}"
        )
    net = registry.build(meta)
    net.meta = meta
    return load_into(net, d, weights)
