"""stages/errors.py: what a failing command prints, and that BEIT_DEBUG brings the traceback back."""
import errno

import click
from click.testing import CliRunner

from pipeline.mim import StaleTokens
from stages.config import ConfigError
from stages.errors import DEBUG_ENV, one_line, one_line_errors


def test_disk_full_names_the_file_and_says_what_is_kept():
    line = one_line(OSError(errno.ENOSPC, "No space left on device", "data/shards/train/train-000003.tar"))
    assert line.startswith("disk full while writing data/shards/train/train-000003.tar: free space")
    assert "completed before the failure is kept" in line


def test_system_errors_name_the_file():
    assert one_line(PermissionError(errno.EACCES, "Permission denied", "models/pretrain")) == \
        "models/pretrain: Permission denied"
    assert one_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "x.tar")) == \
        "x.tar: No such file or directory"


def test_own_errors_keep_their_message_on_one_line():
    assert one_line(ConfigError("pretrain.loop.batch_size=10: must be\na multiple")) == \
        "pretrain.loop.batch_size=10: must be a multiple"
    assert one_line(FileNotFoundError("models/pretrain: no pretrained checkpoint; run `beit pretrain`")) == \
        "models/pretrain: no pretrained checkpoint; run `beit pretrain`"


def test_a_dataloader_worker_error_is_unwrapped_to_the_original_message():
    wrapped = ("Caught StaleTokens in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    raise StaleTokens(...)\n'
               "pipeline.mim.StaleTokens: train-000001.tar: token row 3 is 'a' but the tar has 'b'; rerun `beit tokenize`\n")
    assert one_line(StaleTokens(wrapped)) == \
        "train-000001.tar: token row 3 is 'a' but the tar has 'b'; rerun `beit tokenize`"


def test_unexpected_errors_say_how_to_get_the_traceback():
    line = one_line(KeyError("image"))
    assert line == f"KeyError: 'image' (rerun with {DEBUG_ENV}=1 for the traceback)"


@click.command()
@one_line_errors
def boom() -> None:
    raise ZeroDivisionError("division by zero")


def test_decorated_command_exits_1_with_one_line_and_debug_shows_the_traceback(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    result = CliRunner().invoke(boom, [])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.strip().count("\n") == 0 and "ZeroDivisionError: division by zero" in result.output
    monkeypatch.setenv(DEBUG_ENV, "1")
    result = CliRunner().invoke(boom, [])
    assert isinstance(result.exception, ZeroDivisionError)


def test_beit_debug_flag_sets_the_environment(monkeypatch):
    from stages.cli import main

    monkeypatch.setenv(DEBUG_ENV, "0")  # recorded, so the flag's "1" is undone after the test
    result = CliRunner().invoke(main, ["--debug", "report", "--params", "/nonexistent/params.yaml"])
    assert isinstance(result.exception, ConfigError)  # raised, not turned into one line
