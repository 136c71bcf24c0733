"""Tiny random-initialised encoders of the real library classes, saved with ``save_pretrained`` (nothing is
downloaded): for the tests of the encoders and of the stages that use them (precompute, sampling in latents).

- :func:`make_tiny_vae`: a diffusers ``AutoencoderKL`` (factor 4 or 8).
- :func:`make_tiny_clip_text`: a transformers ``CLIPTextModel`` (hidden 32, 2 layers, 2 heads, 77 positions) and a
  ``CLIPTokenizer`` built from a vocab.json + merges.txt written here (byte-level BPE whose merges spell the
  captions' words; any other text still tokenizes, byte by byte).
- :func:`make_tiny_t5`: a transformers ``T5EncoderModel`` and a word-level fast tokenizer (T = 16).
- :func:`make_tiny_open_clip`: an open_clip ``CLIP`` in its ``local-dir:`` form (open_clip's bundled BPE tokenizer).
- :func:`upload_folder`: a local folder's files to a storage URI (an ``s3://`` prefix).
"""

from __future__ import annotations

import json
import os
import pathlib

import torch

from ambient_ray.io import storage

# the words of the captions the built-in data gets ("a handwritten digit seven", "a photo of a face")
CAPTION_WORDS = (
    "a photo of face handwritten digit zero one two three four five six seven eight nine "
    "an image picture black white grey colour color"
).split()
DIGITS = "zero one two three four five six seven eight nine".split()


def make_tiny_vae(folder, factor: int = 4, latent_channels: int = 4, in_channels: int = 3, seed: int = 0) -> str:
    """A random AutoencoderKL with 2**(levels-1) = ``factor`` (4 or 8), saved to ``folder`` (created)."""
    from diffusers import AutoencoderKL

    blocks = {4: (8, 16, 16), 8: (8, 16, 16, 16)}[factor]
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(str(folder))
    return str(folder)


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 byte values, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_clip_vocab(folder, words=CAPTION_WORDS) -> tuple[str, str]:
    """A byte-level BPE vocab.json + merges.txt in CLIP's format: every byte (alone and word-final), then one
    merge per prefix of each word, so that each of ``words`` is one token. Returns the two paths."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = _bytes_to_unicode()
    vocab = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    for w in words:
        parts = [*w[:-1], w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur += p
            if cur not in vocab:
                vocab.append(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return str(vocab_path), str(merges_path)


def make_tiny_clip_text(folder, seed: int = 0, words=CAPTION_WORDS, max_length: int = 77) -> str:
    """A random CLIPTextModel (hidden 32, 2 layers, 2 heads, ``max_length`` positions: CLIP's 77 by default) and its
    CLIPTokenizer, in ``folder``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_clip_vocab(folder, words)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(folder), local_files_only=True, model_max_length=max_length, pad_token="<|endoftext|>"
    )
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    CLIPTextModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def make_tiny_t5(folder, seed: int = 0, max_length: int = 16, words=CAPTION_WORDS) -> str:
    """A random T5EncoderModel (d_model 32, 2 layers, dropout 0.1, which eval mode must turn off) and a word-level
    fast tokenizer (``</s>`` appended, ``<pad>`` = 0, model_max_length ``max_length``), in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        dropout_rate=0.1,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5EncoderModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def make_tiny_open_clip(folder, seed: int = 0) -> str:
    """A random open_clip CLIP (text width 32, 2 layers, 2 heads, context 77; a one-layer 16x16 vision tower) in
    open_clip's local-dir: form: ``open_clip_config.json`` (with ``model_cfg``) and ``open_clip_model.safetensors``.
    Its tokenizer is open_clip's bundled BPE (no files needed)."""
    import open_clip
    from safetensors.torch import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        },
        "preprocess_cfg": {},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    torch.manual_seed(seed)
    model = open_clip.create_model("local-dir:" + str(folder))  # no weights yet: initialised at random
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return str(folder)


def upload_folder(folder, uri: str) -> str:
    """Every file under local ``folder`` to ``uri``/<the same relative name>; returns ``uri``."""
    folder = str(folder)
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(uri, os.path.relpath(path, folder)), f.read())
    return uri
