"""Reward-model training (stage two of RLHF; InstructGPT, Ouyang et al. 2022, §3.5 and Eq. 1; Bradley & Terry 1952).

A scalar reward r(x, y) (:mod:`lit_rlhf.reward_models`: a decoder with a score head on the last token, or a BERT-style
encoder) is fitted to the data's record kind, each with its own pure loss (:mod:`lit_rlhf.losses.reward`):

- pairs (``PreferenceBatch``, or ranked lists of 2): Bradley–Terry -log sigmoid(r(x, y_w) - r(x, y_l) - m)
  (``margin`` m, Llama 2)
- ranked lists (``RankedBatch``): K-wise ranking loss over all C(K,2) ordered pairs, / C(K,2) (InstructGPT Eq. 1)
- scored records (``ScoredBatch``): pointwise regression (r(x, y) - s)^2 (e.g. ±1 outcome labels, Uesato et al. 2022)
- step-labelled solutions (``StepBatch``, ``--data.format=steps``): a process reward model, the head read at every
  step's last token, binary cross-entropy per step averaged over the batch's steps (:mod:`lit_rlhf.process_rewards`)

plus two optional regularisers: ``lm_coef`` x the NLL of the best response under the backbone's own LM head
(tied embeddings; keeps the features language-like, against over-fitting the pairwise task), and ``centering_coef``
x mean(r^2) (reward centering, Eisenstein et al. 2023). Every response row is one contiguous right-padded sequence,
scored exactly as the exported model scores it.

Metrics: ``{train,val}/loss``; ``rewards/accuracies`` (pairwise ranking accuracy over every ordered pair, torchmetrics
``BinaryAccuracy``; the usual held-out RM figure), ``rewards/{chosen,rejected}`` and their ``_std`` (chosen =
best response, rejected = the others), ``rewards/margins``, ``rewards/mean``; steps: ``step_accuracy`` (logit > 0
= correct) and ``first_error_accuracy`` (the first step predicted wrong is the first one labelled wrong, or none is
in both). Calibration check: after each validation a warning is issued when the held-out mean reward drifts further
than ``calibration_limit`` from 0.

    python -m lit_rlhf.experiments.rm                                    # SmolLM2-135M + LoRA, built-in pairs, CPU
    python -m lit_rlhf.experiments.rm --config experiments/rm/minilm.yaml   # BERT-style encoder (all-MiniLM-L6-v2)
    sbatch slurm/train.sbatch rm --config experiments/rm/qwen2.5-0.5b.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric
from torchmetrics.aggregation import CatMetric
from torchmetrics.classification import BinaryAccuracy

from lit_rlhf import models, process_rewards, reward_models
from lit_rlhf.data import render
from lit_rlhf.distributed import full_state_dict, fully_shard_lm, is_sharded
from lit_rlhf.losses import (
    bradley_terry_loss,
    pointwise_regression_loss,
    ranking_loss,
    reward_centering_penalty,
    step_bce_loss,
)
from lit_rlhf.metrics import Throughput, log_table, training_flops
from lit_rlhf.optim import OptimizerSettings, build_optimizer, trainable_state_dict
from lit_rlhf.types import PreferenceBatch, PromptResponseBatch, RankedBatch, ScoredBatch, StepBatch


def ranked_view(rewards: torch.Tensor, batch: PromptResponseBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, K] best first, mask [B, K]) of a pair or ranked batch (row k * B + b = rank k of prompt b)."""
    b = int(batch.prompt_ids.shape[0])
    ranked = rewards.view(-1, b).T
    mask = batch.rank_mask if isinstance(batch, RankedBatch) else torch.ones_like(ranked, dtype=torch.bool)
    return ranked, mask.bool()


def pair_differences(ranked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r_i - r_j for every valid ordered pair i < j (i ranked better): [number of pairs]."""
    k = ranked.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=ranked.device).triu(1)
    valid = upper & mask[:, :, None] & mask[:, None, :]
    return (ranked[:, :, None] - ranked[:, None, :])[valid]


def encode_pairs(
    tokenizer, prompts: list, responses: list, chat_template: bool = True, max_length: int = 512
) -> list[list[int]]:
    """Token ids of (prompt, response) pairs (strings or chat messages) rendered as in training: prompt + response,
    the prompt cut from the left to ``max_length // 2`` and then the response from the right when too long."""
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        prompt_text = render.render_prompt(tokenizer, prompt, chat_template)
        response_text = render.render_completion(tokenizer, prompt, prompt_text, response, chat_template)
        prompt_ids, response_ids = render.encode(tokenizer, prompt_text), render.encode(tokenizer, response_text)
        prompt_ids, response_ids, _ = render.truncate_pair(prompt_ids, response_ids, max_length, max_length // 2)
        rows.append(prompt_ids + response_ids)
    return rows


class RewardModule(L.LightningModule):
    """Reward model: Bradley-Terry, K-wise ranking or pointwise regression on a scalar head."""

    def __init__(
        self,
        backbone: models.ModelSpec = models.ModelSpec(lora=models.LoRASettings(target_modules=["all-linear"])),
        margin: float = 0.0,
        lm_coef: float = 0.0,
        centering_coef: float = 0.0,
        calibration_limit: float = 10.0,
        forward_mode: Literal["shared_prompt", "concatenated"] = "shared_prompt",
        optimizer: OptimizerSettings = OptimizerSettings(lr=1e-3, warmup_steps=10, schedule="cosine"),
        peak_flops: float = 200e9,
        table_rows: int = 8,
    ) -> None:
        """
        Args:
            backbone: the network (``tiny``, ``smollm2-135m``, ``minilm-l6``, an HF dir or hub id), dtype, LoRA.
            margin: Bradley–Terry margin m for pairs: the chosen reward must win by m.
            lm_coef: weight of the LM regulariser (NLL of the best response; decoders with tied embeddings), 0 = off.
            centering_coef: weight of the reward-centering penalty mean(r^2), 0 = off.
            calibration_limit: warn when the held-out mean reward is further than this from 0.
            forward_mode: ``shared_prompt`` runs each prompt once under all its responses (KV cache; decoders without
                gradient checkpointing or the LM regulariser, not under FSDP2, whose backward fails when the sharded
                body runs twice outside the root's forward); ``concatenated`` runs every full row (same rewards).
            optimizer: AdamW settings and learning-rate schedule.
            peak_flops: peak FLOP/s of one device, for MFU (CPU here: ~200e9 fp32; H100: ~989e12 bf16).
            table_rows: held-out records shown in the W&B sample table.
        """
        super().__init__()
        self.strict_loading = False  # checkpoints hold only trainable weights (set before FSDP2 loads)
        self.save_hyperparameters()
        self.spec = backbone
        self.optim_settings = optimizer
        self.model: torch.nn.Module | None = None
        self.tokenizer = models.load_tokenizer(backbone.name, backbone.revision, for_reward_model=True)
        self.val_loss, self.val_accuracy = MeanMetric(), BinaryAccuracy()
        self.val_step_accuracy, self.val_first_error = BinaryAccuracy(), MeanMetric()
        self.val_chosen, self.val_rejected = CatMetric(), CatMetric()
        self.throughput = Throughput(peak_flops)
        self._table_rows: list[list] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = reward_models.load_reward_model(self.spec, self.tokenizer.pad_token_id)
        base = self.model.get_base_model() if models.is_lora(self.model) else self.model
        body = sum(p.numel() for p in base.parameters()) - base.get_input_embeddings().weight.numel()
        self._flop_counts = (body, 0)  # (non-embedding parameters, output head): a scalar head costs ~nothing
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2; rewards() runs the body and the head directly
            direct = [getattr(base, base.base_model_prefix)] + [
                m for m in (getattr(base, "score", None),) if m is not None
            ]
            fully_shard_lm(self.model, self.device_mesh, called_directly=direct)

    def rewards(self, batch: PromptResponseBatch, with_lm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rewards [N] of every response row (steps: [N, K]), LM logps of the best responses' tokens or None)."""
        if isinstance(batch, StepBatch):
            return process_rewards.step_logits(self.model, batch, self.tokenizer.pad_token_id), None
        shared = self.hparams.forward_mode == "shared_prompt" and not with_lm and not self.spec.gradient_checkpointing
        shared = shared and self.device_mesh is None
        if shared and not models.is_encoder(self.model.config):
            args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, batch.prompt_index)
            return reward_models.shared_prompt_rewards(self.model, *args), None
        input_ids, attention_mask, loss_mask, _ = batch.as_sequences()
        input_ids, attention_mask, loss_mask = reward_models.contiguous_rows(
            input_ids, attention_mask, self.tokenizer.pad_token_id, loss_mask
        )
        lm_mask = None
        if with_lm:  # rows of the best responses: the first B (chosen, rank 0)
            lm_mask = torch.zeros_like(loss_mask)
            lm_mask[: batch.prompt_ids.shape[0]] = loss_mask[: batch.prompt_ids.shape[0]]
        return reward_models.sequence_rewards(self.model, input_ids, attention_mask, lm_mask)

    def score(self, prompts: list, responses: list) -> list[float]:
        """Rewards of (prompt, response) pairs (strings or chat messages), rendered as in training."""
        rows = encode_pairs(self.tokenizer, prompts, responses)
        return reward_models.RewardScorer(self.model, self.tokenizer).score_ids(rows).tolist()

    # -- loss -----------------------------------------------------------------------------------------------------
    def _loss(self, batch: PromptResponseBatch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, rewards [N] (steps: [N, K]), metrics) for any record kind."""
        lm = self.hparams.lm_coef > 0 and not isinstance(batch, (ScoredBatch, StepBatch))
        rewards, lm_logps = self.rewards(batch, with_lm=lm)
        scores = rewards[batch.step_mask] if isinstance(batch, StepBatch) else rewards
        metrics: dict[str, torch.Tensor] = {"rewards/mean": scores.detach().mean()}
        if isinstance(batch, StepBatch):  # process reward model (Lightman et al. 2023): is each step still correct?
            loss = step_bce_loss(rewards, batch.step_labels, batch.step_mask)
            correct = (scores.detach() > 0) == batch.step_labels[batch.step_mask].bool()
            metrics["step_accuracy"] = correct.float().mean()
        elif isinstance(batch, ScoredBatch):
            loss = pointwise_regression_loss(rewards, batch.scores.to(rewards)).mean()
        else:
            ranked, mask = ranked_view(rewards, batch)
            if isinstance(batch, PreferenceBatch) or (ranked.shape[1] == 2 and bool(mask.all())):  # pairs
                margin = torch.full_like(ranked[:, 0], self.hparams.margin) if self.hparams.margin else None
                loss = bradley_terry_loss(ranked[:, 0], ranked[:, 1], margin).mean()
            else:
                loss = ranking_loss(ranked, mask).mean()
            chosen, rejected = ranked[:, 0].detach(), ranked[:, 1:][mask[:, 1:]].detach()
            metrics.update(
                {
                    "rewards/chosen": chosen.mean(),
                    "rewards/rejected": rejected.mean(),
                    "rewards/margins": chosen.mean() - rejected.mean(),
                    "rewards/accuracies": (pair_differences(ranked.detach(), mask) > 0).float().mean(),
                }
            )
        if self.hparams.centering_coef > 0:
            loss = loss + reward_centering_penalty(scores, self.hparams.centering_coef)
        if lm:
            nll = -lm_logps.mean()
            loss = loss + self.hparams.lm_coef * nll
            metrics["lm_nll"] = nll.detach()
        return loss, rewards, metrics

    # -- training -------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.throughput.start()

    def training_step(self, batch: PromptResponseBatch, batch_idx: int) -> torch.Tensor:
        # 1. rewards of every response row + 2. the record kind's loss (+ regularisers)
        loss, _, metrics = self._loss(batch)
        # 3. log
        n = int(batch.prompt_ids.shape[0])
        sync = self.trainer.world_size > 1  # log the mean over ranks (the global batch's), not rank 0's
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=sync)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=n, sync_dist=sync)
        tokens = int(batch.prompt_mask[batch.prompt_index].sum() + batch.response_mask.sum())
        flops = training_flops(*self._flop_counts, tokens, 0, self.spec.lora is None, 0)
        self.log_dict(self.throughput.step(len(batch), tokens, flops), batch_size=n)
        return loss

    # -- validation -----------------------------------------------------------------------------------------------
    def validation_step(self, batch: PromptResponseBatch, batch_idx: int) -> None:
        loss, rewards, _ = self._loss(batch)
        n = int(batch.prompt_ids.shape[0])
        self.val_loss.update(loss.detach(), n)
        self.log("val/loss", self.val_loss, on_epoch=True, on_step=False, batch_size=n)
        if isinstance(batch, StepBatch):
            self._validate_steps(rewards.detach(), batch)
            return
        if isinstance(batch, ScoredBatch):
            self.val_chosen.update(rewards.detach())
            return
        ranked, mask = ranked_view(rewards.detach(), batch)
        diffs = pair_differences(ranked, mask)
        self.val_accuracy.update(torch.sigmoid(diffs), torch.ones_like(diffs, dtype=torch.long))
        self.log("val/rewards/accuracies", self.val_accuracy, on_epoch=True, on_step=False, batch_size=n)
        self.val_chosen.update(ranked[:, 0])
        self.val_rejected.update(ranked[:, 1:][mask[:, 1:]])
        self._collect_table_rows(batch, ranked)

    def _validate_steps(self, logits: torch.Tensor, batch: StepBatch) -> None:
        """Held-out step accuracy (threshold 0 on the logit) and first-error accuracy of a step batch."""
        mask, labels, n = batch.step_mask, batch.step_labels, int(batch.prompt_ids.shape[0])
        self.val_step_accuracy.update(torch.sigmoid(logits[mask]), labels[mask].long())
        first = process_rewards.first_error_index
        self.val_first_error.update((first(logits > 0, mask) == first(labels > 0.5, mask)).float())
        self.log("val/step_accuracy", self.val_step_accuracy, on_epoch=True, on_step=False, batch_size=n)
        self.log("val/first_error_accuracy", self.val_first_error, on_epoch=True, on_step=False, batch_size=n)
        self.val_chosen.update(logits[mask])

    def on_validation_epoch_end(self) -> None:
        chosen = self.val_chosen.compute() if self.val_chosen.update_count else torch.zeros(0)
        rejected = self.val_rejected.compute() if self.val_rejected.update_count else torch.zeros(0)
        self.val_chosen.reset()
        self.val_rejected.reset()
        everything = torch.cat([chosen.flatten(), rejected.flatten()]).float()
        if everything.numel() == 0:
            return
        stats = {"val/rewards/mean": everything.mean(), "val/rewards/std": everything.std(unbiased=False)}
        if rejected.numel():
            stats.update(
                {
                    "val/rewards/chosen": chosen.mean(),
                    "val/rewards/chosen_std": chosen.float().std(unbiased=False),
                    "val/rewards/rejected": rejected.mean(),
                    "val/rewards/rejected_std": rejected.float().std(unbiased=False),
                    "val/rewards/margins": chosen.mean() - rejected.mean(),
                }
            )
        self.log_dict(stats)
        mean = float(stats["val/rewards/mean"])
        if abs(mean) > self.hparams.calibration_limit and not self.trainer.sanity_checking:
            rank_zero_warn(
                f"reward model may be miscalibrated: held-out mean reward {mean:.2f} is further than "
                f"calibration_limit={self.hparams.calibration_limit} from 0; consider --model.centering_coef=0.01"
            )
        if self._table_rows and not self.trainer.sanity_checking:
            log_table(
                self.trainer,
                "val/samples",
                ["prompt", "best", "other", "best_reward", "other_reward"],
                self._table_rows,
                step=self.global_step,
            )
        self._table_rows = []

    def _collect_table_rows(self, batch: PromptResponseBatch, ranked: torch.Tensor) -> None:
        texts = (
            [[c, r] for c, r in zip(batch.chosen, batch.rejected)]
            if isinstance(batch, PreferenceBatch)
            else batch.responses
        )
        for i in range(min(self.hparams.table_rows - len(self._table_rows), len(texts))):
            self._table_rows.append(
                [batch.prompts[i], texts[i][0], texts[i][1], float(ranked[i, 0]), float(ranked[i, 1])]
            )

    # -- optimisation, checkpoints, export ------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return build_optimizer(params, self.optim_settings, self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])

    def export(self, out_dir: Path, dtype: str | None = None) -> dict[str, str]:
        model = self.model
        if is_sharded(model):  # FSDP2: gather the full weights (collective), rank 0 rebuilds the network and writes
            state = full_state_dict(model)
            if not self.trainer.is_global_zero:
                return {}
            model = reward_models.load_reward_model(self.spec, self.tokenizer.pad_token_id)
            model.load_state_dict(state)
        elif self._trainer is not None and not self.trainer.is_global_zero:
            return {}
        return reward_models.export_reward_model(model, self.tokenizer, out_dir, dtype)
