"""Prompt rendering through the tokenizer's chat template.

The user message comes from the task's `PromptTemplate`; `render_chat` wraps it in the model's
chat template with the generation prompt. For Qwen3 the thinking block is switched off in
non-reasoning mode (`enable_thinking=False`), so the prompt already holds the empty think block
and the decision position is the first generated token.
"""

from __future__ import annotations

__all__ = ["render_chat", "decision_context"]


def render_chat(tokenizer, user_message: str, *, reasoning: bool) -> str:
    """The full prompt text a model sees, ending with the assistant generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_message}]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=reasoning
        )
    return user_message + "\n"


def decision_context(prompt: str, *, reasoning: bool, marker: str = "</think>") -> str:
    """The text that precedes the decision token, for `decision.option_token_ids`.

    Non-reasoning: the prompt itself. Reasoning: the prompt, a reasoning, the marker and the
    newline the paper's format puts before the label.
    """
    return prompt if not reasoning else f"{prompt}...\n{marker}\n"
