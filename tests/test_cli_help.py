"""A stage's ``--help``: its own options first and the Trainer's left out (``--help-all`` lists them after), the usage
line names the command as run, the entry module's examples keep their lines, and a bad key gives a short error."""

import re

import pytest

from lit_rlhf.experiments import dpo, main, sft

TRAINER_OPTION = re.compile(r"^\s+--trainer\.", re.MULTILINE)


def help_text(run, args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_help_shows_the_stage_options_and_examples_not_the_trainer_options(capsys):
    text = help_text(dpo.main, ["--help"], capsys)
    assert text.startswith("usage: python -m lit_rlhf.experiments.dpo ")
    examples = [line for line in dpo.__doc__.splitlines() if line.startswith("    python -m")]
    assert len(examples) >= 3 and all(line in text.splitlines() for line in examples), "examples reflowed"
    for option in ("--output_dir", "--ckpt_path", "--export", "--model.beta", "--data.path", "--wandb.mode"):
        assert re.search(rf"^\s+{re.escape(option)}\b", text, re.MULTILINE), option
    assert not TRAINER_OPTION.search(text) and "--help-all" in text
    assert len(text.splitlines()) < 300


@pytest.mark.parametrize("flag", ["--help-all", "--help_all"])
def test_help_all_lists_the_trainer_options_after_the_stage_options(flag, capsys):
    text = help_text(dpo.main, [flag], capsys)
    first_trainer = TRAINER_OPTION.search(text).start()
    for option in ("--output_dir", "--model.beta", "--data.batch_size", "--wandb.project"):
        assert text.index(option) < first_trainer, option
    for option in ("--trainer.logger", "--trainer.enable_checkpointing", "--trainer.max_steps"):
        assert option in text[first_trainer:], option


def test_usage_names_the_lit_rlhf_command(capsys):
    text = help_text(main.main, ["sft", "--help"], capsys)
    assert text.startswith("usage: lit-rlhf sft ")
    assert "--data.packing" in text or "--data.path" in text


def test_a_bad_key_gets_a_short_usage_and_the_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--model.bta=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--model.bta" in err and len(err.splitlines()) < 10, err
