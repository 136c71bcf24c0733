"""Image and text encoders of the latent and caption path, behind two small interfaces (pure torch; no Ray).

Image encoders (:class:`ImageEncoder`, chosen by name through :data:`IMAGE_ENCODERS`):

- ``vae``: a diffusers ``AutoencoderKL`` from users' weights. ``encode`` maps images (B, C, H, W) in [-1, 1] to
  the mean and std of the latent distribution (B, c, H/f, W/f), unscaled (as EDM2 stores them: the data's own
  per-channel statistics rescale them later; ``scaling_factor`` of the config is exposed, not applied).
  ``decode`` maps latents back to images in [-1, 1]. SD-style VAEs take 3 channels: grey images (C = 1) are
  repeated to 3 channels before encoding, and ``decode(latents, channels=1)`` averages the 3 back to one.
- ``pixels``: the identity, for pixel-space runs (mean = image, std = 0), with the same interface.

Text encoders (:class:`TextEncoder`, chosen by the folder's contents): ``encode(captions)`` gives per-token
embeddings (B, T, D) float32 and a bool mask (B, T) of the real tokens (start and end tokens included, padding
excluded), every caption padded (or truncated) to the same T, so a caption's embedding does not depend on the
batch it is in. The embeddings are the *last hidden state* of the text tower (after its final layer norm, before
any pooling or projection), in eval mode (no dropout).

- ``transformers``: ``CLIPTextModel`` (config ``model_type`` ``clip_text_model``, or a full ``clip`` model whose
  text half is taken), ``T5EncoderModel`` (``t5``) or ``UMT5EncoderModel`` (``umt5``), with ``AutoTokenizer``
  from the same folder (or a tokenizer subfolder); T is the tokenizer's ``model_max_length`` (77 for CLIP) unless
  ``max_length`` is given.
- ``open_clip``: a folder in open_clip's ``local-dir:`` form (``open_clip_config.json`` with ``model_cfg``, and
  its weights, e.g. ``open_clip_model.safetensors``); named ``local-dir:PATH`` or detected by its config. The
  vision tower is built by open_clip and dropped. T is the config's ``context_length``.

Weights come from a local folder or an ``s3://`` prefix (copied once per node, :mod:`ambient_ray.io.fetch`) and
are loaded offline (``local_files_only``; ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set while loading).
A missing, unreadable or wrong folder is refused before any weight is read, naming it (``FileNotFoundError`` or
:class:`~ambient_ray.config.ConfigError`: exit code 2 on the CLI). Every encoder has a ``fingerprint``: the
sha256 of its weight, config and tokenizer files (:func:`ambient_ray.io.fetch.folder_sha256`), for provenance.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from functools import cached_property

import torch

from ambient_ray.config import ConfigError
from ambient_ray.io import fetch, storage
from ambient_ray.registry import Registry

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
OPEN_CLIP_PREFIXES = ("local-dir:", "open_clip:", "openclip:")
HF_TEXT_MODELS = {  # config.json model_type -> transformers class name
    "clip_text_model": "CLIPTextModel",
    "clip": "CLIPTextModel",  # a full CLIPModel folder (e.g. openai/clip-vit-large-patch14): its text half
    "t5": "T5EncoderModel",
    "umt5": "UMT5EncoderModel",
}
SUPPORTED_TEXT = ", ".join(HF_TEXT_MODELS) + ", or local-dir: open_clip"

Entries = list[tuple[str, int, str]]


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` while loading (restored after). huggingface_hub reads
    them when it is first imported, so they count when the loaders import it here; ``local_files_only`` on a
    local folder is what guarantees that nothing is downloaded either way."""
    old = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update({k: "1" for k in OFFLINE_ENV})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fail_to_load(label: str, what: str, e: Exception) -> ConfigError:
    return ConfigError(f"{label}: cannot be loaded as {what}: {type(e).__name__}: {e}")


_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError)


def _reraise_oom(e: Exception) -> None:
    if isinstance(e, torch.OutOfMemoryError):
        raise e


# ------------------------------------------------------------------------------------------------ sources


def _label(what: str, uri: str, subfolder: str | None = None) -> str:
    return f"{what} {uri}" + (f" (subfolder {subfolder})" if subfolder else "")


def _sub(entries: Entries, subfolder: str | None, label: str) -> Entries:
    """The entries inside ``subfolder`` (names relative to it); all of them for None."""
    if not subfolder:
        return entries
    prefix = subfolder.strip("/") + "/"
    out = [(rel[len(prefix) :], size, mtime) for rel, size, mtime in entries if rel.startswith(prefix)]
    if not out:
        tops = sorted({rel.split("/")[0] for rel, _, _ in entries})
        raise FileNotFoundError(f"{label}: no subfolder {subfolder!r} (it holds: {', '.join(tops[:12]) or 'nothing'})")
    return out


def _top_names(entries: Entries) -> set[str]:
    return {rel for rel, _, _ in entries if "/" not in rel}


def _read_json(folder_uri: str, name: str, label: str) -> dict:
    try:
        data = json.loads(storage.read_bytes(storage.join(folder_uri, name)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{label}: no {name}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{label}: {name} is not valid JSON ({e})") from None
    except PermissionError:
        raise ConfigError(f"{label}: {name} cannot be read (permissions)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: {name} is not a JSON object")
    return data


def _where(uri: str, subfolder: str | None) -> str:
    return storage.join(uri, subfolder.strip("/")) if subfolder else uri


def _cfg_kind(cfg: dict) -> str:
    if "model_type" in cfg:
        return f"a transformers {cfg['model_type']!r} model"
    if "_class_name" in cfg:
        return f"a diffusers {cfg['_class_name']!r}"
    return "not a model config"


# ------------------------------------------------------------------------------------------------ images


class ImageEncoder(abc.ABC):
    """Images (B, C, H, W) in [-1, 1] to the (mean, std) of their latents (B, c, H/f, W/f), and back."""

    kind: str
    source: str | None  # the URI of the weights (None for pixels)
    in_channels: int | None  # channels the network takes (None: any)
    latent_channels: int | None  # c (None: as many as the images have)
    factor: int  # f: the spatial downsampling factor

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) float32 on the images' device."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] (float32, on the latents' device); ``channels=1`` averages RGB to grey."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str: ...

    def latent_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int]:
        """(c, h, w) of the latents of images of shape (channels, height, width); refuses sizes not divisible by f."""
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"{self.kind} encoder: images of {height}x{width} are not divisible by its factor {self.factor}"
            )
        return (self.latent_channels or channels, height // self.factor, width // self.factor)

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"{self.kind} encoder: images must be (B, C, H, W), got shape {tuple(images.shape)}")
        c, h, w = images.shape[1:]
        if self.in_channels is not None and c not in (1, self.in_channels):
            raise ValueError(f"{self.kind} encoder takes 1 or {self.in_channels} channels, got {c}")
        self.latent_shape(c, h, w)
        return images


class PixelEncoder(ImageEncoder):
    """The identity (pixel-space runs): mean = the images, std = 0; ``decode`` clamps to [-1, 1]."""

    kind = "pixels"
    source = None
    factor = 1

    def __init__(self, channels: int | None = None):
        self.in_channels = channels
        self.latent_channels = channels

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check(images).float()
        return x, torch.zeros_like(x)

    def decode(self, latents: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        x = latents.float().clamp(-1, 1)
        return x.mean(1, keepdim=True) if channels == 1 and x.shape[1] != 1 else x

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(b"ambient-ray image encoder: pixels (identity)").hexdigest()


class VAEEncoder(ImageEncoder):
    """A diffusers ``AutoencoderKL`` (see the module's docs); ``folder`` is the local folder of its files."""

    kind = "vae"

    def __init__(self, vae, folder: str, source: str | None = None, device="cpu", dtype=torch.float32):
        self.vae = vae.to(device).eval().requires_grad_(False)  # loaded in ``dtype`` (diffusers keeps fp32 parts)
        self.folder, self.source = folder, source
        self.device, self.dtype = torch.device(device), dtype
        cfg = vae.config
        self.config = dict(cfg)
        self.in_channels = int(cfg.in_channels)
        self.latent_channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = cfg.get("scaling_factor")
        self.shift_factor = cfg.get("shift_factor")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check(images)
        if x.shape[1] == 1 and self.in_channels != 1:  # grey: the same value in every channel the VAE takes
            x = x.expand(-1, self.in_channels, -1, -1)
        dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        return dist.mean.float().to(images.device), dist.std.float().to(images.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"vae: latents must be (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        x = self.vae.decode(latents.to(self.device, self.dtype)).sample.float().clamp(-1, 1)
        if channels == 1 and x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        return x.to(latents.device)

    @cached_property
    def fingerprint(self) -> str:
        return fetch.folder_sha256(self.folder)


def _load_pixels(uri=None, subfolder=None, device="cpu", dtype=torch.float32, channels=None, what="--vae"):
    if uri:
        raise ConfigError(f"{what} {uri}: the pixels encoder takes no weights (drop {what}, or use the vae encoder)")
    return PixelEncoder(channels)


def _load_vae(uri=None, subfolder=None, device="cpu", dtype=torch.float32, channels=None, what="--vae"):
    if not uri:
        raise ConfigError(f"{what}: the vae encoder needs a folder of diffusers AutoencoderKL weights (local or s3://)")
    src = storage.normalize(uri)
    label = _label(what, uri, subfolder)
    entries = _sub(fetch.listing(src, what), subfolder, label)
    names = _top_names(entries)
    where = _where(src, subfolder)
    if "config.json" not in names:
        hint = ""
        if "model_index.json" in names:
            parts = sorted({rel.split("/")[0] for rel, _, _ in entries if rel.endswith("/config.json")})
            vaes = [p for p in parts if "vae" in p.lower()] or parts
            hint = f"; this is a diffusers pipeline folder: pass {what}-subfolder ({' or '.join(vaes)})"
        raise ConfigError(
            f"{label}: no config.json (expected a diffusers AutoencoderKL folder, "
            f"with {what}-subfolder for a pipeline folder){hint}"
        )
    cfg = _read_json(where, "config.json", label)
    if cfg.get("_class_name") != "AutoencoderKL":
        raise ConfigError(f"{label}: config.json is {_cfg_kind(cfg)}, not a diffusers AutoencoderKL")
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        raise ConfigError(f"{label}: no weights beside config.json (diffusion_pytorch_model.safetensors)")
    folder = fetch.local_folder(where, what, entries)
    with offline():
        from diffusers import AutoencoderKL

        try:
            vae, info = AutoencoderKL.from_pretrained(
                folder,
                local_files_only=True,
                output_loading_info=True,
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
                torch_dtype=dtype,
            )
        except _LOAD_ERRORS as e:
            _reraise_oom(e)
            raise _fail_to_load(label, "a diffusers AutoencoderKL", e) from None
    if info.get("missing_keys"):
        raise ConfigError(f"{label}: the weights do not fit config.json: missing {sorted(info['missing_keys'])[:3]}")
    return VAEEncoder(vae, folder, source=where, device=device, dtype=dtype)


IMAGE_ENCODERS: Registry[Callable[..., ImageEncoder]] = Registry("image encoder")
IMAGE_ENCODERS.register("vae", _load_vae)
IMAGE_ENCODERS.register("pixels", _load_pixels)


def load_image_encoder(
    uri: str | None = None,
    kind: str = "vae",
    subfolder: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    channels: int | None = None,
    what: str = "--vae",
) -> ImageEncoder:
    """The image encoder ``kind`` (``vae`` or ``pixels``). ``uri``: a local folder or ``s3://`` prefix of a
    diffusers ``AutoencoderKL`` (``subfolder``: e.g. ``vae`` of a full pipeline folder); ``channels``: the
    images' channels, for ``pixels``; ``what`` names the source in errors (e.g. the CLI flag)."""
    try:
        loader = IMAGE_ENCODERS.get(kind)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    return loader(uri=uri, subfolder=subfolder, device=device, dtype=dtype, channels=channels, what=what)


def image_encoder(vae: str, subfolder: str | None, channels: int, device: str = "cpu") -> ImageEncoder:
    """The image encoder of ``--vae`` (precompute's key, recorded in a model's ``model.json``): a diffusers
    AutoencoderKL folder, or ``pixels`` (the identity) for images of ``channels`` channels."""
    if vae == "pixels":
        return load_image_encoder(None, kind="pixels", channels=channels, device=device)
    return load_image_encoder(vae, subfolder=subfolder, device=device)


# ------------------------------------------------------------------------------------------------ text


class TextEncoder(abc.ABC):
    """Captions to per-token embeddings (B, T, D) float32 and a mask (B, T) of real tokens, on the CPU."""

    kind: str
    source: str
    max_length: int  # T
    dim: int  # D
    folders: tuple[str, ...]  # the local folders of its weights and tokenizer

    @abc.abstractmethod
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        captions = list(captions)
        bad = [c for c in captions if not isinstance(c, str)]
        if bad:
            raise TypeError(f"{self.kind} text encoder: captions must be strings, got {type(bad[0]).__name__}")
        if not captions:
            return torch.zeros(0, self.max_length, self.dim), torch.zeros(0, self.max_length, dtype=torch.bool)
        emb, mask = self._encode(captions)
        return emb.float().cpu(), mask.bool().cpu()

    @cached_property
    def fingerprint(self) -> str:
        return fetch.folder_sha256(*dict.fromkeys(self.folders))


class HFTextEncoder(TextEncoder):
    """A transformers text encoder (CLIP or T5 family) and its tokenizer."""

    kind = "transformers"

    def __init__(self, model, tokenizer, max_length: int, folders, source: str, device="cpu"):
        self.model = model.to(device).eval().requires_grad_(False)  # loaded in ``dtype``
        self.tokenizer = tokenizer
        self.max_length, self.dim = int(max_length), int(model.config.hidden_size)  # T5: an alias of d_model
        self.folders, self.source, self.device = tuple(folders), source, torch.device(device)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask


class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip model (``open_clip.model.CLIP``, or a ``CustomTextCLIP`` whose text tower is
    open_clip's own ``TextTransformer``): the tokens after its final layer norm, before pooling and projection."""

    kind = "open_clip"

    def __init__(self, model, tokenizer, folder: str, source: str, device="cpu", label: str = "open_clip"):
        from open_clip.model import CLIP
        from open_clip.transformer import TextTransformer

        text = getattr(model, "text", None)
        if isinstance(model, CLIP):
            self._tower, self.dim = "clip", int(model.transformer.width)
        elif isinstance(text, TextTransformer) and text.cls_emb is None:
            self._tower, self.dim = "text", int(text.width)
            text.output_tokens = True
        else:
            raise ConfigError(
                f"{label}: open_clip {type(model).__name__} with a {type(text).__name__} text tower is not supported "
                "(supported: CLIP, or CustomTextCLIP with open_clip's TextTransformer)"
            )
        model.visual = torch.nn.Identity()  # the image tower is not needed: free its memory
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(model.context_length)
        self.eot = getattr(tokenizer, "eot_token_id", None)
        self.pad = int(getattr(text, "pad_id", 0) or 0)
        self.folders, self.source, self.device = (folder,), source, torch.device(device)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(captions).to(self.device)
        t = ids.shape[1]
        if self.eot is not None:  # real tokens: up to and including the first end token
            is_eot = ids == self.eot
            last = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(ids[:, 0], t - 1))
            mask = torch.arange(t, device=ids.device)[None] <= last[:, None]
        else:
            mask = ids != self.pad
        m = self.model
        if self._tower == "clip":  # open_clip's CLIP.encode_text up to its final layer norm
            cast = m.transformer.get_cast_dtype()
            x = m.token_embedding(ids).to(cast) + m.positional_embedding.to(cast)
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        else:
            _, x = m.text(ids)
        return x, mask


def _split_open_clip(uri: str) -> tuple[str, bool]:
    for p in OPEN_CLIP_PREFIXES:
        if uri.startswith(p):
            return uri.removeprefix(p), True
    return uri, False


def _load_hf_text(label, entries, tok_entries, where, tok_where, cfg, max_length, device, dtype, what):
    model_type = cfg.get("model_type")
    if model_type not in HF_TEXT_MODELS:
        raise ConfigError(f"{label}: config.json is {_cfg_kind(cfg)}; supported: {SUPPORTED_TEXT}")
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in _top_names(entries)):
        raise ConfigError(f"{label}: no weights beside config.json (model.safetensors)")
    if not _top_names(tok_entries) & set(TOKENIZER_FILES):
        raise ConfigError(
            f"{label}: no tokenizer in {tok_where} (tokenizer.json, vocab.json + merges.txt, or spiece.model); "
            "give the tokenizer's subfolder if it is elsewhere (a pipeline's 'tokenizer')"
        )
    folder = fetch.local_folder(where, what, entries)
    tok_folder = folder if tok_where == where else fetch.local_folder(tok_where, what, tok_entries)
    with offline():
        import transformers

        try:
            model, info = getattr(transformers, HF_TEXT_MODELS[model_type]).from_pretrained(
                folder, local_files_only=True, output_loading_info=True, dtype=dtype
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(tok_folder, local_files_only=True)
        except _LOAD_ERRORS as e:
            _reraise_oom(e)
            raise _fail_to_load(label, f"a transformers {HF_TEXT_MODELS[model_type]} and its tokenizer", e) from None
    if info.get("missing_keys"):
        raise ConfigError(f"{label}: the weights do not fit config.json: missing {sorted(info['missing_keys'])[:3]}")
    if tokenizer.pad_token is None:
        raise ConfigError(f"{label}: the tokenizer has no pad token (captions are padded to one length)")
    positions = getattr(model.config, "max_position_embeddings", None)
    if max_length is None:
        max_length = tokenizer.model_max_length
        if max_length is None or max_length > 1_000_000:  # transformers' stand-in for "no limit"
            max_length = positions
        if max_length is None:
            raise ConfigError(f"{label}: its tokenizer gives no model_max_length; give the text length (max_length)")
    if positions is not None and max_length > positions:
        raise ConfigError(f"{label}: max_length {max_length} exceeds the model's {positions} positions")
    return HFTextEncoder(model, tokenizer, max_length, (folder, tok_folder), where, device=device)


def _load_open_clip(label, entries, where, max_length, device, what):
    names = _top_names(entries)
    cfg = _read_json(where, "open_clip_config.json", label)
    model_cfg = cfg.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise ConfigError(f"{label}: open_clip_config.json has no 'model_cfg' (open_clip's local-dir: form)")
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        raise ConfigError(
            f"{label}: its text tower is the Hugging Face model {text_cfg['hf_model_name']!r}, which open_clip "
            "fetches from the Hub: not supported offline"
        )
    if text_cfg.get("hf_tokenizer_name") and not names & set(TOKENIZER_FILES):
        raise ConfigError(f"{label}: its config names a Hugging Face tokenizer but the folder holds no tokenizer files")
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):  # open_clip itself would initialise at random
        raise ConfigError(f"{label}: no weights beside open_clip_config.json (open_clip_model.safetensors)")
    if max_length is not None and max_length != text_cfg.get("context_length", 77):
        raise ConfigError(f"{label}: max_length {max_length} differs from its context_length (open_clip's is fixed)")
    folder = fetch.local_folder(where, what, entries)
    with offline():
        import open_clip

        try:
            model = open_clip.create_model("local-dir:" + folder, device=device)
            tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
        except _LOAD_ERRORS as e:
            _reraise_oom(e)
            raise _fail_to_load(label, "an open_clip model (local-dir:)", e) from None
    return OpenCLIPTextEncoder(model, tokenizer, folder, where, device=device, label=label)


def load_text_encoder(
    uri: str,
    device: str | torch.device = "cpu",
    *,
    subfolder: str | None = None,
    tokenizer_subfolder: str | None = None,
    max_length: int | None = None,
    dtype: torch.dtype = torch.float32,
    what: str = "--text-encoder",
) -> TextEncoder:
    """The text encoder in ``uri`` (a local folder or ``s3://`` prefix; ``local-dir:URI`` for open_clip, which is
    also recognised by its ``open_clip_config.json``). ``subfolder`` / ``tokenizer_subfolder``: where the model
    and its tokenizer are inside ``uri`` (a pipeline's ``text_encoder`` and ``tokenizer``; by default the
    tokenizer is beside the model). ``max_length``: T (default: the tokenizer's). ``what`` names it in errors."""
    if not uri:
        raise ConfigError(f"{what}: give a folder (local or s3://) of a text encoder and its tokenizer")
    raw, is_open_clip = _split_open_clip(uri)
    src = storage.normalize(raw)
    label = _label(what, uri, subfolder)
    entries = fetch.listing(src, what)
    model_entries = _sub(entries, subfolder, label)
    names = _top_names(model_entries)
    where = _where(src, subfolder)
    if is_open_clip or ("open_clip_config.json" in names and "config.json" not in names):
        if "open_clip_config.json" not in names:
            raise ConfigError(f"{label}: no open_clip_config.json (expected open_clip's local-dir: folder)")
        return _load_open_clip(label, model_entries, where, max_length, device, what)
    if "config.json" not in names:
        hint = ""
        if "model_index.json" in names:
            hint = "; this is a diffusers pipeline folder: give its text encoder's and tokenizer's subfolders"
        raise ConfigError(
            f"{label}: no config.json (expected a transformers CLIP or T5 text encoder folder with its tokenizer, "
            f"or an open_clip folder with open_clip_config.json){hint}"
        )
    cfg = _read_json(where, "config.json", label)
    tok_entries = _sub(entries, tokenizer_subfolder, _label(what, uri, tokenizer_subfolder))
    tok_where = _where(src, tokenizer_subfolder) if tokenizer_subfolder else where
    if not tokenizer_subfolder:
        tok_entries = model_entries
    return _load_hf_text(label, model_entries, tok_entries, where, tok_where, cfg, max_length, device, dtype, what)
