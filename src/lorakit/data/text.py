"""Read training text from files and pack it into fixed-length token blocks.

Formats ``load_texts`` understands (chosen by file extension):

- ``.txt`` / ``.md`` / anything else: plain UTF-8 text; one document per blank-line-separated
  paragraph (``per="paragraph"``) or one per file (``per="file"``).
- ``.jsonl`` / ``.json`` (one JSON object per line), each record one of:

  - ``{"text": "..."}``
  - ``{"instruction": "...", "input": "...", "output": "..."}`` (``input`` optional), rendered
    with the Alpaca template (``ALPACA_TEMPLATE``), the format such data is published in;
  - ``{"messages": [{"role": "user", "content": "..."}, ...]}``, rendered with the tokenizer's
    chat template when a tokenizer that has one is given, else ``<|role|>\\ncontent`` turns.

A directory loads every such file below it, in sorted path order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".text")

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
ALPACA_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def load_texts(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    per: str = "paragraph",
) -> list[str]:
    """Read documents from a text file, a JSONL file or a directory of them.

    Args:
        path: a file, or a directory (every ``.txt``/``.md``/``.jsonl``/``.json`` file below it).
        tokenizer: renders ``messages`` records with its chat template, when it has one.
        per: plain text only: ``"paragraph"`` (split at blank lines) or ``"file"``.

    Returns:
        The documents, non-empty, in file order.

    Raises:
        ConfigError: a missing path, a bad ``per``, or a malformed record; the message names the
            file and line.
    """
    if per not in ("paragraph", "file"):
        raise ConfigError(f"per must be 'paragraph' or 'file', not {per!r}")
    path = Path(path)
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in JSONL_SUFFIXES + TEXT_SUFFIXES
        )
        if not files:
            raise ConfigError(f"{path} holds no .txt, .md, .jsonl or .json files")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"no such file or directory: {path}")

    texts: list[str] = []
    for file in files:
        if file.suffix in JSONL_SUFFIXES:
            texts.extend(_read_jsonl(file, tokenizer))
        else:
            texts.extend(_read_plain(file, per))
    return texts


def _read_plain(file: Path, per: str) -> list[str]:
    text = read_utf8(file)
    docs = [text] if per == "file" else _PARAGRAPH_BREAK.split(text)
    return [d.strip() for d in docs if d.strip()]


def read_utf8(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: not UTF-8 text ({e})") from e


def read_jsonl(file: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a UTF-8 JSONL file.

    Raises:
        ConfigError: the file is not UTF-8, or a line is not JSON; the message starts with
            ``file:line``.
    """
    file = Path(file)
    for lineno, line in enumerate(read_utf8(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
        yield lineno, record


def _read_jsonl(file: Path, tokenizer: PreTrainedTokenizerBase | None) -> list[str]:
    texts = []
    for lineno, record in read_jsonl(file):
        text = render_record(record, tokenizer, f"{file}:{lineno}")
        if text.strip():
            texts.append(text)
    return texts


def render_record(
    record: Any, tokenizer: PreTrainedTokenizerBase | None = None, where: str = "record"
) -> str:
    """Turn one JSONL record into training text (see the module docstring for the formats).

    Raises:
        ConfigError: the record is not an object, has none of the known fields, or a field has
            the wrong type; ``where`` (e.g. ``"data.jsonl:12"``) starts the message.
    """
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        return _string_field(record, "text", where)
    if "messages" in record:
        return render_chat(_messages(record["messages"], where), tokenizer)
    if "instruction" in record and "output" in record:
        instruction = _string_field(record, "instruction", where)
        output = _string_field(record, "output", where)
        extra = _string_field(record, "input", where) if record.get("input") else ""
        template = ALPACA_INPUT_TEMPLATE if extra.strip() else ALPACA_TEMPLATE
        return template.format(instruction=instruction, input=extra, output=output)
    raise ConfigError(
        f"{where}: a record needs 'text', 'messages', or 'instruction' and 'output'; "
        f"found keys {sorted(record)}"
    )


def render_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase | None) -> str:
    """A conversation as text: the tokenizer's chat template if it has one, else a plain
    ``<|role|>\\ncontent`` layout that any tokenizer can learn."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)


def _string_field(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ConfigError(
                f"{where}: messages[{i}] must be an object with string 'role' and 'content'"
            )
    return value


def pack(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    block_size: int,
    add_eos: bool = True,
    add_bos: bool | None = None,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Tokenise ``texts`` and cut the token stream into full blocks.

    Each text is tokenised without special tokens, preceded by the bos id when ``add_bos`` and
    followed by the eos id when ``add_eos``, so blocks may span document boundaries (standard
    causal-LM packing). ``add_bos=None`` adds bos exactly when the tokenizer itself would (Gemma's
    does and its model degrades without it; SmolLM2's and BERT's do not). The tail shorter than
    ``block_size`` is dropped.

    Returns:
        LongTensor ``(n_blocks, block_size)``; ``n_blocks`` is 0 when there are fewer than
        ``block_size`` tokens.

    Raises:
        ConfigError: ``block_size < 1``, or ``add_eos`` with a tokenizer that has no eos token.
    """
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ConfigError("add_eos=True but the tokenizer has no eos token; set one or pass add_eos=False")

    bos = tokenizer.bos_token_id
    if add_bos is None:
        add_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
    elif add_bos and bos is None:
        raise ConfigError("add_bos=True but the tokenizer has no bos token")

    stream: list[int] = []
    for start in range(0, len(texts), batch_size):
        # batched calls let fast (Rust) tokenizers work on many texts at once
        batch = tokenizer(texts[start : start + batch_size], add_special_tokens=False, verbose=False)
        for ids in batch["input_ids"]:
            if add_bos:
                stream.append(bos)
            stream.extend(ids)
            if add_eos:
                stream.append(eos)

    n_blocks = len(stream) // block_size
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
