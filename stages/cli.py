"""`beit`: one click subcommand per DVC stage.

Stage modules are imported only when their command runs, so `beit --help`
stays fast and a stage's heavy imports (torch, dask) cost nothing elsewhere.
"""
from __future__ import annotations

import importlib
import os

import click

from stages.errors import DEBUG_ENV

# command name -> "module:attribute" of a click.Command
COMMANDS = {
    "fetch-data": "stages.fetch_data:cli",
    "shard": "stages.shard:cli",
    "convert-dalle": "stages.convert_dalle:cli",
    "train-tokenizer": "stages.train_tokenizer:cli",
    "tokenize": "stages.tokenize:cli",
    "pretrain": "stages.pretrain:cli",
    "finetune": "stages.finetune:finetune_cli",
    "scratch": "stages.finetune:scratch_cli",
    "linear-probe": "stages.probe:linear_probe_cli",
    "knn": "stages.probe:knn_cli",
    "export-timm": "stages.export_timm:cli",
    "report": "stages.report:cli",
    "visualize": "stages.visualize:cli",
    "shard-seg": "stages.shard_seg:cli",
    "segment": "stages.segment:cli",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help=f"Show the full traceback of a failure (same as {DEBUG_ENV}=1).")
def main(debug: bool) -> None:
    """BEiT pipeline: shard -> tokenize -> pretrain -> finetune.

    Each command reads params.yaml (override with --params) and does what
    its DVC stage does; options override single params. A failure is one
    line on stderr and exit status 1; --debug shows the traceback.
    """
    if debug:
        os.environ[DEBUG_ENV] = "1"


if __name__ == "__main__":  # torchrun --nproc_per_node N -m stages.cli <stage> ...
    main()
