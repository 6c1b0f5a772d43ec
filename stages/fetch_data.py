"""`beit fetch-data`: make sure the bundled default dataset is on disk."""
from __future__ import annotations

import click

from pipeline.fetch import find_fashion_mnist
from stages.config import load_params
from stages.errors import one_line_errors


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@one_line_errors
def cli(params_path: str) -> None:
    """Locate or fetch Fashion-MNIST (when data.source is fashion-mnist)."""
    params = load_params(params_path)
    if params.data.source != "fashion-mnist":
        click.echo(f"data.source={params.data.source}: nothing to fetch")
        return
    folder = find_fashion_mnist(params.data.root)
    click.echo(f"Fashion-MNIST: {folder}")
