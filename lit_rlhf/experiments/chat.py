"""Chat entry point: ``python -m lit_rlhf.experiments.chat MODEL`` (``lit-rlhf chat``): talk to a model in the terminal.

Each turn renders the whole conversation (``--system`` first, then every user and assistant message) with the
model's chat template and the generation prompt (a model without one gets ``role: text`` lines), and samples the
reply with the stages' sampler (:func:`lit_rlhf.rollout.sample_completions`, KV cache, every EOS id). The oldest
turns are dropped when the conversation no longer fits the model's context. Commands: ``/reset`` clears the history,
``/exit`` (or end of input, Ctrl-D) quits. MODEL is anything ``lit-rlhf evaluate`` takes (a run directory, a
checkpoint, an HF directory, a hub id, a built-in name).

    lit-rlhf chat runs/sft                                  # the run's export
    lit-rlhf chat smollm2-135m --temperature 0.2 --max_new_tokens 128 --system "You answer in one sentence."
    printf 'What is 12 + 30?\\n/exit\\n' | lit-rlhf chat runs/grpo --temperature 0   # scripted, greedy
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

PROG = "python -m lit_rlhf.experiments.chat"
HELP = "/reset clears the history, /exit quits"


def parser() -> argparse.ArgumentParser:
    prog = sys.argv[0] if sys.argv[0].startswith("lit-rlhf") else PROG  # as invoked: lit-rlhf or python -m
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("model", help="run directory, checkpoint, HF directory, hub id, .gguf file or built-in name")
    a("--system", help="system message of the conversation (default: the chat template's own, if any)")
    a("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    a("--top_p", type=float, default=0.9, help="nucleus sampling (1.0: off)")
    a("--top_k", type=int, default=0, help="top-k sampling (0: off)")
    a("--max_new_tokens", type=int, default=256, help="reply budget in tokens")
    a("--seed", type=int, default=0, help="seed of the sampling noise")
    a("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    a("--dtype", choices=["float32", "bfloat16"], help="weight dtype (default: the run's, else float32)")
    return p


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """The conversation as the prompt of the next assistant turn."""
    if tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class Chat:
    """A conversation with ``model``: :meth:`reply` adds a user message and the sampled answer to ``history``."""

    def __init__(self, model, tokenizer, settings, system: str | None = None, seed: int = 0) -> None:
        import torch

        self.model, self.tokenizer, self.settings, self.system = model, tokenizer, settings, system
        self.history: list[dict[str, str]] = []
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed) if settings.temperature > 0 else None
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
        self.max_prompt_tokens = max(context - settings.max_new_tokens, 1)

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, text: str) -> tuple[str, bool]:
        """(the assistant's answer to ``text``, whether it was cut at ``max_new_tokens``)."""
        import torch

        from lit_rlhf.data.render import encode
        from lit_rlhf.rollout import sample_completions
        from lit_rlhf.types import PromptBatch

        self.history.append({"role": "user", "content": text})
        prompt = render(self.tokenizer, self.messages())
        ids = encode(self.tokenizer, prompt)
        while len(ids) > self.max_prompt_tokens and len(self.history) > 1:  # drop the oldest exchange
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]
            prompt = render(self.tokenizer, self.messages())
            ids = encode(self.tokenizer, prompt)
        ids = ids[-self.max_prompt_tokens :]
        tensor = torch.tensor([ids], device=self.device)
        batch = PromptBatch(tensor, torch.ones_like(tensor), [prompt], {})
        rollout = sample_completions(self.model, self.tokenizer, batch, 1, self.settings, self.generator)
        answer = rollout.completions[0].strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer, bool(rollout.truncated[0])


def run(chat: Chat, read: Callable[[str], str] = input, write: Callable[[str], None] = print) -> int:
    """The terminal loop: read a line, answer it, until ``/exit`` or end of input."""
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("")
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            chat.history = []
            write("(history cleared)")
            continue
        if line.startswith("/"):
            write(f"(unknown command {line.split()[0]}; {HELP})")
            continue
        answer, cut = chat.reply(line)
        write(f"assistant> {answer}" + (" [cut at --max_new_tokens]" if cut else ""))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from lit_rlhf.evaluation import load_model
    from lit_rlhf.rollout import SamplingSettings

    try:
        loaded = load_model(args.model, args.device, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if loaded.reward_model:
        print(f"error: {args.model} is a reward model (a sequence classifier); chat needs a causal LM", file=sys.stderr)
        return 2
    settings = SamplingSettings(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    chat = Chat(loaded.model, loaded.tokenizer, settings, args.system, args.seed)
    print(f"[lit_rlhf] chat with {loaded.source} ({HELP})")
    return run(chat)


if __name__ == "__main__":
    sys.exit(main())
