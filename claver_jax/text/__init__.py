"""Text side: the CLIP tokenizer (`tokenizer`) and class texts (`prompts`).

    from claver_jax.text import load_tokenizer, prompt_tokens

`prompts` names are imported on first use, so `python -m claver_jax.text.prompts` does not
import its own module twice.
"""

from __future__ import annotations

import importlib

from claver_jax.text.tokenizer import Tokenizer, load_tokenizer

_PROMPTS_EXPORTS = ('ASPECTS', 'TEMPLATES', 'PromptTokens', 'MissingPromptsError',
                    'load_prompt_set', 'prompt_tokens')
__all__ = sorted(['Tokenizer', 'load_tokenizer', *_PROMPTS_EXPORTS])


def __getattr__(name: str):
  if name not in _PROMPTS_EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  return getattr(importlib.import_module(f'{__name__}.prompts'), name)
