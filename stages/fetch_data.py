"""`beit fetch-data`: make sure the bundled default dataset is on disk."""
from __future__ import annotations

import click

from pipeline.fetch import DatasetUnavailable, find_fashion_mnist
from stages.config import ConfigError, load_params


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
def cli(params_path: str) -> None:
    """Locate or fetch Fashion-MNIST (when data.source is fashion-mnist)."""
    try:
        params = load_params(params_path)
        if params.data.source != "fashion-mnist":
            click.echo(f"data.source={params.data.source}: nothing to fetch")
            return
        folder = find_fashion_mnist(params.data.root)
    except (ConfigError, DatasetUnavailable) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"Fashion-MNIST: {folder}")
