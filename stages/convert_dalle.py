"""`beit convert-dalle`: turn OpenAI's pickled DALL-E weights into a safetensors tokenizer, once.

The project's only full unpickle, kept beside the one command that needs it (the
train-tokenizer stage adopts the converted directory, never a pickle).
`load_dalle_pickles` reads the pickles into model/dalle.py's modules, only with
trust_pickle=True and without the dall_e package (its classes resolve to a stub);
`convert_dalle` saves them through model/tokenizer.py; `cli` is the thin wrapper.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import click

from stages.errors import one_line_errors
import torch
import torch.nn as nn

from model.dalle import DalleConfig, DalleVAE, decoder_config_from_state, encoder_config_from_state
from model.tokenizer import save_tokenizer


class PickleRefused(RuntimeError):
    """Raised when converting a pickle without trust_pickle=True."""


class _StubModule(nn.Module):
    """Stand-in for dall_e's classes: enough for state_dict(), no dall_e import needed."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "dall_e" or module.startswith("dall_e."):
            return _StubModule
        return super().find_class(module, name)


class _PickleModule:
    """What torch.load's `pickle_module` needs; only find_class differs from pickle."""

    Unpickler = _Unpickler
    load = staticmethod(pickle.load)


def _read_pickled_state(path: Path) -> dict[str, torch.Tensor]:
    """torch.load a whole pickled module (or a state dict) on CPU -> float32 state dict."""
    with path.open("rb") as f:
        data = io.BytesIO(f.read())
    obj = torch.load(data, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a pickled DALL-E module or state dict, got {type(obj).__name__}")
    return {k: v.detach().float().contiguous() for k, v in obj.items()}


def load_dalle_pickles(
    encoder_pkl: str | Path, decoder_pkl: str | Path | None = None, *, trust_pickle: bool = False,
    image_size: int = 112,
) -> tuple[DalleVAE, DalleConfig]:
    """Unpickle OpenAI's encoder (and decoder) into our modules; strict key match."""
    paths = [Path(p) for p in (encoder_pkl, decoder_pkl) if p is not None]
    if not trust_pickle:
        raise PickleRefused(
            f"refusing to unpickle {paths[0]}: unpickling runs arbitrary code from the file; "
            "pass --trust-pickle only for files from a source you trust"
        )
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
    enc_sd = _read_pickled_state(paths[0])
    fields = encoder_config_from_state(enc_sd)
    dec_sd = None
    if decoder_pkl is not None:
        dec_sd = _read_pickled_state(paths[1])
        dec = decoder_config_from_state(dec_sd)
        clash = {k: (fields[k], dec[k]) for k in fields if k in dec and dec[k] != fields[k] and k != "n_hid"}
        if clash:
            raise ValueError(f"encoder and decoder disagree on {clash} (encoder, decoder)")
        fields["n_init"] = dec["n_init"]
        if dec["n_hid"] != fields["n_hid"]:
            raise ValueError(f"decoder n_hid={dec['n_hid']} but encoder n_hid={fields['n_hid']}; ours shares one")
    cfg = DalleConfig(image_size=image_size, has_decoder=dec_sd is not None, **fields)
    model = DalleVAE(cfg)
    model.encoder.load_state_dict(enc_sd, strict=True)
    if dec_sd is not None:
        model.decoder.load_state_dict(dec_sd, strict=True)
    return model.eval(), cfg


def convert_dalle(
    encoder_pkl: str | Path, decoder_pkl: str | Path | None, out_dir: str | Path, *,
    trust_pickle: bool = False, image_size: int = 112,
) -> Path:
    """Convert OpenAI's pickles once into a safetensors + JSON tokenizer directory."""
    model, cfg = load_dalle_pickles(encoder_pkl, decoder_pkl, trust_pickle=trust_pickle, image_size=image_size)
    return save_tokenizer(model, cfg, out_dir)


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="ENCODER.pkl [DECODER.pkl] OUT")
@click.option("--trust-pickle", is_flag=True,
              help="Allow unpickling the inputs. Unpickling runs arbitrary code: only for files you trust.")
@click.option("--image-size", default=112, show_default=True, help="Tokenizer input resolution (grid = size / 8).")
@one_line_errors
def cli(paths: tuple[str, ...], trust_pickle: bool, image_size: int) -> None:
    """Convert ENCODER.pkl (and optionally DECODER.pkl) into OUT/ (safetensors + JSON)."""
    if len(paths) not in (2, 3):
        raise click.UsageError("expected ENCODER.pkl [DECODER.pkl] OUT")
    encoder, decoder, out = paths[0], (paths[1] if len(paths) == 3 else None), paths[-1]
    path = convert_dalle(encoder, decoder, out, trust_pickle=trust_pickle, image_size=image_size)
    click.echo(f"DALL-E tokenizer written to {path}")
