"""PPO: critic networks (value alignment, shared-base adapter isolation, reward-model init), the entropy bonus path,
completions without a reward, settings refused up front, and end-to-end runs on the tiny model (learning signal,
checkpointed KL controller, resume, export, early stop, the shared metric schema)."""

import json
from pathlib import Path

import pytest
import torch

from lit_rlhf import models, reward_models
from lit_rlhf.critics import CriticSettings, SharedBaseValueHead, actor_parameters, build_critic, response_values
from lit_rlhf.experience import LogitsRecorder
from lit_rlhf.logprobs import response_logps
from lit_rlhf.reward_models import RewardModelSettings
from lit_rlhf.rewards import RewardSpec, scoring_texts
from lit_rlhf.stages.ppo import PPOModule
from lit_rlhf.types import Rollout
from tests.test_report import undocumented

TINY = "experiments/ppo/tiny.yaml"
LORA = models.LoRASettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def rows(seed: int = 0):
    """2 left-padded prompts, 3 right-padded responses (row 2 answers prompt 0 too)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(100, 1000, (2, 5), generator=g)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    response_ids = torch.randint(100, 1000, (3, 4), generator=g)
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    return prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor([0, 1, 0])


def full_row_values(decoder, head, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index):
    """Reference: each row as one concatenated sequence; V before response token t = head(hidden at P + t - 1)."""
    out = torch.zeros(response_ids.shape)
    for n in range(len(prompt_index)):
        p = prompt_ids[prompt_index[n]][prompt_mask[prompt_index[n]].bool()]
        r = response_ids[n][response_mask[n].bool()]
        hidden = decoder(input_ids=torch.cat([p, r])[None]).last_hidden_state[0]
        out[n, : len(r)] = head(hidden[len(p) - 1 : len(p) + len(r) - 1]).squeeze(-1)
    return out


@pytest.fixture(scope="module")
def tiny_lm():
    return models.load_causal_lm(models.ModelSpec(name="tiny", lora=None)).eval()


def test_response_values_align_with_logps_positions(tiny_lm):
    """values[n, t] reads the hidden state that predicts response token t, as logps do (prompt once + KV cache)."""
    decoder = models.decoder_of(tiny_lm)
    head = torch.nn.Linear(256, 1)
    with torch.no_grad():
        got = response_values(decoder, head, *rows())
        want = full_row_values(decoder, head, *rows())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got[1, 2:] == 0).all() and (got[2, 1:] == 0).all(), "0 outside the mask"


def test_critic_from_reward_model_predicts_the_score_of_the_prefix(tmp_path):
    """DeepSpeed-Chat init: transformer + score head of the RM, so V(state after k tokens) = RM(prompt + k tokens)."""
    tok = models.load_tokenizer("tiny", for_reward_model=True)
    rm = reward_models.load_reward_model(models.ModelSpec(name="tiny", lora=None, seed=3), tok.pad_token_id).eval()
    reward_models.export_reward_model(rm, tok, tmp_path / "rm")
    critic = build_critic(
        CriticSettings(init="reward_model", lora=LORA),
        models.load_causal_lm(models.ModelSpec(name="tiny", lora=None)),
        models.ModelSpec(name="tiny", lora=None),
        str(tmp_path / "rm" / "merged"),
    ).eval()
    prompt = torch.tensor([[11, 12, 13]])
    response = torch.tensor([[21, 22, 23, 24]])
    with torch.no_grad():
        values = critic(prompt, torch.ones_like(prompt), response, torch.ones_like(response), torch.tensor([0]))
        score = rm(input_ids=torch.cat([prompt, response[:, :2]], 1)).logits[0, 0]  # prompt + 2 response tokens
    assert values[0, 2] == pytest.approx(float(score), abs=1e-4), "V before token 2 = RM score of the prefix"
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(n.startswith("head") for n in trainable)
    assert not any("lora_" not in n and not n.startswith("head") for n in trainable), "base frozen with LoRA"


def test_shared_base_value_head_isolates_adapters():
    """Policy loss grads reach only the policy adapter; value loss grads only the value adapter + head; the base is
    frozen; the reference (adapters disabled) is the untouched base; export merges the policy adapter only."""
    policy = models.load_causal_lm(models.ModelSpec(name="tiny", lora=LORA))
    base_state = {k: v.clone() for k, v in policy.get_base_model().state_dict().items() if "lora_" not in k}
    critic = SharedBaseValueHead(policy, LORA)
    assert policy.active_adapter == "default"
    args = rows()
    logps = response_logps(policy, *args).logps
    values = critic(*args)
    assert values.shape == args[2].shape and policy.active_adapter == "default"
    grads = lambda: {n for n, p in policy.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}  # noqa: E731
    (-logps.sum()).backward()
    assert grads() and all(".default." in n for n in grads())
    policy.zero_grad(set_to_none=True)
    torch.nn.init.normal_(critic.head.weight)  # zero head: no gradient would reach the adapter
    (critic(*args) ** 2).sum().backward()
    assert grads() and all(".value." in n for n in grads())
    assert critic.head.weight.grad is not None
    actor_ids = {id(p) for p in actor_parameters(policy)}
    critic_ids = {id(p) for p in critic.trainable_parameters()}
    assert actor_ids and critic_ids and not actor_ids & critic_ids
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n), "both adapters stay trainable"
    assert not any(p.requires_grad for n, p in policy.named_parameters() if "lora_" not in n)
    # perturb both adapters: the reference ignores them; export merges only the policy's
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    plain = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None)).eval()
    ids = torch.tensor([[1, 5, 9, 20]])
    policy.eval()
    with models.reference_policy(policy, None) as ref, torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        models.export_pretrained(policy, models.load_tokenizer("tiny"), tmp)
        merged = AutoModelForCausalLM.from_pretrained(Path(tmp) / "merged").eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert all(
        torch.equal(v, policy.get_base_model().state_dict()[k]) for k, v in base_state.items() if "lora_" not in k
    )


def test_shared_base_needs_lora_on_the_policy(tiny_lm):
    with pytest.raises(ValueError, match="LoRA on the policy"):
        build_critic(
            CriticSettings(init="shared_base", lora=LORA), tiny_lm, models.ModelSpec(name="tiny", lora=None), None
        )


def test_entropy_recorder_equals_logprobs_entropy_and_has_grad():
    """The entropy bonus comes from the logps forward itself; it equals response_logps' (no-grad) entropy."""
    lm = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None))
    p_ids, p_mask, r_ids, r_mask, index = rows(1)
    r = Rollout(p_ids, p_mask, r_ids, r_mask, index, torch.zeros(3, dtype=torch.bool))
    recorder = LogitsRecorder(lm)
    logps = response_logps(recorder, p_ids, p_mask, r_ids, r_mask, index, temperature=0.7).logps
    entropy = recorder.entropy(r, 0.7)
    want = response_logps(lm, p_ids, p_mask, r_ids, r_mask, index, temperature=0.7, with_entropy=True)
    torch.testing.assert_close(logps, want.logps)
    torch.testing.assert_close(entropy, want.entropy, atol=1e-4, rtol=1e-4)
    assert entropy.requires_grad
    entropy.sum().backward()
    assert lm.model.embed_tokens.weight.grad is not None


def test_scoring_texts_render_an_assistant_turn():
    tok = models.load_tokenizer("tiny")
    suffix = models.turn_suffix(tok)
    assert suffix == "<|im_end|>\n"
    texts = scoring_texts(["P1 ", "P2 "], ["a", "b"], [True, False], suffix)
    assert texts == ["P1 a<|im_end|>\n", "P2 b"], "no end-of-turn for a truncated completion"


def test_a_reward_is_required_and_missing_reward_model_is_explained(tmp_path):
    with pytest.raises(ValueError, match="needs a reward"):
        PPOModule(reward_model=None, rewards=[])
    missing = RewardModelSettings(path=str(tmp_path / "nope" / "export" / "merged"))
    module = PPOModule(
        policy=models.ModelSpec(name="tiny", lora=None),
        critic=CriticSettings(init="policy", lora=None),
        reward_model=missing,
    )
    with pytest.raises(FileNotFoundError, match=r"not found.*python -m lit_rlhf.experiments.rm.*pipeline"):
        module.configure_model()  # the stage trains nothing: a pipeline trains the reward model first
    assert not (tmp_path / "nope").exists()


# ------------------------------------------------------------------------------------------------- end to end
def run(tmp_path: Path, *extra: str, name: str = "run"):
    from lit_rlhf.experiments import ppo as entry

    out = tmp_path / name
    cli = entry.main(args=["--config", TINY, "--output_dir", str(out), *extra])
    return cli, out


def csv_rows(out: Path) -> list[dict]:
    import csv

    (path,) = out.glob("csv/*/metrics.csv")
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(path.open())]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo")
    initial = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None)).state_dict()
    cli, out = run(tmp)
    return cli, out, initial, tmp


@pytest.mark.slow
def test_smoke_finite_and_actor_and_critic_change(tiny_run):
    cli, out, initial, _ = tiny_run
    summary = json.loads((out / "final_metrics.json").read_text())
    assert summary["global_step"] == 2, "one global step per PPO iteration"
    (actor, critic), schedulers = cli.model.optimizers(), cli.model.lr_schedulers()
    assert {int(s["step"]) for s in actor.optimizer.state.values()} == {8}, "2 iterations x 4 minibatch steps"
    assert {int(s["step"]) for s in critic.optimizer.state.values()} == {8}
    assert [s.last_epoch for s in schedulers] == [2, 2], "the schedules step once per iteration"
    assert summary["start"]["val/kl_sequence"] == pytest.approx(0.0, abs=1e-4), "policy == reference at step 0"
    assert abs(summary["end"]["val/kl_sequence"]) > 1e-3, "the policy moved from the reference (k1 sums: noisy sign)"
    assert summary["start"]["val/kl"] == pytest.approx(0.0, abs=1e-4) and summary["end"]["val/kl"] != 0.0
    assert "val/accuracy" in summary["end"], "arithmetic prompts carry answers: correctness is reported"
    shared = {"val/rewards/mean", "val/completions/mean_length", "val/completions/truncated_rate"}  # GRPO's names
    assert shared <= set(summary["end"])
    assert not any(k.startswith(("val/score", "val/objective", "val/response")) for k in summary["end"])
    train = [r for r in csv_rows(out) if "train/loss" in r]
    assert len(train) == 2
    for r in train:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in r.items() if k != "train/explained_variance")
        assert r["train/ppo/updates"] == 4 and r["train/completions/mean_length"] > 0
        for key in (
            "train/rewards/mean",
            "train/rewards/std",
            "train/rewards/missing_frac",
            "train/kl",
            "train/kl_sequence",
            "train/kl_coef",
            "train/value_loss",
            "train/clip_ratio/region",
            "train/completions/truncated_rate",
            "perf/generation_s",
            "perf/scoring_s",
            "perf/samples_per_s",
        ):
            assert key in r, key
        assert not any(k.startswith(("train/score/", "train/objective/", "train/policy/", "train/loss/")) for k in r)
    logged = {k for r in csv_rows(out) for k in r} | set(summary["start"]) | set(summary["end"])
    assert undocumented(logged) == [], "every metric PPO logs is in the README's metric schema"
    module = cli.model
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, initial[k])]
    assert len(changed) >= len(initial) // 2, "the actor's weights moved"
    critic = module.critic.decoder.state_dict()
    critic_changed = [k for k, v in critic.items() if not torch.equal(v, initial["model." + k])]
    assert len(critic_changed) >= len(critic) // 2, "the critic's weights moved"
    assert module.kl_ctl.value != 0.05, "adaptive KL coefficient updated"


class ScriptedAnswers(PPOModule):
    """Samples with the policy, then replaces the texts: the right answer ("The answer is 85.") except at rows 0, 4,
    8, ... of a batch (answer + 1)."""

    def generate(self, batch, generator):
        rollout = super().generate(batch, generator)
        answers = [batch.extras["answer"][i] for i in rollout.prompt_index.tolist()]
        rollout.completions = [f"The answer is {a + (n % 4 == 0)}." for n, a in enumerate(answers)]
        return rollout


@pytest.mark.slow
def test_validation_accuracy_is_the_verifiers_fraction_of_right_answers():
    """8 held-out prompts in 2 batches, 6 answered right: val/accuracy = 6/8 exactly, and the default reward (no reward
    model, no rewards: correctness + 0.5 x closeness) scores those rows 1.5 and 0.5 exp(-1/10)."""
    import math

    import lightning as L

    from lit_rlhf.data.prompts import PromptDataModule

    spec = models.ModelSpec(name="tiny", lora=None)
    module = ScriptedAnswers(policy=spec, critic=CriticSettings(init="policy", lora=None))
    dm = PromptDataModule(num_train=8, num_val=8, val_batch_size=4)
    dm.connect(module.tokenizer)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert metrics["val/accuracy"] == 0.75
    assert metrics["val/rewards/mean"] == pytest.approx((6 * 1.5 + 2 * 0.5 * math.exp(-0.1)) / 8)


@pytest.mark.slow
def test_checkpoint_holds_kl_controller_and_resume_restores_it(tiny_run):
    cli, out, _, tmp = tiny_run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["kl_controller"]["value"] == pytest.approx(cli.model.kl_ctl.value)
    assert ckpt["global_step"] == 2
    assert all(".frozen_reference." not in k for k in ckpt["state_dict"]), "frozen weights are not checkpointed"
    resumed, resumed_out = run(
        tmp, "--ckpt_path", str(out / "checkpoints" / "last.ckpt"), "--trainer.max_steps=3", name="resumed"
    )
    assert resumed.trainer.global_step == 3
    # the controller started from the checkpointed value: one more update of it
    from lit_rlhf.kl_control import adaptive_kl_coef

    kl = [r["train/kl_sequence"] for r in csv_rows(resumed_out) if "train/kl_sequence" in r][-1]
    assert resumed.model.kl_ctl.value == pytest.approx(
        adaptive_kl_coef(ckpt["kl_controller"]["value"], kl, 4, 6.0, 1000), rel=1e-5
    )


@pytest.mark.slow
def test_export_reloads(tiny_run):
    from transformers import AutoModelForCausalLM

    cli, out, _, _ = tiny_run
    model = AutoModelForCausalLM.from_pretrained(out / "export" / "merged")
    trained = cli.model.policy.state_dict()
    torch.testing.assert_close(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"]
    )


@pytest.mark.slow
def test_lora_shared_base_reward_model_entropy_and_early_stop(tmp_path):
    """LoRA policy + shared-base value head + a reward model + entropy bonus; target_kl stops the epoch loop."""
    tok = models.load_tokenizer("tiny", for_reward_model=True)
    rm = reward_models.load_reward_model(models.ModelSpec(name="tiny", lora=None, seed=5), tok.pad_token_id)
    reward_models.export_reward_model(rm, tok, tmp_path / "rm")
    lora = '{"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}'
    cli, out = run(
        tmp_path,
        f"--model.policy.lora={lora}",
        "--model.critic.init=shared_base",
        f"--model.critic.lora={lora}",
        f"--model.reward_model.path={tmp_path / 'rm' / 'merged'}",
        "--model.rewards=null",
        "--model.entropy_coef=0.01",
        "--model.target_kl=1e-7",
        "--trainer.max_steps=1",
        "--validate_before_fit=false",
        "--model.optimizer.lr=1e-2",
    )
    (train,) = [r for r in csv_rows(out) if "train/loss" in r]
    assert train["train/ppo/early_stopped"] == 1.0 and 1 <= train["train/ppo/updates"] < 4
    assert "train/rewards/reward_model/mean" in train
    policy = cli.model.policy
    assert any(".value." in k for k, _ in policy.named_parameters()) and cli.model.critic.head.weight.abs().sum() > 0
    assert (out / "export" / "merged" / "config.json").exists() and (out / "export" / "adapter").exists()


# ------------------------------------------------------------------------------- completions without a reward
def _no_reward_for_even_rows(prompts, completions):
    """No reward (None) for rows 0, 2, 4, ...; 1 or 0 by the parity of the completion's length otherwise."""
    return [None if i % 2 == 0 else float(len(c) % 2) for i, c in enumerate(completions)]


def test_a_completion_without_a_reward_gets_advantage_zero_and_no_critic_signal():
    """Rows without a reward have score NaN: advantage 0 and returns = their own values (nothing moves actor or critic
    for them); the scored rows' advantages are whitened over the scored tokens only (mean 0); no NaN anywhere."""
    from lit_rlhf.data.prompts import PromptDataModule

    spec = models.ModelSpec(name="tiny", lora=None)
    rewards = [RewardSpec(f"{__name__}:_no_reward_for_even_rows")]
    critic = CriticSettings(init="policy", lora=None)
    module = PPOModule(policy=spec, critic=critic, rewards=rewards, samples_per_prompt=2)
    module.configure_model()
    dm = PromptDataModule(num_train=8, num_val=2, batch_size=3, shuffle=False)
    dm.connect(module.tokenizer)
    dm.setup()
    rollout = module.generate(dm.collate(dm.train_examples[:3]), torch.Generator().manual_seed(0))
    scores, _ = module.score(rollout, dm.collate(dm.train_examples[:3]))
    missing = torch.isnan(scores)
    assert missing.tolist() == [True, False] * 3
    exp = module.make_experience(rollout, scores)
    mask = rollout.response_mask.float()
    assert (exp.advantages[missing] == 0).all()
    assert torch.equal(exp.returns[missing], exp.values[missing] * mask[missing])
    scored_adv, scored_mask = exp.advantages[~missing], mask[~missing]
    assert float((scored_adv * scored_mask).sum() / scored_mask.sum()) == pytest.approx(0.0, abs=1e-5)
    assert all(torch.isfinite(t).all() for t in (exp.advantages, exp.returns, exp.rewards))


# ------------------------------------------------------------------------------- settings refused up front
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.ppo_epochs=0"], r"model\.ppo_epochs=0 cannot learn: it is the number of update passes"),
        (["--model.samples_per_prompt=0"], r"model\.samples_per_prompt=0 cannot learn: no completion is sampled"),
        (["--model.score_clip=0"], r"model\.score_clip=0(\.0)? cannot learn: .*every completion gets the same score"),
        (['--model.rewards=[{"name": "answer_in_text", "weight": 0}]'],
         r"model\.reward_model\.weight, model\.online_rm\.weight and model\.rewards cannot learn: every reward weight "
         r"is 0"),
    ],
)  # fmt: skip
def test_the_entry_point_refuses_settings_that_cannot_learn(tmp_path, args, message):
    """Through ``python -m lit_rlhf.experiments.ppo --config experiments/ppo/tiny.yaml ...``: the error names the
    option and its value, and the output directory is left as it was."""
    from lit_rlhf.experiments import ppo as entry

    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("an earlier run's file\n")
    with pytest.raises(ValueError, match=message):
        entry.main(args=["--config", TINY, "--output_dir", str(tmp_path), *args])
    assert sentinel.read_text() == "an earlier run's file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sentinel.txt"]
