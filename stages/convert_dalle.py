"""`beit convert-dalle`: turn OpenAI's pickled DALL-E weights into a safetensors tokenizer, once."""
from __future__ import annotations

import click


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="ENCODER.pkl [DECODER.pkl] OUT")
@click.option("--trust-pickle", is_flag=True,
              help="Allow unpickling the inputs. Unpickling runs arbitrary code: only for files you trust.")
@click.option("--image-size", default=112, show_default=True, help="Tokenizer input resolution (grid = size / 8).")
def cli(paths: tuple[str, ...], trust_pickle: bool, image_size: int) -> None:
    """Convert ENCODER.pkl (and optionally DECODER.pkl) into OUT/ (safetensors + JSON)."""
    if len(paths) not in (2, 3):
        raise click.UsageError("expected ENCODER.pkl [DECODER.pkl] OUT")
    from model.dalle import PickleRefused, convert_dalle  # torch only when the command runs

    encoder, decoder, out = paths[0], (paths[1] if len(paths) == 3 else None), paths[-1]
    try:
        path = convert_dalle(encoder, decoder, out, trust_pickle=trust_pickle, image_size=image_size)
    except (PickleRefused, FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"DALL-E tokenizer written to {path}")
