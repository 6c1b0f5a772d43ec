"""One loading interface for both tokenizers (our dVAE, OpenAI's DALL-E).

A tokenizer directory holds exactly:
  encoder.safetensors   encoder weights (what tokens depend on)
  decoder.safetensors   decoder weights (optional; pictures only)
  tokenizer.json        {"format": 1, "kind": "dvae"|"dalle", "config": {...},
                         "fingerprint": "<sha256>"}
Never a pickle. `fingerprint` = sha256 over the encoder file's bytes and the
canonical JSON of kind+config: everything that decides the token ids, and
nothing else (adding a decoder does not invalidate stored tokens). It is
verified on load, which also catches a half-replaced directory or a damaged
encoder file; any damaged file is an UnreadableCheckpoint saying what rewrites it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save

from model.checkpoints import UnreadableCheckpoint, read_json, read_tensors
from model.dalle import DalleConfig, DalleVAE
from model.dvae import DVAE
from model.schema import DVAEConfig
from pipeline.atomic import atomic_write

FORMAT = 1
CONFIG_NAME = "tokenizer.json"
REWRITE = {"dvae": "rerun `beit train-tokenizer`",
           "dalle": "rerun `beit convert-dalle` into tokenizer.dalle_path, then `beit train-tokenizer`"}
REWRITE_ANY = "rerun `beit train-tokenizer` (after `beit convert-dalle` for a DALL-E one)"
_KINDS = {"dvae": (DVAEConfig, DVAE), "dalle": (DalleConfig, DalleVAE)}

TokenizerModel = Union[DVAE, DalleVAE]


def _kind_of(config) -> str:
    for kind, (cfg_cls, _) in _KINDS.items():
        if isinstance(config, cfg_cls):
            return kind
    raise TypeError(f"expected a DVAEConfig or DalleConfig, got {type(config).__name__}")


def _fingerprint(encoder_bytes: bytes, kind: str, config: dict) -> str:
    h = hashlib.sha256(encoder_bytes)
    h.update(json.dumps({"kind": kind, "config": config}, sort_keys=True).encode())
    return h.hexdigest()


def _tensors_bytes(module: torch.nn.Module) -> bytes:
    return save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})


def save_tokenizer(model: TokenizerModel, config: DVAEConfig | DalleConfig, out_dir: str | Path) -> Path:
    """Write weights then config, each atomically; the config (written last) marks the directory complete."""
    kind = _kind_of(config)
    cfg = dataclasses.asdict(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc = _tensors_bytes(model.encoder)
    atomic_write(out / "encoder.safetensors", enc)
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        atomic_write(out / "decoder.safetensors", _tensors_bytes(decoder))
    else:
        (out / "decoder.safetensors").unlink(missing_ok=True)
    meta = {"format": FORMAT, "kind": kind, "config": cfg, "fingerprint": _fingerprint(enc, kind, cfg)}
    atomic_write(out / CONFIG_NAME, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return out


class Tokenizer:
    """Images in [0,1] -> token ids; each kind applies its own pixel mapping."""

    def __init__(self, model: TokenizerModel, kind: str, fingerprint: str) -> None:
        self.model = model.eval()
        self.kind = kind
        self.fingerprint = fingerprint
        self.input_size: int = model.cfg.image_size
        self.grid: tuple[int, int] = tuple(model.cfg.grid)
        self.vocab_size: int = model.cfg.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Tokenizer:
        self.model.to(device)
        return self

    def _check(self, images: torch.Tensor) -> None:
        s = self.input_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s) or not images.is_floating_point():
            raise ValueError(f"{self.kind} tokenizer expects float [B,3,{s},{s}] in [0,1], got "
                             f"{images.dtype} {tuple(images.shape)}")

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float [B,3,S,S] in [0,1] -> long [B,h,w] on the tokenizer's device."""
        self._check(images)
        return self.model.encode(images.to(self.device, torch.float32))

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """long [B,h,w] -> float [B,3,S,S] in [0,1] (needs a decoder)."""
        return self.model.decode(ids.to(self.device))


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> Tokenizer:
    """Read a directory written by save_tokenizer; no pickle is ever loaded."""
    d = Path(path)
    meta_path = d / CONFIG_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{d}: no {CONFIG_NAME}; train a tokenizer or run `beit convert-dalle` first")
    meta = read_json(meta_path, REWRITE_ANY)
    if meta.get("format") != FORMAT or meta.get("kind") not in _KINDS:
        raise ValueError(f"{meta_path}: unsupported format {meta.get('format')!r} / kind {meta.get('kind')!r}")
    kind = meta["kind"]
    fix = REWRITE[kind]
    cfg_cls, model_cls = _KINDS[kind]
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    if set(meta["config"]) - known:
        raise ValueError(f"{meta_path}: unknown config keys {sorted(set(meta['config']) - known)} for kind {kind}")
    config = cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    enc_bytes = (d / "encoder.safetensors").read_bytes()
    fp = _fingerprint(enc_bytes, kind, dataclasses.asdict(config))
    if fp != meta.get("fingerprint"):  # a truncated or altered encoder file, or a half-replaced folder
        raise UnreadableCheckpoint.at(d / "encoder.safetensors",
                                      f"does not match {CONFIG_NAME}: fingerprint mismatch", fix)
    model = model_cls(config)
    model.encoder.load_state_dict(load_bytes(enc_bytes), strict=True)
    if getattr(model, "decoder", None) is not None:
        dec = d / "decoder.safetensors"
        if not dec.is_file():
            raise FileNotFoundError(f"{dec}: missing, but a {kind} tokenizer with this config has a decoder; {fix}")
        try:
            model.decoder.load_state_dict(read_tensors(dec, fix), strict=True)
        except RuntimeError as err:  # tensors of other shapes: not what save_tokenizer wrote
            raise UnreadableCheckpoint.at(dec, f"does not fit {CONFIG_NAME}: {' '.join(str(err).split())[:300]}",
                                          fix) from None
    return Tokenizer(model.to(device), kind, fp)


BF16_MIN_AGREEMENT = 0.995  # share of positions whose bf16 argmax id must equal the fp32 one


@torch.inference_mode()
def encode_bf16(tok: Tokenizer, images: torch.Tensor) -> torch.Tensor:
    """tok.encode under bf16 autocast (convolutions and matmuls in bf16): long [B, h, w]."""
    with torch.autocast(tok.device.type, dtype=torch.bfloat16):
        return tok.encode(images)


@torch.inference_mode()
def bf16_agreement(tok: Tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(bf16 ids [B, h, w], share of positions equal to the fp32 ids): the check that decides
    whether a tokenizer may run in bf16 (>= BF16_MIN_AGREEMENT)."""
    ids = encode_bf16(tok, images)  # [B, h, w]
    return ids, float((ids == tok.encode(images)).float().mean())
