"""Shared fixtures: tiny random models built in code (no downloads, seconds to run)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=128, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model_factory(request):
    return TINY_MODELS[request.param]


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 128, (3, 9), generator=g)


def adapters(model, name="default"):
    """Module path -> adapter `name` of that layer."""
    from lorakit.core.inject import adapter_modules

    return adapter_modules(model, name)


def perturb(model, name="default", seed=0, scale=0.05):
    """Add N(0, scale) noise to every parameter of adapter `name` so its effect is visible
    (zero-initialised factors would otherwise hide it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters(model, name).values():
            for p in a.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)


def randomize(model, name="default", seed=0, std=0.1):
    """Overwrite every parameter of adapter `name` with seeded N(0, std) values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters(model, name).values():
            for p in a.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def token_data(n=12, t=8, lo=1, hi=128, seed=0):
    """(n, t) random token ids in [lo, hi): a causal-LM client dataset."""
    return torch.randint(lo, hi, (n, t), generator=torch.Generator().manual_seed(seed))


def two_clients():
    """Label skew for a language model: each client sees half of the vocabulary."""
    return [token_data(lo=1, hi=64, seed=1), token_data(lo=64, hi=128, seed=2)]


def regression_losses(model, ids, lr, steps=8, seed=0):
    """Fit the model's logits to a fixed random target with Adam on its trainable params;
    returns the loss per step (a quick 'does this adapter train' check)."""
    target = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(input_ids=ids).logits - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Moni, muli bwanji? Ndili bwino, zikomo kwambiri.",
    "Pack my box with five dozen liquor jugs.",
    "Mulungu anakonda dziko lapansi kotero kuti anapatsa Mwana wake.",
]


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in code on a few sentences (offline, ~50 ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama + tokenizer saved as a local HF model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "train.txt"
    f.write_text("\n\n".join(CORPUS * 40))
    return f


# -- optimizer tests (GaLore, FRUGAL) -------------------------------------------------------
def lsq_problem(m, n, seed=0):
    """(W0 (m, n), loss(W)): a seeded least-squares problem for optimizer comparisons."""
    g = torch.Generator().manual_seed(seed)
    W0, X, Y = torch.randn(m, n, generator=g), torch.randn(7, n, generator=g), torch.randn(7, m, generator=g)
    return W0, lambda W: ((X @ W.T - Y) ** 2).sum()


def run_steps(opt, params, loss_fn, steps):
    """`steps` optimizer steps of loss_fn(*params)."""
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(*params).backward()
        opt.step()


def lm_batches(n, seed=1):
    """n seeded (2, 12) batches of token ids below 128 (the tiny models' vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 12), generator=g) for _ in range(n)]


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss
