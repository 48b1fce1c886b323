"""Extending a model to a language it barely knows.

- ``vocab``: vocabulary expansion (arXiv:2406.11477): choose target-language tokens, extend the
  tokenizer (real BPE merges, old ids unchanged), resize and initialise embeddings
  (random / mean / merge / aligned), train and save only the new rows.
- ``reduce``: MAFT vocabulary reduction (arXiv:2204.06487): keep only the tokens a corpus uses.
"""

from lorakit.lang.reduce import reduce_vocabulary
from lorakit.lang.vocab import (
    INIT_METHODS,
    NewRows,
    NewToken,
    expand_vocabulary,
    extend_tokenizer,
    load_new_rows,
    new_rows_state,
    resize_and_init,
    save_new_rows,
    train_new_tokens,
    trainable_new_rows,
)

__all__ = [
    "INIT_METHODS",
    "NewRows",
    "NewToken",
    "expand_vocabulary",
    "extend_tokenizer",
    "load_new_rows",
    "new_rows_state",
    "reduce_vocabulary",
    "resize_and_init",
    "save_new_rows",
    "train_new_tokens",
    "trainable_new_rows",
]
