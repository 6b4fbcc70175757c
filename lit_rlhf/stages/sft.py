"""Supervised fine-tuning (stage one of RLHF, InstructGPT §3.5): masked next-token NLL on responses.

Loss: the mean over scored tokens of -log pi(y_t | x, y_<t), where only response tokens are scored (prompt tokens
and, in conversations, every non-assistant turn are masked out by ``loss_mask``; see :mod:`lit_rlhf.data.sft`).
Logits are projected only at the positions that predict a scored token. LoRA (peft) or a full fine-tune.

Metrics: ``{train,val}/loss`` (token-mean NLL), ``{train,val}/token_accuracy`` (argmax = target at scored tokens),
``{train,val}/perplexity`` (exp of the token-mean NLL; torchmetrics aggregates over the whole validation set), and,
when the validation data has answers (the built-in arithmetic task), ``val/accuracy``: greedy exact-match accuracy
(the answer verifier, :func:`lit_rlhf.rewards.is_correct`) on held-out prompts, with a W&B table of
completions ``val/samples``.

Packed rows (``--data.packing=true``) run with restarting ``position_ids`` and no 2D mask, so transformers builds a
block-diagonal causal mask; before the first packed batch the stage checks on the live model that a packed row
gives the same logps as its examples run one by one, and refuses packing (:class:`PackingError`) otherwise.

    python -m lit_rlhf.experiments.sft                                   # SmolLM2-135M + LoRA, built-in task, CPU
    python -m lit_rlhf.experiments.sft --config experiments/sft/tiny.yaml --output_dir runs/sft-tiny
    sbatch slurm/train.sbatch sft --config experiments/sft/qwen2.5-0.5b.yaml
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchmetrics import MeanMetric

from lit_rlhf import models
from lit_rlhf.distributed import fully_shard_lm, global_normalizer, is_sharded
from lit_rlhf.logprobs import predicting_positions, selective_log_softmax
from lit_rlhf.metrics import Throughput, log_table, model_flop_counts, training_flops
from lit_rlhf.optim import OptimizerSettings, build_optimizer, trainable_state_dict
from lit_rlhf.rewards import is_correct
from lit_rlhf.types import PromptBatch, SFTBatch


class PackingError(RuntimeError):
    """The model does not keep packed examples apart (its attention ignores restarting position ids)."""


class Perplexity(MeanMetric):
    """exp of the (token-weighted) mean NLL: update with per-token NLL values and their counts."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


def response_token_logps(
    lm: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    loss_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps [S], hits [S]) at the S scored tokens, row-major: log pi(token) and whether it is the argmax.

    Like :func:`lit_rlhf.logprobs.token_logps` (logits only where a scored token is predicted), plus the argmax
    comparison needed for token accuracy. ``attention_mask=None`` with restarting ``position_ids`` = packed rows.
    """
    keep = predicting_positions(loss_mask)
    extra = {"position_ids": position_ids} if position_ids is not None else {}
    logits = lm(
        input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False, **extra
    ).logits
    if logits.dim() == 3:  # a model without bool logits_to_keep support returned [B, T, V]
        logits = logits[keep]
    targets = input_ids[loss_mask.bool()]
    return selective_log_softmax(logits, targets), logits.detach().argmax(-1) == targets


@torch.no_grad()
def check_packing(lm: torch.nn.Module, vocab_size: int, atol: float = 1e-4) -> None:
    """Raise :class:`PackingError` unless a packed row of two random examples gives their unpacked logps."""
    g = torch.Generator().manual_seed(0)
    device = next(lm.parameters()).device
    a, b = (torch.randint(3, vocab_size, (1, n), generator=g).to(device) for n in (7, 5))
    was_training = lm.training
    lm.eval()
    try:
        separate = [response_token_logps(lm, x, torch.ones_like(x), _all_but_first(x))[0] for x in (a, b)]
        row = torch.cat([a, b], dim=1)
        positions = torch.cat([torch.arange(7), torch.arange(5)]).to(device)[None]
        mask = torch.cat([_all_but_first(a), _all_but_first(b)], dim=1)
        packed = response_token_logps(lm, row, None, mask, positions)[0]
    finally:
        lm.train(was_training)
    if not torch.allclose(packed, torch.cat(separate), atol=atol):
        name = type(lm.get_base_model() if hasattr(lm, "get_base_model") else lm).__name__
        raise PackingError(
            f"packing refused: {name} lets packed examples attend to each other (its attention does not honour "
            "restarting position_ids, e.g. absolute position embeddings or an attention implementation without "
            "packed-sequence support). Run with --data.packing=false."
        )


def _all_but_first(x: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(x)
    mask[:, 0] = 0
    return mask


class SFTModule(L.LightningModule):
    """Supervised fine-tuning: masked next-token NLL on the response tokens (LoRA or full)."""

    def __init__(
        self,
        policy: models.ModelSpec = models.ModelSpec(lora=models.LoRASettings(target_modules=["all-linear"])),
        optimizer: OptimizerSettings = OptimizerSettings(lr=1e-3, warmup_steps=10, schedule="cosine"),
        max_new_tokens: int = 48,
        peak_flops: float = 200e9,
        table_rows: int = 8,
    ) -> None:
        """
        Args:
            policy: the model to train (name, dtype, LoRA or full fine-tune).
            optimizer: AdamW settings and learning-rate schedule.
            max_new_tokens: token budget of the greedy held-out completions (``val/accuracy``).
            peak_flops: peak FLOP/s of one device, for MFU (CPU here: ~200e9 fp32; H100: ~989e12 bf16).
            table_rows: held-out completions shown in the W&B sample table.
        """
        super().__init__()
        self.strict_loading = False  # checkpoints hold only trainable weights (set before FSDP2 loads)
        self.save_hyperparameters()
        self.spec = policy
        self.optim_settings = optimizer
        self.policy: torch.nn.Module | None = None
        self.val_loss, self.val_token_accuracy, self.val_accuracy = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_perplexity = Perplexity()
        self.throughput = Throughput(peak_flops)
        self._packing_checked = False
        self.tokenizer = models.load_tokenizer(policy.name, policy.revision)
        self._table_rows: list[list] = []

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.policy = models.load_causal_lm(self.spec)
        self._flop_counts = model_flop_counts(self.policy)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2
            fully_shard_lm(self.policy, self.device_mesh)

    # -- training -------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.throughput.start()

    def token_stats(self, batch: SFTBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logps [S], hits [S]) of the scored tokens; packed rows go without a 2D mask (see module doc)."""
        if batch.position_ids is None:
            return response_token_logps(self.policy, batch.input_ids, batch.attention_mask, batch.loss_mask)
        if not self._packing_checked:
            check_packing(self.policy, len(self.tokenizer))
            self._packing_checked = True
        return response_token_logps(self.policy, batch.input_ids, None, batch.loss_mask, batch.position_ids)

    def training_step(self, batch: SFTBatch, batch_idx: int) -> torch.Tensor:
        # 1. logps of the response tokens (prompt tokens are masked out by loss_mask)
        logps, hits = self.token_stats(batch)
        # 2. masked NLL: mean over the scored tokens of all ranks (DDP/FSDP average the ranks' gradients)
        world, normalizer = (
            self.trainer.world_size,
            global_normalizer(torch.tensor(float(logps.numel()), device=logps.device)),
        )
        loss = -logps.sum() / normalizer
        # 3. log global per-token figures (the mean over ranks of the rank-scaled ones)
        n, accuracy, nll = len(batch), hits.float().sum() / normalizer, loss.detach()
        if world > 1:
            nll, accuracy = (self.trainer.strategy.reduce(x, reduce_op="mean") for x in (nll, accuracy))
        self.log("train/loss", nll, prog_bar=True, batch_size=n)
        self.log_dict({"train/token_accuracy": accuracy, "train/perplexity": nll.exp()}, batch_size=n)
        scored = int(batch.loss_mask.sum())
        flops = training_flops(*self._flop_counts, int(batch.attention_mask.sum()), scored, self.spec.lora is None, 0)
        self.log_dict(self.throughput.step(n, int(batch.attention_mask.sum()), flops), batch_size=n)
        return loss

    # -- validation -----------------------------------------------------------------------------------------------
    def validation_step(self, batch: SFTBatch | PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(batch, PromptBatch):
            self._greedy_accuracy(batch)
            return
        logps, hits = self.token_stats(batch)
        nll, count = -logps.mean(), logps.numel()
        self.val_loss.update(nll, count)
        self.val_token_accuracy.update(hits.float().mean(), count)
        self.val_perplexity.update(nll, count)
        metrics = {
            "val/loss": self.val_loss,
            "val/token_accuracy": self.val_token_accuracy,
            "val/perplexity": self.val_perplexity,
        }
        self.log_dict(metrics, on_epoch=True, on_step=False, batch_size=len(batch), add_dataloader_idx=False)

    @torch.no_grad()
    def _greedy_accuracy(self, batch: PromptBatch) -> None:
        completions = greedy_completions(
            self.policy, self.tokenizer, batch.input_ids, batch.attention_mask, self.hparams.max_new_tokens
        )
        correct = [float(bool(is_correct(c, a))) for c, a in zip(completions, batch.extras["answer"])]
        self.val_accuracy.update(torch.tensor(correct).mean(), len(correct))
        self.log(
            "val/accuracy",
            self.val_accuracy,
            on_epoch=True,
            on_step=False,
            batch_size=len(correct),
            add_dataloader_idx=False,
        )
        need = self.hparams.table_rows - len(self._table_rows)
        for p, c, a, ok in list(zip(batch.prompts, completions, batch.extras["answer"], correct))[: max(0, need)]:
            self._table_rows.append([p, c, str(a), ok])

    def on_validation_epoch_end(self) -> None:
        if self._table_rows and not self.trainer.sanity_checking:
            log_table(
                self.trainer,
                "val/samples",
                ["prompt", "completion", "answer", "correct"],
                self._table_rows,
                step=self.global_step,
            )
        self._table_rows = []

    # -- optimisation, checkpoints, export ------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return build_optimizer(params, self.optim_settings, self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])

    def export(self, out_dir: Path, dtype: str | None = None) -> dict[str, str]:
        rank_zero = self._trainer is None or self.trainer.is_global_zero
        return models.export_pretrained(self.policy, self.tokenizer, out_dir, self.spec, rank_zero, dtype)


def greedy_completions(
    lm: torch.nn.Module, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int
) -> list[str]:
    """Greedy completions (text, special tokens removed) of left-padded prompts, batched, with the KV cache."""
    out = lm.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        synced_gpus=is_sharded(lm),  # FSDP2: every forward is collective, so all ranks decode the same number of steps
    )
    return tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
