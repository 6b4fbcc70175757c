"""Reward-model stage: networks (last-token head, encoder), pairs/ranked/scored losses wired to the right pure
function, regularisers, CPU smoke run with calibration warning, export reload (scores equal under
AutoModelForSequenceClassification), ``--print_config`` round trip, every RM YAML parses."""

import json
from pathlib import Path

import pytest
import torch

from lit_rlhf import models, reward_models
from lit_rlhf.data.scored import RewardDataModule
from lit_rlhf.experiments import rm as rm_entry
from lit_rlhf.losses import bradley_terry_loss, ranking_loss
from lit_rlhf.reward_models import RewardScorer
from lit_rlhf.stages.reward_model import RewardModule, encode_pairs, pair_differences, ranked_view
from lit_rlhf.types import PreferenceBatch, RankedBatch, ScoredBatch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
TINY = str(ROOT / "experiments" / "rm" / "tiny.yaml")
PROMPTS = ["What is 1 + 2?", [{"role": "user", "content": "hi"}], "What is 5 - 4?"]
RESPONSES = ["The answer is 3.", [{"role": "assistant", "content": "hello there friend"}], "The answer is 1."]


def tiny_module(**kwargs) -> RewardModule:
    module = RewardModule(backbone=models.ModelSpec(name="tiny", lora=None), **kwargs)
    module.configure_model()
    return module


def score(model, tokenizer, prompts, responses, chat_template: bool = True) -> list[float]:
    """Rewards of (prompt, response) records rendered as in training, through the one scorer."""
    return RewardScorer(model, tokenizer).score_ids(encode_pairs(tokenizer, prompts, responses, chat_template)).tolist()


def test_contiguous_rows_moves_tokens_to_the_front():
    ids = torch.tensor([[9, 9, 5, 6, 7, 9], [1, 2, 3, 4, 9, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    loss = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]])
    out_ids, out_mask, out_loss = reward_models.contiguous_rows(ids, mask, 0, loss)
    assert out_ids.tolist() == [[5, 6, 7, 0, 0, 0], [1, 2, 3, 4, 0, 0]]
    assert out_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert out_loss.tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]]


def test_decoder_reward_reads_the_last_token_only():
    module = tiny_module()
    ids = torch.randint(3, 1000, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    changed = ids.clone()
    changed[0, 4:] = 7  # padding content is invisible
    with torch.no_grad():
        a, _ = reward_models.sequence_rewards(module.model, ids, mask)
        b, _ = reward_models.sequence_rewards(module.model, changed, mask)
        head = module.model.model(input_ids=ids[:1, :4]).last_hidden_state[0, -1]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0], module.model.score(head)[0])


def test_decoder_pad_token_differs_from_eos():
    tok = models.load_tokenizer("tiny", for_reward_model=True)
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token == "<|endoftext|>"
    policy_tok = models.load_tokenizer("tiny")  # a policy's tokenizer keeps EOS as its pad token
    assert policy_tok.pad_token_id == policy_tok.eos_token_id


def test_scores_at_reads_every_position_as_the_score_of_its_prefix():
    """The scorer's read-out at K positions per row (what a process reward needs) equals the outcome score of each
    prefix ending there, and padding after a row is invisible."""
    module = tiny_module()
    ids = torch.randint(3, 1000, (2, 7))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        got, _ = reward_models.scores_at(module.model, ids, mask, torch.tensor([[1, 4], [2, 6]]))
        for row, positions in enumerate(([1, 4], [2, 6])):
            for k, t in enumerate(positions):
                prefix = ids[row : row + 1, : t + 1]
                want, _ = reward_models.sequence_rewards(module.model, prefix, torch.ones_like(prefix))
                torch.testing.assert_close(got[row, k], want[0], atol=1e-5, rtol=1e-5)
    scorer = RewardScorer(module.model, module.tokenizer, batch_size=1)
    torch.testing.assert_close(
        scorer.score_ids([ids[0, :5].tolist(), ids[1].tolist()]), got[:, 1], atol=1e-5, rtol=1e-5
    )


def test_scorer_truncates_texts_from_the_chosen_side_and_checks_its_label():
    module = tiny_module()
    text = "one two three four five six seven eight nine ten"
    ids = module.tokenizer(text, add_special_tokens=False)["input_ids"]
    for side, kept in (("left", ids[-4:]), ("right", ids[:4])):
        scorer = RewardScorer(module.model, module.tokenizer, max_length=4, truncation_side=side)
        torch.testing.assert_close(scorer.score_texts([text]), scorer.score_ids([kept]))
    assert RewardScorer(module.model, module.tokenizer).score_texts([]).shape == (0,)
    with pytest.raises(ValueError, match="label_index=1"):
        RewardScorer(module.model, module.tokenizer, label_index=1)


def test_export_scores_equal_under_auto_sequence_classification(tmp_path):
    """Inputs that end with EOS (<|im_end|>, SmolLM2's own pad token) still score the same after export."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    module = RewardModule(backbone=models.ModelSpec(name="tiny", lora=models.LoRASettings(r=4, alpha=8)))
    module.configure_model()
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a non-trivial adapter, so merging matters
    ours = module.score(PROMPTS, RESPONSES)
    plain = score(module.model, module.tokenizer, PROMPTS, RESPONSES, chat_template=False)
    written = module.export(tmp_path)
    assert set(written) == {"adapter", "merged"}
    hf = AutoModelForSequenceClassification.from_pretrained(written["merged"])
    tok = AutoTokenizer.from_pretrained(written["merged"])
    assert hf.config.num_labels == 1 and tok.pad_token_id == hf.config.pad_token_id != tok.eos_token_id
    for chat, expected in ((True, ours), (False, plain)):
        texts = [tok.decode(r) for r in encode_pairs(tok, PROMPTS, RESPONSES, chat_template=chat)]
        if not chat:
            assert texts[0].endswith("<|im_end|>")
        enc = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(hf(**enc).logits[:, 0], torch.tensor(expected), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        torch.tensor(score(hf, tok, PROMPTS, RESPONSES)), torch.tensor(ours), atol=1e-4, rtol=1e-4
    )


def test_rl_reward_function_scores_the_export(tmp_path):
    """The RL stages' ``model_reward`` reads the export and gives the module's rewards for rendered text."""
    from lit_rlhf.rewards import model_reward

    module = tiny_module()
    written = module.export(tmp_path)
    rows = encode_pairs(module.tokenizer, PROMPTS[:1], RESPONSES[:1])
    text = module.tokenizer.decode(rows[0])
    cut = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    got = model_reward([text[:cut]], [text[cut:]], path=written["merged"], device="cpu")
    assert got[0] == pytest.approx(module.score(PROMPTS[:1], RESPONSES[:1])[0], abs=1e-4)


def batches(fmt: str, path: str | None = None):
    """(data module, its first training batch); a fixture file's records are collated by the test itself."""
    batch_size = 4 if path is None else 1  # a fixture holds 2 records: one for training
    dm = RewardDataModule(format=fmt, path=path, num_train=8, num_val=4, batch_size=batch_size, val_fraction=0.5)
    dm.connect(models.load_tokenizer("tiny", for_reward_model=True))
    dm.setup()
    return dm, (next(iter(dm.train_dataloader())) if path is None else None)


def test_pairs_use_bradley_terry_with_margin():
    module = tiny_module(margin=0.5)
    dm = RewardDataModule(task="arithmetic", num_train=8, num_val=4, batch_size=4)
    dm.connect(module.tokenizer)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))  # the DPO task, read by PreferenceDataModule
    assert isinstance(batch, PreferenceBatch)
    loss, rewards, metrics = module._loss(batch)
    ranked, _ = ranked_view(rewards, batch)
    expected = bradley_terry_loss(ranked[:, 0], ranked[:, 1], torch.full((4,), 0.5)).mean()
    torch.testing.assert_close(loss, expected)
    assert metrics["rewards/accuracies"] == (ranked[:, 0] > ranked[:, 1]).float().mean()


def test_ranked_lists_use_the_k_wise_loss_with_ragged_k():
    module = tiny_module()
    dm, _ = batches("ranked", str(FIXTURES / "rm_ranked.jsonl"))
    batch = dm.collate(dm.train_examples + dm.val_examples)
    assert isinstance(batch, RankedBatch) and batch.rank_mask.sum(1).tolist() in ([3, 2], [2, 3])
    loss, rewards, metrics = module._loss(batch)
    ranked, mask = ranked_view(rewards, batch)
    torch.testing.assert_close(loss, ranking_loss(ranked, mask).mean())
    assert pair_differences(ranked, mask).numel() == 3 + 1
    loss.backward()


def test_builtin_ranked_and_scored_records():
    module = tiny_module()
    _, ranked = batches("ranked")
    assert ranked.rank_mask.shape == (4, 4) and ranked.rank_mask.all()
    dm, scored = batches("scored")
    assert isinstance(scored, ScoredBatch) and set(scored.scores.tolist()) <= {1.0, -1.0}
    loss, rewards, _ = module._loss(scored)
    torch.testing.assert_close(loss, ((rewards - scored.scores) ** 2).mean())
    dm2 = RewardDataModule(format="scored", path=str(FIXTURES / "rm_scored.jsonl"), val_fraction=0.4, batch_size=2)
    dm2.connect(module.tokenizer)
    dm2.setup()
    assert sorted(e.score for e in dm2.train_examples + dm2.val_examples) == [-1.0, 1.0, 1.0]


def test_regularisers_add_to_the_loss():
    _, batch = batches("pairs")  # K = 2 ranked lists (built-in worked pairs)
    base = tiny_module()._loss(batch)[0]
    loss, rewards, metrics = tiny_module(lm_coef=0.1, centering_coef=0.01)._loss(batch)
    assert metrics["lm_nll"] > 0
    torch.testing.assert_close(loss, base + 0.1 * metrics["lm_nll"] + 0.01 * (rewards**2).mean())


def test_encoder_backbone_minilm(tmp_path):
    """all-MiniLM-L6-v2 from its PyPI package: plain text pair rendering, [CLS] head, export reloads with equal
    scores."""
    from transformers import AutoModelForSequenceClassification

    module = RewardModule(backbone=models.ModelSpec(name="minilm-l6", lora=None))
    module.configure_model()
    assert models.is_encoder(module.model)
    row = encode_pairs(module.tokenizer, ["What is 1 + 2?"], ["The answer is 3."])[0]
    assert module.tokenizer.decode(row) == "[CLS] what is 1 + 2? [SEP] the answer is 3. [SEP]"
    module.model.eval()
    ours = module.score(PROMPTS, RESPONSES)
    written = module.export(tmp_path)
    hf, tok = reward_models.load_exported(written["merged"])
    assert isinstance(hf, AutoModelForSequenceClassification._model_mapping[type(hf.config)])
    torch.testing.assert_close(
        torch.tensor(score(hf, tok, PROMPTS, RESPONSES)), torch.tensor(ours), atol=1e-4, rtol=1e-4
    )
    ids = torch.tensor([row])
    with pytest.raises(ValueError, match="needs a decoder"):
        reward_models.sequence_rewards(module.model, ids, torch.ones_like(ids), torch.ones_like(ids))


def run(tmp_path, *extra):
    args = ["--config", TINY, "--output_dir", str(tmp_path), "--trainer.enable_progress_bar=false", *extra]
    return rm_entry.main(args=args)


@pytest.mark.slow
def test_rm_smoke_calibration_warning_and_export(tmp_path):
    with pytest.warns(UserWarning, match="miscalibrated"):
        cli = run(tmp_path, "--trainer.max_steps=3", "--model.calibration_limit=0.0")
    summary = json.loads((tmp_path / "final_metrics.json").read_text())
    assert summary["global_step"] == 3
    for key in (
        "val/loss",
        "val/rewards/accuracies",
        "val/rewards/chosen_std",
        "val/rewards/margins",
        "val/rewards/mean",
    ):
        assert key in summary["end"]
    assert torch.isfinite(torch.tensor(summary["train_last"]["train/loss"]))
    initial = tiny_module().model.state_dict()
    trained = cli.model.model.state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    hf, tok = reward_models.load_exported(tmp_path / "export" / "merged")
    ours = cli.model.score(PROMPTS, RESPONSES)
    torch.testing.assert_close(
        torch.tensor(score(hf, tok, PROMPTS, RESPONSES)), torch.tensor(ours), atol=1e-4, rtol=1e-4
    )


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit):
        rm_entry.main(args=["--config", TINY, "--data.format=ranked", "--model.margin=0.25", "--print_config"])
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        rm_entry.main(args=["--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed
    assert "format: ranked" in printed and "margin: 0.25" in printed


@pytest.mark.parametrize("config", sorted((ROOT / "experiments" / "rm").glob("*.yaml")), ids=lambda p: p.name)
def test_every_rm_yaml_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rm_entry.main(args=["--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "backbone:" in capsys.readouterr().out


def test_shared_prompt_rewards_equal_full_rows():
    module = tiny_module()
    dm, _ = batches("ranked", str(FIXTURES / "rm_ranked.jsonl"))
    batch = dm.collate(dm.train_examples + dm.val_examples)
    shared, _ = module.rewards(batch)
    module.hparams.forward_mode = "concatenated"
    full, _ = module.rewards(batch)
    _, mask = ranked_view(full, batch)
    real = mask.T.reshape(-1)  # placeholder rows (missing ranks) may differ: their rewards are never used
    torch.testing.assert_close(shared[real], full[real], atol=1e-4, rtol=1e-4)
    shared.sum().backward()
    assert module.model.score.weight.grad is not None


def test_builtin_worked_pairs_are_bradley_terry_pairs():
    """The default task: the DPO task's questions and wrong results, as worked answers; K = 2 lists -> BT."""
    from lit_rlhf.data.tasks import arithmetic_preferences, worked_preferences
    from lit_rlhf.rewards import is_correct

    plain = arithmetic_preferences(50, 0)
    step, final = worked_preferences(50, 0, wrong="step"), worked_preferences(50, 0, wrong="final")
    for p, s, f in zip(plain, step, final):
        assert p["prompt"] == s["prompt"] == f["prompt"] and s["chosen"] == f["chosen"]
        assert is_correct(s["chosen"][0]["content"], p["answer"])
        for w in (s, f):
            assert w["rejected"][0]["content"].endswith(p["rejected"][0]["content"])  # same wrong result
        ok, bad = f["chosen"][0]["content"], f["rejected"][0]["content"]
        assert ok[: ok.rindex("The answer")] == bad[: bad.rindex("The answer")]  # correct steps, wrong last line
    module = tiny_module(margin=0.5)
    _, batch = batches("pairs")  # default task: arithmetic_worked
    assert isinstance(batch, RankedBatch) and batch.rank_mask.shape == (4, 2)
    loss, rewards, _ = module._loss(batch)
    ranked, _ = ranked_view(rewards, batch)
    torch.testing.assert_close(loss, bradley_terry_loss(ranked[:, 0], ranked[:, 1], torch.full((4,), 0.5)).mean())


def test_default_config_is_smollm2_yaml(capsys):
    """``python -m lit_rlhf.experiments.rm`` with no arguments runs exactly experiments/rm/smollm2.yaml (the
    benchmarked default: worked pairs, 50 steps), apart from the output directory."""
    import yaml

    printed = []
    for args in ([], ["--config", str(ROOT / "experiments" / "rm" / "smollm2.yaml")]):
        with pytest.raises(SystemExit):
            rm_entry.main(args=[*args, "--print_config"])
        config = yaml.safe_load(capsys.readouterr().out)
        config.pop("output_dir")
        printed.append(config)
    assert printed[0] == printed[1]
    assert printed[0]["trainer"]["max_steps"] == 50 and printed[0]["model"]["backbone"]["name"] == "smollm2-135m"
    assert printed[0]["data"]["format"] == "pairs" and printed[0]["data"]["num_val"] >= 64


def test_default_task_is_worked_final_and_held_out():
    """The default pairs are arithmetic_worked_final; validation questions never occur in training."""
    dm = RewardDataModule(num_train=300, num_val=64)
    assert dm.task == "arithmetic_worked_final"
    assert RewardDataModule(format="ranked").task == "arithmetic"
    dm.connect(models.load_tokenizer("tiny", for_reward_model=True))
    dm.setup()
    assert len(dm.train_examples) == 300 and len(dm.val_examples) == 64
    val_prompts = {e.prompt for e in dm.val_examples}
    assert not val_prompts & {e.prompt for e in dm.train_examples}
    chosen, rejected = dm.val_examples[0].responses
    assert chosen[: chosen.rindex("The answer")] == rejected[: rejected.rindex("The answer")] and chosen != rejected
