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
    """Load ``d/{ema,model}.safetensors`` into ``net`` (every tensor must fit); returns it in eval mode."""
    from safetensors.torch import load

    fname = "ema.safetensors" if weights == "ema" else "model.safetensors"
    state = load(storage.read_bytes(storage.join(d, fname)))
    own = dict(net.named_parameters())
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"weights in {d}/{fname} do not fit the model of its model.json: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}"
        )
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])
    return net.eval()


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
