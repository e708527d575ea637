"""Chat templates: the model's own Jinja template (from its tokenizer config) turns messages into a prompt.

A model folder carries its template as Hugging Face does: `chat_template` in
`tokenizer_config.json` (a string, or a list of named templates of which "default" is
used) or a `chat_template.jinja` file. Templates run in Jinja's immutable sandbox with
`raise_exception`, `bos_token` and `eos_token`, as `transformers` renders them.
"""

from __future__ import annotations

import json
import pathlib

TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja")  # copied next to tokenizer.json on export


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (no template, or the template refused them)."""


def load_chat_template(folder: str | pathlib.Path) -> str | None:
    """The chat template of the model in `folder`, or None if it has none."""
    folder = pathlib.Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatTemplate:
    """A compiled template; `render(messages)` gives the prompt text, ending where the assistant's turn starts."""

    def __init__(self, source: str, *, bos_token: str, eos_token: str):
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415 - only chat needs jinja2

        def raise_exception(message):
            raise ChatTemplateError(f"the model's chat template refused these messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever the template trips on is about these messages
            raise ChatTemplateError(f"the model's chat template refused these messages: {err}") from None
