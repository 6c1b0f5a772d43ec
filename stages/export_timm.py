"""`beit export-timm CKPT OUT`: a pretrain or classifier checkpoint -> timm `beit_*` weights.

Writes OUT (safetensors) and OUT with suffix .json: {"model_name", "kwargs"} for
`timm.create_model(model_name, pretrained=False, **kwargs)`, whose
`load_state_dict(safetensors.torch.load_file(OUT), strict=True)` then succeeds.
"""
from __future__ import annotations

import click

from stages.errors import one_line_errors


@click.command()
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@one_line_errors
def cli(ckpt: str, out: str) -> None:
    """Export CKPT (e.g. models/finetune) to timm weights at OUT (e.g. exports/beit.safetensors)."""
    from model.interop import export_timm

    path, sidecar = export_timm(ckpt, out)
    click.echo(f"{path} (+ {path.with_suffix('.json').name}): timm.create_model({sidecar['model_name']!r}, "
               f"pretrained=False, **kwargs) with num_classes={sidecar['kwargs']['num_classes']}")
