"""load_texts (plain / JSONL / chat) and pack, with tokenizers built in code."""

import json

import pytest
import torch

from lorakit.data import load_texts, pack, render_record
from lorakit.data.text import ALPACA_INPUT_TEMPLATE
from lorakit.errors import ConfigError


def _jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


# ------------------------------------------------------------------ load_texts


def test_plain_text_paragraphs_and_files(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first para\nline two\n\n  \nsecond para\n\n\nthird\n")
    assert load_texts(f) == ["first para\nline two", "second para", "third"]
    assert load_texts(f, per="file") == ["first para\nline two\n\n  \nsecond para\n\n\nthird"]


def test_directory_loads_files_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    _jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "sea"}])
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert load_texts(tmp_path) == ["ay", "bee", "sea"]


def test_jsonl_text_instruction_and_messages(tmp_path):
    f = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "plain"},
            "",  # blank lines are skipped
            {"instruction": "Translate", "input": "moni", "output": "hello"},
            {"instruction": "Say hi", "output": "hi"},
            {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
        ],
    )
    texts = load_texts(f)
    assert texts[0] == "plain"
    assert texts[1] == ALPACA_INPUT_TEMPLATE.format(instruction="Translate", input="moni", output="hello")
    assert "### Input" not in texts[2] and texts[2].endswith("### Response:\nhi")
    assert texts[3] == "<|user|>\nQ?\n<|assistant|>\nA."


def test_messages_use_the_tokenizers_chat_template(words_tok):
    words_tok.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }};{% endfor %}"
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert render_record(record, words_tok) == "[user] hi;[assistant] yo;"


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"text": "ok"', r"data\.jsonl:3: invalid JSON"),
        ('["a list"]', r"data\.jsonl:3: expected a JSON object, got list"),
        ('{"title": "x", "body": "y"}', r"data\.jsonl:3: a record needs .*found keys \['body', 'title'\]"),
        ('{"text": 5}', r"data\.jsonl:3: field 'text' must be a string, got int"),
        ('{"instruction": "a", "output": null}', r"data\.jsonl:3: field 'output' must be a string"),
        ('{"messages": []}', r"data\.jsonl:3: 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user"}]}', r"data\.jsonl:3: messages\[0\] must be an object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    f = _jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b"}, bad_line])
    with pytest.raises(ConfigError, match=message):
        load_texts(f)


def test_every_jsonl_reader_names_file_and_line(tmp_path):
    from lorakit.data import augment, less
    from lorakit.lang.evalsuite import load_task

    f = _jsonl(tmp_path / "data.jsonl", [{"text": "a"}, '{"text": '])
    for read in (load_texts, augment.read_records, less.read_records, load_task):
        with pytest.raises(ConfigError, match=r"data\.jsonl:2: invalid JSON \(Expecting value at column 10\)"):
            read(f)
    f.write_bytes(b'{"text": "\xff"}\n')
    for read in (load_texts, augment.read_records, less.read_records, load_task):
        with pytest.raises(ConfigError, match=r"data\.jsonl: not UTF-8 text"):
            read(f)


def test_load_texts_argument_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="holds no"):
        load_texts(tmp_path)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match="per must be"):
        load_texts(tmp_path / "a.txt", per="line")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ConfigError, match="latin.txt: not UTF-8"):
        load_texts(tmp_path / "latin.txt")


# ------------------------------------------------------------------ pack


def test_pack_shape_and_exact_round_trip(words_tok):
    texts = ["the cat sat", "on a mat", "dog ran far away", "and then"]
    blocks = pack(words_tok, texts, block_size=4, batch_size=3)  # batches split mid-list
    stream = []
    for t in texts:
        stream += words_tok.convert_tokens_to_ids(t.split()) + [words_tok.eos_token_id]
    assert blocks.dtype == torch.long
    assert blocks.shape == (len(stream) // 4, 4) == (4, 4)
    assert blocks.flatten().tolist() == stream[:16]
    assert words_tok.convert_ids_to_tokens(blocks[0].tolist()) == ["the", "cat", "sat", "<eos>"]


def test_pack_without_eos_and_too_short(words_tok):
    assert pack(words_tok, ["the cat sat", "on a mat"], 3, add_eos=False).flatten().tolist() == (
        words_tok.convert_tokens_to_ids("the cat sat on a mat".split())
    )
    assert pack(words_tok, ["the cat"], block_size=8).shape == (0, 8)
    assert pack(words_tok, [], block_size=8).shape == (0, 8)


def test_pack_byte_level_decodes_back_to_the_text(bpe_tok):
    texts = ["Ndipo mau a Yehova anadza kwa Yona,", "Now the word of the LORD came unto Jonah."]
    joined = "".join(t + "<eos>" for t in texts)
    every_token = pack(bpe_tok, texts, block_size=1)  # block 1 drops nothing
    assert bpe_tok.decode(every_token.flatten().tolist()) == joined
    blocks = pack(bpe_tok, texts, block_size=5)
    assert blocks.numel() == len(every_token) - len(every_token) % 5
    assert joined.startswith(bpe_tok.decode(blocks.flatten().tolist()))


def test_pack_adds_bos_when_the_tokenizer_would(words_tok):
    from tokenizers.processors import TemplateProcessing

    texts = ["the cat", "a mat"]
    ids = words_tok.convert_tokens_to_ids(["the", "cat", "<eos>", "a", "mat", "<eos>"])
    words_tok.add_special_tokens({"bos_token": "<pad>"})  # reuse an existing id as bos
    bos = words_tok.bos_token_id
    assert pack(words_tok, texts, 3).flatten().tolist() == ids  # the tokenizer adds no bos: neither do we
    words_tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<pad> $A", special_tokens=[("<pad>", bos)]
    )  # now it adds bos itself, like Gemma's
    assert pack(words_tok, texts, 4).flatten().tolist() == [bos] + ids[:3] + [bos] + ids[3:]
    assert pack(words_tok, texts, 3, add_bos=False).flatten().tolist() == ids


def test_pack_errors(words_tok):
    with pytest.raises(ConfigError, match="block_size must be >= 1"):
        pack(words_tok, ["the cat"], block_size=0)
    words_tok.eos_token = None
    with pytest.raises(ConfigError, match="no eos token"):
        pack(words_tok, ["the cat"], block_size=2)
    assert pack(words_tok, ["the cat"], block_size=2, add_eos=False).shape == (1, 2)
    with pytest.raises(ConfigError, match="no bos token"):
        pack(words_tok, ["the cat"], block_size=2, add_eos=False, add_bos=True)
