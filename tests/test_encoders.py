"""The image and text encoders (ambient_ray.models.encoders) on tiny random-initialised models of the real library
classes, saved with save_pretrained and loaded offline from a local folder and from a real S3 prefix."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch

from ambient_ray.cli import user_errors
from ambient_ray.config import ConfigError
from ambient_ray.io import fetch, storage
from ambient_ray.models import encoders
from tests.encoders_fixtures import (
    DIGITS,
    make_tiny_clip_text,
    make_tiny_open_clip,
    make_tiny_t5,
    make_tiny_vae,
    upload_folder,
)

CAPTIONS = [f"a handwritten digit {d}" for d in DIGITS[:3]] + ["a photo of a face", "words it has never seen!"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Every tiny model once: a VAE at f=4 and f=8, CLIP / T5 / open_clip text encoders, a pipeline folder."""
    root = tmp_path_factory.mktemp("encoders")
    out = {
        "vae": make_tiny_vae(root / "vae", factor=4),
        "vae8": make_tiny_vae(root / "vae8", factor=8, seed=1),
        "clip": make_tiny_clip_text(root / "clip"),
        "t5": make_tiny_t5(root / "t5"),
        "open_clip": make_tiny_open_clip(root / "open_clip"),
    }
    pipe = root / "pipeline"  # a diffusers pipeline folder: model_index.json and one folder per component
    shutil.copytree(out["vae"], pipe / "vae")
    shutil.copytree(out["clip"], pipe / "text_encoder")
    shutil.copytree(out["clip"], pipe / "tokenizer")
    for f in ("config.json", "model.safetensors"):
        (pipe / "tokenizer" / f).unlink()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    out["pipeline"] = str(pipe)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh node-local weights cache, and a count of the objects copied into it."""
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    copied = []
    real = fetch._copy_file

    def counting(src, dst):
        copied.append(src)
        real(src, dst)

    monkeypatch.setattr(fetch, "_copy_file", counting)
    return copied


def _images(c=3, n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def test_vae_encodes_to_mean_and_std_and_decodes_back_to_images(tiny):
    vae = encoders.load_image_encoder(tiny["vae"], "vae")
    assert (vae.kind, vae.in_channels, vae.latent_channels, vae.factor) == ("vae", 3, 4, 4)
    for c in (1, 3):  # grey images are repeated to the 3 channels the VAE takes
        mean, std = vae.encode(_images(c))
        assert mean.shape == std.shape == (2, 4, 8, 8) and mean.dtype == torch.float32
        assert (std > 0).all() and torch.isfinite(mean).all()
        assert vae.latent_shape(c, 32, 32) == (4, 8, 8)
    grey = _images(1)
    torch.testing.assert_close(vae.encode(grey)[0], vae.encode(grey.repeat(1, 3, 1, 1))[0], rtol=0, atol=0)
    back = vae.decode(mean)
    assert back.shape == (2, 3, 32, 32) and back.min() >= -1 and back.max() <= 1
    assert vae.decode(mean, channels=1).shape == (2, 1, 32, 32)
    vae8 = encoders.load_image_encoder(tiny["vae8"])
    assert vae8.factor == 8 and vae8.encode(_images())[0].shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="not divisible by its factor 4"):
        vae.encode(_images(size=30))
    with pytest.raises(ValueError, match="takes 1 or 3 channels"):
        vae.encode(_images(c=2))


def test_pixels_is_the_identity(tiny):
    px = encoders.load_image_encoder(None, "pixels")
    x = _images(1)
    mean, std = px.encode(x)
    assert torch.equal(mean, x) and torch.equal(std, torch.zeros_like(x))
    assert torch.equal(px.decode(mean), x.clamp(-1, 1)) and px.factor == 1
    assert px.latent_shape(1, 32, 32) == (1, 32, 32)
    assert px.fingerprint == encoders.load_image_encoder(kind="pixels").fingerprint
    with pytest.raises(ConfigError, match="takes no weights"):
        encoders.load_image_encoder(tiny["vae"], "pixels")
    with pytest.raises(ConfigError, match="unknown image encoder 'vqgan'; registered: pixels, vae"):
        encoders.load_image_encoder(tiny["vae"], "vqgan")


def test_vae_from_s3_gives_the_local_latents_and_is_copied_once_per_node(tiny, s3_prefix, cache):
    upload_folder(tiny["vae"], s3_prefix)
    local = encoders.load_image_encoder(tiny["vae"])
    remote = encoders.load_image_encoder(s3_prefix)
    n_files = len(os.listdir(tiny["vae"]))
    assert len(cache) == n_files
    again = encoders.load_image_encoder(s3_prefix + "/")  # the same prefix: the node's copy, nothing copied
    assert len(cache) == n_files
    x = _images()
    for enc in (remote, again):
        for a, b in zip(enc.encode(x), local.encode(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert remote.fingerprint == local.fingerprint == again.fingerprint
    root = fetch.cache_root()
    assert remote.source == s3_prefix
    copies = [d for d in os.listdir(root) if not d.startswith(".")]
    assert len(copies) == 1 and os.path.join(root, copies[0]) == again.folder
    # a changed object upstream is a new copy, never a stale reuse
    with open(os.path.join(tiny["vae"], "config.json"), "rb") as f:
        storage.write_bytes(storage.join(s3_prefix, "config.json"), f.read() + b"\n")
    encoders.load_image_encoder(s3_prefix)
    assert len(cache) == 2 * n_files


def test_two_loaders_of_one_node_copy_an_s3_prefix_once(tiny, s3_prefix, cache):
    upload_folder(tiny["clip"], s3_prefix)
    got, errors = [], []

    def load():
        try:
            got.append(fetch.local_folder(s3_prefix, "--text-encoder"))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(got)) == 1
    assert len(cache) == len(os.listdir(tiny["clip"]))
    assert not [d for d in os.listdir(fetch.cache_root()) if d.startswith(".tmp-")]


def test_subfolders_of_a_pipeline_folder(tiny, s3_prefix, cache):
    x = _images()
    direct = encoders.load_image_encoder(tiny["vae"])
    sub = encoders.load_image_encoder(tiny["pipeline"], subfolder="vae")
    torch.testing.assert_close(sub.encode(x)[0], direct.encode(x)[0], rtol=0, atol=0)
    assert sub.fingerprint == direct.fingerprint  # the VAE's own files, not the whole pipeline's
    with pytest.raises(ConfigError, match=rf"--vae {tiny['pipeline']}: no config.json .*pass --vae-subfolder \(vae\)"):
        encoders.load_image_encoder(tiny["pipeline"])
    with pytest.raises(FileNotFoundError, match="no subfolder 'unet'"):
        encoders.load_image_encoder(tiny["pipeline"], subfolder="unet")
    upload_folder(tiny["pipeline"], s3_prefix)
    remote = encoders.load_image_encoder(s3_prefix, subfolder="vae")
    assert len(cache) == len(os.listdir(tiny["vae"]))  # only the VAE's files are copied
    torch.testing.assert_close(remote.encode(x)[0], direct.encode(x)[0], rtol=0, atol=0)
    text = encoders.load_text_encoder(tiny["pipeline"], subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    ref = encoders.load_text_encoder(tiny["clip"])
    torch.testing.assert_close(text.encode(CAPTIONS)[0], ref.encode(CAPTIONS)[0], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="pipeline folder: give its text encoder's and tokenizer's subfolders"):
        encoders.load_text_encoder(tiny["pipeline"])


@pytest.mark.parametrize("name, length", [("clip", 77), ("t5", 16), ("open_clip", 77)])
def test_caption_embeddings_are_padded_masked_and_batch_invariant(tiny, name, length):
    enc = encoders.load_text_encoder(("local-dir:" if name == "open_clip" else "") + tiny[name])
    assert enc.kind == ("open_clip" if name == "open_clip" else "transformers")
    assert (enc.max_length, enc.dim) == (length, 32)
    emb, mask = enc.encode(CAPTIONS)
    assert emb.shape == (5, length, 32) and emb.dtype == torch.float32
    assert mask.shape == (5, length) and mask.dtype == torch.bool
    n = mask.sum(1)
    assert (n >= 2).all() and (n < length).all() and n[0] == n[1]  # "a handwritten digit zero/one"
    assert all(mask[i, : n[i]].all() for i in range(5))  # the real tokens come first, then padding
    assert torch.isfinite(emb).all()
    again = encoders.load_text_encoder(tiny[name]).encode(CAPTIONS)[0]  # a fresh load (dropout off: eval mode)
    torch.testing.assert_close(again, emb, rtol=0, atol=0)
    one_by_one = torch.cat([enc.encode([c])[0] for c in CAPTIONS])
    torch.testing.assert_close(one_by_one, emb, rtol=0, atol=1e-6)
    assert not torch.equal(emb[0], emb[1])
    empty_emb, empty_mask = enc.encode([])
    assert empty_emb.shape == (0, length, 32) and empty_mask.shape == (0, length)


def test_open_clip_prefix_is_removed_not_stripped(tiny, tmp_path, monkeypatch):
    # str.lstrip("local-dir:") would eat the leading "cold" of this relative path as well
    shutil.copytree(tiny["open_clip"], tmp_path / "cold-clip")
    monkeypatch.chdir(tmp_path)
    enc = encoders.load_text_encoder("local-dir:cold-clip")
    assert enc.kind == "open_clip" and enc.source == str(tmp_path / "cold-clip")


def test_text_encoder_from_s3(tiny, s3_prefix, cache):
    upload_folder(tiny["clip"], s3_prefix)
    remote = encoders.load_text_encoder(s3_prefix)
    local = encoders.load_text_encoder(tiny["clip"])
    torch.testing.assert_close(remote.encode(CAPTIONS)[0], local.encode(CAPTIONS)[0], rtol=0, atol=0)
    assert remote.fingerprint == local.fingerprint and remote.source == s3_prefix
    upload_folder(tiny["open_clip"], storage.join(s3_prefix, "oc"))
    assert encoders.load_text_encoder("local-dir:" + storage.join(s3_prefix, "oc")).kind == "open_clip"


def test_wrong_folders_are_refused_naming_them(tiny, tmp_path, s3_prefix):
    empty = tmp_path / "empty"
    empty.mkdir()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny["open_clip"], no_weights)
    (no_weights / "open_clip_model.safetensors").unlink()
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    cases = [
        (lambda: encoders.load_image_encoder(str(empty)), rf"--vae {empty}: no config.json \(expected a diffusers"),
        (lambda: encoders.load_image_encoder(str(tmp_path / "nope")), rf"--vae {tmp_path / 'nope'}: no such folder"),
        (lambda: encoders.load_image_encoder(tiny["clip"]), r"config.json is a transformers 'clip_text_model'"),
        (lambda: encoders.load_image_encoder(str(bad_json)), rf"{bad_json}: config.json is not valid JSON"),
        (lambda: encoders.load_image_encoder(s3_prefix), rf"--vae {s3_prefix}: no objects under this S3 prefix"),
        (lambda: encoders.load_text_encoder(str(empty)), rf"--text-encoder {empty}: no config.json"),
        (
            lambda: encoders.load_text_encoder(tiny["vae"]),
            rf"--text-encoder {tiny['vae']}: config.json is a diffusers 'AutoencoderKL'; supported: clip_text_model",
        ),
        (
            lambda: encoders.load_text_encoder(str(bert)),
            rf"--text-encoder {bert}: config.json is a transformers 'bert' model; supported: .*t5.*open_clip",
        ),
        (lambda: encoders.load_text_encoder(str(tmp_path / "nope")), "no such folder"),
        (lambda: encoders.load_text_encoder("local-dir:" + tiny["clip"]), "no open_clip_config.json"),
        (lambda: encoders.load_text_encoder(str(no_weights)), rf"{no_weights}: no weights beside open_clip_config"),
        (lambda: encoders.load_text_encoder(tiny["clip"], max_length=100), "max_length 100 exceeds the model.s 77"),
    ]
    for load, message in cases:
        with pytest.raises(user_errors(), match=message):  # each one exits 2 on the CLI, with its message
            load()
    clip_no_tok = tmp_path / "clip-no-tokenizer"
    clip_no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny["clip"], f), clip_no_tok / f)
    with pytest.raises(ConfigError, match=rf"{clip_no_tok}: no tokenizer in"):
        encoders.load_text_encoder(str(clip_no_tok))


def test_fingerprint_follows_the_bytes_of_weights_and_config(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    ref = encoders.load_image_encoder(tiny["vae"]).fingerprint
    copy = tmp_path / "vae"
    shutil.copytree(tiny["vae"], copy)
    assert encoders.load_image_encoder(str(copy)).fingerprint == ref  # where the files are does not matter
    weights = copy / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3
    save_file(state, str(weights))
    changed = encoders.load_image_encoder(str(copy)).fingerprint
    assert changed != ref and len(changed) == 64
    cfg = json.loads((copy / "config.json").read_text())
    cfg["scaling_factor"] = 0.13025
    (copy / "config.json").write_text(json.dumps(cfg))
    assert encoders.load_image_encoder(str(copy)).fingerprint not in (ref, changed)
    clip = encoders.load_text_encoder(tiny["clip"]).fingerprint
    assert clip != encoders.load_text_encoder(tiny["t5"]).fingerprint
    assert clip != encoders.load_image_encoder(kind="pixels").fingerprint
