"""Prompts to the caption embeddings a text-to-image model was trained on."""

from __future__ import annotations

from ambient_ray.config import ConfigError


def encode_prompts(meta: dict | None, prompts: list[str], text_encoder: str | None = None):
    """Caption embeddings and masks of ``prompts`` by the text encoder a model's captions were made with (the
    precompute stage's, recorded in its model.json; ``text_encoder`` overrides the location, e.g. on another
    machine). Another encoder than that one (other weights) is refused."""
    from ambient_ray.models import encoders

    info = (meta or {}).get("latents") or {}
    uri = text_encoder or info.get("text_encoder")
    if not uri:
        raise ConfigError("config key 'text_encoder': the model records no text encoder; give its folder")
    enc = encoders.load_text_encoder(uri)
    if info.get("text_fingerprint") and enc.fingerprint != info["text_fingerprint"]:
        raise ConfigError(f"the text encoder at {uri} is not the one this model's captions were made with")
    emb, mask = enc.encode(list(prompts))
    if info.get("emb_dtype") == "float16":  # as the training rows were stored
        emb = emb.half()
    return emb.float(), mask.float()
