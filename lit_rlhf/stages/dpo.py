"""Direct Preference Optimization (Rafailov et al. 2023) and its variants (IPO, hinge, robust DPO).

Loss (DPO Eq. 7): -log sigmoid(beta [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])
on summed response-token logps; the variant is chosen by name (``loss``), see :mod:`lit_rlhf.losses.preference`.
Implicit rewards ``beta (log pi - log ref)`` give the logged ``rewards/{chosen,rejected,margins,accuracies}``.

Chosen and rejected share their prompt: by default (``forward_mode=shared_prompt``) the prompt runs once and both
responses run together on its KV cache (~1.7x fewer tokens than two full rows); ``concatenated`` runs the 2B full
rows in one forward instead (needed with gradient checkpointing). Logits are projected only at response positions.
The reference is the policy with its LoRA adapter disabled (no second copy) or a frozen copy for a full
fine-tune, evaluated on the fly, or precomputed once and cached on disk (``reference=cached``).

    python -m lit_rlhf.experiments.dpo                                   # SmolLM2-135M + LoRA, built-in task, CPU
    python -m lit_rlhf.experiments.dpo --config experiments/dpo/tiny.yaml --output_dir runs/dpo-tiny
    sbatch slurm/train.sbatch dpo --config experiments/dpo/qwen2.5-0.5b-ultrafeedback.yaml
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from lit_rlhf import models, ref_cache
from lit_rlhf.checkpointing import capture_rng, restore_rng
from lit_rlhf.distributed import fully_shard_lm
from lit_rlhf.logprobs import response_logps, sequence_logps, token_logps
from lit_rlhf.losses import PREFERENCE_LOSSES
from lit_rlhf.metrics import PhaseMeans, Throughput, log_table, model_flop_counts, training_flops
from lit_rlhf.optim import OptimizerSettings, build_optimizer, trainable_state_dict
from lit_rlhf.types import PreferenceBatch


def check_settings(loss: str, beta: float, label_smoothing: float) -> None:
    """Refuse, before anything is loaded, settings under which the preference loss cannot learn: ``beta <= 0`` (0:
    every DPO-family loss is flat in the policy, IPO divides by it; < 0: the rejected response is preferred) and
    label smoothing outside [0, 0.5) or on a loss without it."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(
            f"model.beta must be a positive number, got {beta}: the {loss} loss scales the log-ratio margin by beta "
            "(0 trains nothing and IPO divides by it; a negative beta prefers the rejected response)"
        )
    if label_smoothing and loss not in ("dpo", "robust_dpo"):
        raise ValueError(f"model.label_smoothing applies to 'dpo' and 'robust_dpo', not {loss!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"model.label_smoothing must be in [0, 0.5), got {label_smoothing}")


class DPOModule(L.LightningModule):
    """Direct preference optimisation and its variants (IPO, hinge, robust DPO, cDPO) on preference pairs."""

    def __init__(
        self,
        policy: models.ModelSpec = models.ModelSpec(),
        loss: Literal["dpo", "ipo", "hinge", "robust_dpo"] = "dpo",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        nll_coef: float = 0.0,
        reference: Literal["online", "cached"] = "online",
        forward_mode: Literal["shared_prompt", "concatenated"] = "shared_prompt",
        ref_cache_dir: str | None = None,
        optimizer: OptimizerSettings = OptimizerSettings(),
        peak_flops: float = 200e9,
        table_rows: int = 8,
    ) -> None:
        """
        Args:
            policy: the model to train (name, dtype, LoRA); the reference is derived from it.
            loss: preference loss by name: ``dpo`` (with ``label_smoothing``: cDPO), ``ipo``, ``hinge``,
                ``robust_dpo``.
            beta: inverse temperature of the implicit reward (KL strength); must be > 0.
            label_smoothing: assumed label-noise rate for ``dpo`` (cDPO) and ``robust_dpo``; must be 0 for the others.
            nll_coef: weight of an NLL term on the chosen response (per-token mean), 0 disables it.
            reference: ``online`` computes reference logps every step; ``cached`` precomputes them once per
                data set + reference model and stores them under ``ref_cache_dir``.
            forward_mode: ``shared_prompt`` runs each prompt once under both responses (KV cache); ``concatenated``
                runs 2B full rows (use it with gradient checkpointing, or for models without a KV cache).
            ref_cache_dir: where cached reference logps live (default ``$LIT_RLHF_CACHE/ref_logps``).
            optimizer: AdamW settings and learning-rate schedule.
            peak_flops: peak FLOP/s of one device, for MFU (CPU here: ~200e9 fp32; H100: ~989e12 bf16).
            table_rows: validation pairs shown in the W&B sample table.
        """
        super().__init__()
        self.strict_loading = False  # checkpoints hold only trainable weights (set before FSDP2 loads)
        check_settings(loss, beta, label_smoothing)
        self.save_hyperparameters()
        self.spec = policy
        self.tokenizer = models.load_tokenizer(policy.name, policy.revision)
        self.optim_settings = optimizer
        extra = {"label_smoothing": label_smoothing} if loss in ("dpo", "robust_dpo") else {}
        self.loss_fn = functools.partial(PREFERENCE_LOSSES[loss], beta=beta, **extra)
        self.policy: torch.nn.Module | None = None
        self.frozen_reference: torch.nn.Module | None = None
        self.ref_table: dict[str, tuple[float, float]] | None = None
        self.val_means = PhaseMeans()
        self.throughput = Throughput(peak_flops)
        self._table_rows: list[list] = []

    # -- networks -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.policy = models.load_causal_lm(self.spec)
        self._flop_counts = model_flop_counts(self.policy)
        if self.spec.lora is None and self.hparams.reference == "online":
            self.frozen_reference = models.frozen_copy(self.policy)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2
            for net in filter(None, (self.policy, self.frozen_reference)):
                fully_shard_lm(net, self.device_mesh)

    def pair_logps(self, lm: torch.nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence logps [2B] chosen-then-rejected, token logps [2B, R]) of the responses."""
        if self.hparams.forward_mode == "shared_prompt" and not self.spec.gradient_checkpointing:
            logps = response_logps(
                lm, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, batch.prompt_index
            ).logps
        else:
            input_ids, attention_mask, loss_mask, position_ids = batch.as_sequences()
            logps = token_logps(lm, input_ids, attention_mask, loss_mask, position_ids).logps[
                :, batch.prompt_ids.shape[1] :
            ]
        return sequence_logps(logps, batch.response_mask), logps

    @torch.no_grad()
    def reference_logps(self, batch: PreferenceBatch) -> torch.Tensor:
        """Reference sequence logps [2B], from the cache table when precomputed, else one no-grad forward."""
        if self.ref_table is not None:
            chosen = [self.ref_table[k][0] for k in batch.keys]
            rejected = [self.ref_table[k][1] for k in batch.keys]
            return torch.tensor(chosen + rejected, device=self.device)
        with models.reference_policy(self.policy, self.frozen_reference) as ref:
            return self.pair_logps(ref, batch)[0]

    # -- training -------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.hparams.reference == "cached" and self.ref_table is None:
            self.ref_table = self._build_ref_cache()
        self.throughput.start()

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        # 1. policy logps of chosen and rejected in one forward
        policy_logps, token_lp = self.pair_logps(self.policy, batch)
        # 2. reference logps (cached table or adapter-disabled / frozen forward)
        ref_logps = self.reference_logps(batch)
        # 3. preference loss (+ optional NLL on chosen)
        loss, metrics = self._loss(policy_logps, ref_logps, token_lp, batch)
        # 4. log
        sync = self.trainer.world_size > 1  # log the global mean, not rank 0's
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=batch.num_pairs, sync_dist=sync)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.num_pairs, sync_dist=sync)
        self._log_throughput(batch)
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        policy_logps, token_lp = self.pair_logps(self.policy, batch)
        ref_logps = self.reference_logps(batch)
        loss, metrics = self._loss(policy_logps, ref_logps, token_lp, batch)
        means = self.val_means.update(
            {"val/loss": loss, **{f"val/{k}": v for k, v in metrics.items()}}, weight=batch.num_pairs
        )
        self.log_dict(means, on_epoch=True, on_step=False, prog_bar=False, batch_size=batch.num_pairs)
        self._collect_table_rows(batch, policy_logps, ref_logps)

    def _loss(self, policy_logps, ref_logps, token_lp, batch: PreferenceBatch) -> tuple[torch.Tensor, dict]:
        n = batch.num_pairs
        losses, chosen_rewards, rejected_rewards = self.loss_fn(
            policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:]
        )
        loss = losses.mean()
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy_logps[:n].detach().mean(),
            "logps/rejected": policy_logps[n:].detach().mean(),
        }
        if self.hparams.nll_coef > 0:
            mask = batch.response_mask[:n]
            nll = -(token_lp[:n] * mask).sum() / mask.sum()
            loss = loss + self.hparams.nll_coef * nll
            metrics["nll"] = nll.detach()
        return loss, metrics

    def _log_throughput(self, batch: PreferenceBatch) -> None:
        scored = int(batch.response_mask.sum())
        tokens = scored + int(batch.prompt_mask.sum()) * (1 if self.hparams.forward_mode == "shared_prompt" else 2)
        ref_forwards = 0 if self.ref_table is not None else 1
        flops = training_flops(*self._flop_counts, tokens, scored, self.spec.lora is None, ref_forwards)
        self.log_dict(self.throughput.step(batch.num_pairs, tokens, flops), batch_size=batch.num_pairs)

    # -- reference cache ------------------------------------------------------------------------------------------
    def _build_ref_cache(self) -> dict[str, tuple[float, float]]:
        dm = self.trainer.datamodule
        loaders = [dm.train_dataloader(), dm.val_dataloader()]
        keys = [e.key for e in dm.train_examples + dm.val_examples]
        identity = ref_cache.model_identity(self.spec.name, self.spec.dtype, self.spec.seed, self.spec.revision)
        root = self.hparams.ref_cache_dir or models.cache_dir() / "ref_logps"
        path = ref_cache.cache_path(root, identity, keys)
        table = ref_cache.load(path)
        if table is not None and all(k in table for k in keys):
            print(f"[lit_rlhf] reference logps: reusing {path}")
            return table
        table, was_training = {}, self.policy.training
        self.policy.eval()
        frozen = models.frozen_copy(self.policy) if self.spec.lora is None else None
        with torch.no_grad(), models.reference_policy(self.policy, frozen) as ref:
            for loader in loaders:
                for batch in loader:
                    batch = batch.to(self.device)
                    seq = self.pair_logps(ref, batch)[0].tolist()
                    n = batch.num_pairs
                    table.update({k: (seq[i], seq[n + i]) for i, k in enumerate(batch.keys)})
        self.policy.train(was_training)
        if self.trainer.is_global_zero:
            ref_cache.save(path, table)
            print(f"[lit_rlhf] reference logps: computed {len(table)} pairs, cached at {path}")
        return table

    # -- tables, checkpoints, export ------------------------------------------------------------------------------
    def _collect_table_rows(self, batch: PreferenceBatch, policy_logps, ref_logps) -> None:
        need = self.hparams.table_rows - len(self._table_rows)
        if need <= 0:
            return
        n, beta = batch.num_pairs, self.hparams.beta
        rewards = (beta * (policy_logps - ref_logps)).tolist()
        for i in range(min(need, n)):
            self._table_rows.append(
                [
                    batch.prompts[i],
                    batch.chosen[i],
                    batch.rejected[i],
                    rewards[i],
                    rewards[n + i],
                    rewards[i] - rewards[n + i],
                ]
            )

    def on_validation_epoch_end(self) -> None:
        if self._table_rows and not self.trainer.sanity_checking:
            columns = ["prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin"]
            log_table(self.trainer, "val/samples", columns, self._table_rows, step=self.global_step)
        self._table_rows = []

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return build_optimizer(params, self.optim_settings, self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])
        checkpoint["rng"] = capture_rng()
        if self.ref_table is not None:
            checkpoint["ref_table"] = self.ref_table

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.ref_table = checkpoint.get("ref_table")
        restore_rng(checkpoint.get("rng"))

    def export(self, out_dir: Path, dtype: str | None = None) -> dict[str, str]:
        rank_zero = self.trainer.is_global_zero
        return models.export_pretrained(self.policy, self.tokenizer, out_dir, self.spec, rank_zero, dtype)
