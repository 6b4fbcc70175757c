"""Text rendering and tokenisation shared by every record kind.

- A prompt given as a message list is rendered with the tokenizer's chat template and the generation prompt; a
  plain-string prompt is wrapped as one user turn when ``chat_template`` is on and the tokenizer has a template,
  else used verbatim.
- A completion given as messages is the chat-template text of prompt + completion minus the prompt's text (so it
  carries the template's end-of-turn tokens); a plain-string completion gets the EOS token appended.
- Implicit prompts (hh-rlhf strings, ultrafeedback message lists) are split off as the longest shared prefix.

Truncation policy (``truncate_pair``): when prompt + response exceed ``max_length``, the prompt is cut from the
left (its most recent tokens are kept) down to ``max_prompt_length``; if still too long, the response is cut from
the right. ``max_prompt_length < max_length`` (checked), so a response keeps at least ``max_length -
max_prompt_length`` tokens. Every truncation is counted and reported by the DataModule.
"""

from __future__ import annotations

from typing import Any

Messages = list[dict[str, str]]
Text = str | Messages


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def is_blank(text: Text) -> bool:
    """A blank string, or a message list of blank contents (the empty list too)."""
    return not text.strip() if isinstance(text, str) else all(not m["content"].strip() for m in text)


def render_prompt(tokenizer, prompt: Text, chat_template: bool) -> str:
    if is_messages(prompt):
        if tokenizer.chat_template is None:
            raise ValueError("prompt is a message list but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if chat_template and tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt


def render_completion(tokenizer, prompt: Text, prompt_text: str, completion: Text, chat_template: bool) -> str:
    if is_messages(completion):
        messages = prompt if is_messages(prompt) else [{"role": "user", "content": prompt}]
        full = tokenizer.apply_chat_template(messages + completion, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template renders the prompt differently with and without the completion")
        return full[len(prompt_text) :]
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a string or a list of chat messages, got {type(completion).__name__}")
    if chat_template and tokenizer.chat_template is not None:
        return render_completion(tokenizer, prompt, prompt_text, [{"role": "assistant", "content": completion}], True)
    return completion + (tokenizer.eos_token or "")


def split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """(prompt, chosen, rejected) from two full conversations that share a prompt.

    Strings (hh-rlhf): the prompt ends at the last ``"Assistant:"`` of the shared prefix. Message lists
    (ultrafeedback): the prompt is the shared leading messages, up to the first differing assistant turn.
    """
    if is_messages(chosen) and is_messages(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] == "assistant":
            n -= 1
        if n == 0:
            raise ValueError("chosen and rejected share no prompt messages")
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        cut = chosen[:n].rfind("Assistant:")
        if cut < 0:
            raise ValueError("no shared prompt ending in 'Assistant:' between chosen and rejected")
        cut += len("Assistant:")
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise ValueError("chosen and rejected must both be strings or both be message lists")


def truncate_pair(
    prompt_ids: list[int], response_ids: list[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], bool]:
    """Apply the truncation policy (module doc); returns (prompt_ids, response_ids, truncated).

    ``0 < max_prompt_length < max_length``, so a non-empty response keeps at least
    ``max_length - max_prompt_length`` tokens (or all of them)."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids, False
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    return prompt_ids, response_ids[: max_length - len(prompt_ids)], True


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
