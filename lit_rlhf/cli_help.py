"""The stage CLI's help: ``--help`` shows the stage's own options (``--config``, ``--output_dir``, ``--ckpt_path``,
``--model.*``, ``--data.*``, ``--wandb.*``, ...) and leaves out the ~50 Trainer options (~360 lines of help), which
``--help-all`` adds after them. The usage line names the command as it is run (``python -m
lit_rlhf.experiments.<stage>`` or ``lit-rlhf <stage>``) and the entry module's docstring keeps its line breaks, so its
example commands stay one per line.
"""

from __future__ import annotations

import argparse
import os
import sys

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser

TRAINER_KEY = "trainer"
USAGE = "%(prog)s [-h] [--help-all] [-c CONFIG.yaml] [--print_config] [--KEY=VALUE ...]"
TRAINER_NOTE = """
Trainer options (--trainer.*, Lightning's Trainer: max_steps, accelerator, devices, num_nodes, strategy, precision,
logger, enable_checkpointing, val_check_interval, gradient_clip_val, ...) are left out here: --help-all lists them.
"""


def stage_prog(stage: str) -> str:
    """The command as the user ran it: ``lit-rlhf <stage>`` under the console script, else ``python -m ...``."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    return argv0 if argv0.startswith("lit-rlhf") else f"python -m lit_rlhf.experiments.{stage}"


class RawDescriptionFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, with descriptions printed as written (as ``argparse.RawDescriptionHelpFormatter``)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class HelpAllAction(argparse._HelpAction):
    """``--help-all``: the help with the Trainer's options (after the stage's), then exit."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.full_help = True
        super().__call__(parser, namespace, values, option_string)


class StageArgumentParser(LightningArgumentParser):
    """Lightning's parser whose ``--help`` leaves out the Trainer's options and whose ``--help-all`` lists them last."""

    full_help = False

    def format_help(self, formatter=None) -> str:
        groups = self._action_groups
        trainer = [g for g in groups if any(is_trainer_option(a.dest) for a in g._group_actions)]
        others = [g for g in groups if g not in trainer]
        self._action_groups = others + (trainer if self.full_help else [])
        try:
            text = super().format_help() if formatter is None else super().format_help(formatter)
        finally:
            self._action_groups = groups
        return text + TRAINER_NOTE if trainer and not self.full_help else text


def is_trainer_option(dest: str) -> bool:
    return dest == TRAINER_KEY or dest.startswith(TRAINER_KEY + ".")
