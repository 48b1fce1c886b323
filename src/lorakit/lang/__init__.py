"""Extending a model to a language it barely knows.

- ``vocab``: vocabulary expansion (arXiv:2406.11477): choose target-language tokens, extend the
  tokenizer (real BPE merges, old ids unchanged), resize and initialise embeddings
  (random / mean / merge / aligned), train and save only the new rows (``lorakit.save`` stores
  them with the adapter, ``lorakit.load`` puts them back on the original base model).
- ``transtok``: trans-tokenization (arXiv:2408.04303): new rows from a token alignment of a
  parallel corpus.
- ``romanize``: transliteration to Latin script as a preprocessing mode.
- ``reduce``: MAFT vocabulary reduction (arXiv:2204.06487): keep only the tokens a corpus uses.
- ``evalsuite``: an IrokoBench-style (arXiv:2406.03368) multilingual evaluation runner:
  multiple choice / classification by log-likelihood and generation by exact match, per
  language, in-language and translate-test, on JSONL tasks or built-in offline ones.
"""

from lorakit.lang.reduce import reduce_vocabulary
from lorakit.lang.vocab import (
    INIT_METHODS,
    NewRows,
    NewToken,
    VocabExtension,
    expand_vocabulary,
    extend_tokenizer,
    load_new_rows,
    new_rows_state,
    resize_and_init,
    save_new_rows,
    train_new_tokens,
    trainable_new_rows,
    vocab_extension,
)

__all__ = [
    "INIT_METHODS",
    "NewRows",
    "NewToken",
    "VocabExtension",
    "expand_vocabulary",
    "extend_tokenizer",
    "load_new_rows",
    "new_rows_state",
    "reduce_vocabulary",
    "resize_and_init",
    "save_new_rows",
    "train_new_tokens",
    "trainable_new_rows",
    "vocab_extension",
]
