"""RFT: selection and deduplication of samples on hand examples, the SFT records made of them, and a tiny end-to-end
run (sampling -> samples.jsonl / train.jsonl / summary.json -> SFT stage) with its refusals."""

import json
from pathlib import Path

import pytest

from lit_rlhf.data.rft import normalise, select_samples, summarize, training_records
from lit_rlhf.experiments import rft as rft_entry
from lit_rlhf.rewards import is_correct

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "rft" / "tiny.yaml")


def sample(question, completion, correct=True, finished=True):
    prompt = [{"role": "user", "content": f"question {question}"}]
    return dict(
        question=question, prompt=prompt, answer=question, completion=completion, correct=correct, finished=finished
    )


SAMPLES = [
    sample(0, "Ones: 1 + 2 = 3.  The answer is 3."),  # kept
    sample(0, " Ones: 1 + 2 = 3. The answer is 3.\n"),  # the same up to whitespace: dropped
    sample(0, "The answer is 4.", correct=False),  # wrong: dropped
    sample(0, "Ones: 1 + 2 = 3. The answer", finished=False),  # truncated: dropped
    sample(1, "Ones: 1 + 2 = 3. The answer is 3."),  # the same text for another question: kept
    sample(1, "Ones: 1+2 = 3. The answer is 3."),  # differs in more than whitespace: kept
    sample(2, "The answer is 9.", correct=False),
]


def test_normalise_collapses_whitespace_only():
    assert normalise("  a \n\t b  c\n") == "a b c"
    assert normalise("a+b") != normalise("a + b")
    assert normalise("") == ""


def test_select_samples_keeps_the_first_correct_finished_of_each_text_per_question():
    kept = select_samples(SAMPLES)
    assert kept == [SAMPLES[0], SAMPLES[4], SAMPLES[5]]
    assert select_samples([]) == []
    assert select_samples([s for s in SAMPLES if not s["correct"]]) == []


def test_training_records_are_sft_records_with_references_unless_already_sampled():
    kept = select_samples(SAMPLES)
    records = training_records(kept)
    assert [r["source"] for r in records] == ["sample"] * 3
    assert records[0] == {
        "prompt": SAMPLES[0]["prompt"],
        "response": [{"role": "assistant", "content": SAMPLES[0]["completion"]}],
        "answer": 0,
        "source": "sample",
    }

    def ref(q, text):
        return {"prompt": sample(q, "")["prompt"], "response": [{"role": "assistant", "content": text}], "answer": q}

    references = {
        0: ref(0, "Ones: 1 + 2 = 3. The answer is 3."),
        1: ref(1, "Other work. The answer is 3."),
        2: ref(2, "The answer is 2."),
    }
    with_refs = training_records(kept, references)
    # question 0: its reference is the kept sample's text (whitespace aside): not added twice;
    # question 1: the reference first, then the two samples; question 2: nothing kept, the reference alone
    assert [(r["prompt"][0]["content"], r["source"]) for r in with_refs] == [
        ("question 0", "sample"),
        ("question 1", "reference"),
        ("question 1", "sample"),
        ("question 1", "sample"),
        ("question 2", "reference"),
    ]
    assert with_refs[1]["response"] == references[1]["response"] and with_refs[4]["answer"] == 2


def test_summarize_counts_a_hand_example():
    kept = select_samples(SAMPLES)
    records = training_records(
        kept, {2: {"prompt": [], "response": [{"role": "assistant", "content": "x"}], "answer": 2}}
    )
    assert summarize(SAMPLES, kept, records) == {
        "questions": 3,
        "samples": 7,
        "correct": 5,
        "correct_fraction": 5 / 7,
        "finished": 6,
        "kept": 3,
        "questions_with_kept": 2,
        "references": 1,
        "train_records": 4,
    }


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run(tmp_path, *extra):
    args = ["--config", TINY, "--output_dir", str(tmp_path), "--trainer.enable_progress_bar=false", *extra]
    return rft_entry.main(args=args)


@pytest.mark.slow
def test_rft_tiny_end_to_end_samples_selects_and_fine_tunes(tmp_path):
    """16 questions x 2 samples from the tiny random model; its samples are wrong, so what is trained on is the
    questions' references (rft.include_reference in tiny.yaml); the SFT stage then runs 4 steps on train.jsonl."""
    from lit_rlhf.data import prompts
    from lit_rlhf.data.sources import builtin_split

    run(tmp_path, "--trainer.enable_checkpointing=false")
    out = tmp_path / "rft"
    samples, train = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "train.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    questions, _ = builtin_split(prompts.TASKS, "arithmetic", 16, 8, 0)  # GRPO's training split for these settings
    assert len(samples) == summary["samples"] == 16 * 2 and summary["questions"] == 16
    assert [s["prompt"] for s in samples] == [q["prompt"] for q in questions for _ in range(2)]
    for s in samples:
        assert s["correct"] == is_correct(s["completion"], s["answer"]) and isinstance(s["finished"], bool)
    assert summary["correct"] == sum(s["correct"] for s in samples)
    assert summary["kept"] <= summary["correct"] <= summary["samples"]
    assert summary["train_records"] == len(train) == summary["kept"] + summary["references"]
    assert summary["references"] == sum(r["source"] == "reference" for r in train)
    assert len({r["prompt"][0]["content"] for r in train}) == 16  # with the references every question is trained on
    for row in train:  # every training record verifies as correct and is in the SFT data module's shape
        assert is_correct(row["response"][-1]["content"], row["answer"])
        assert row["prompt"][0]["role"] == "user" and row["response"][0]["role"] == "assistant"
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["stage"] == "rft" and final["global_step"] == 4
    assert "val/accuracy" in final["start"] and final["end"]["val/loss"] < final["start"]["val/loss"]
    assert (tmp_path / "export" / "merged" / "config.json").is_file()
    config = (tmp_path / "config.yaml").read_text()
    assert f"path: {out / 'train.jsonl'}" in config  # the run's config names the data it trained on


@pytest.mark.slow
def test_rft_refuses_to_fine_tune_on_nothing(tmp_path, capsys):
    """Without the references nothing the tiny random model samples is kept: an error saying so, the samples kept
    for inspection, no training."""
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--rft.include_reference=false")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nothing to fine-tune on" in err and "--rft.include_reference=true" in err
    assert len(read_jsonl(tmp_path / "rft" / "samples.jsonl")) == 32
    assert not (tmp_path / "rft" / "train.jsonl").exists() and not (tmp_path / "final_metrics.json").exists()


@pytest.mark.parametrize(
    "option, message",
    [
        ("--rft.num_samples=0", "--rft.num_samples=0"),
        ("--rft.batch_size=0", "--rft.batch_size=0"),
        ("--data.path=other.jsonl", "--data.path=other.jsonl: RFT trains on its own samples"),
        ("--rft.model=runs/none/export/merged", "runs/none/export/merged"),
    ],
)
def test_bad_rft_options_are_refused_naming_them(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, option)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "rft" / "samples.jsonl").exists()


def test_rft_is_a_pipeline_step_fed_the_sft_export(tmp_path):
    from lit_rlhf.experiments import pipeline as pl

    spec_path = tmp_path / "sft-rft.yaml"
    spec_path.write_text(
        "name: sft-rft\nsteps:\n"
        f"  - {{name: sft, stage: sft, config: {ROOT / 'experiments' / 'sft' / 'tiny.yaml'}}}\n"
        f"  - {{name: rft, stage: rft, config: {TINY}, inputs: {{model.policy.name: sft}}}}\n"
    )
    spec = pl.load_pipeline(spec_path)
    args = pl.step_args(spec, spec.steps[1], tmp_path / "run", "ci")
    assert args[:4] == ["--config", TINY, "--output_dir", str(tmp_path / "run" / "rft")]
    assert f"--model.policy.name={tmp_path / 'run' / 'sft' / 'export' / 'merged'}" in args
