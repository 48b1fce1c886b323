"""`lorakit <verb>`: train, eval, export, merge, serve, vocab, federate, select, augment, library, recipe,
info, generate, methods.

Flags of `train` are generated from `TrainConfig` and from the chosen method's config
dataclass, so every field is settable from the command line or a YAML/JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lorakit.errors import ConfigError, LorakitError

EVAL_DATA = {
    "chichewa-heldout": "Chichewa Bible, held-out books (Ruth, Jonah, Philemon, Jude)",
    "kjv-heldout": "English KJV of the same held-out books (forgetting check)",
    "bbc-news": "BBC News test split (accuracy; use --task seq-cls)",
}

EPILOGS = {
    "train": """examples:
  lorakit train --model smollm2-135m --data chichewa --max-steps 150 --r 16 --alpha 32
  lorakit train --config run.yaml --max-steps 20          # flags override the file
  lorakit train --data notes.jsonl --target q_proj,v_proj --output-dir runs/notes
  lorakit train --task seq-cls --model minilm-l6 --data bbc-news --max-steps 200 --lr 5e-4
  lorakit train --config run.yaml --resume                # continue from the last checkpoint
  lorakit train --method full --optim galore --galore-rank 64   # full-parameter GaLore
  lorakit train --method full --lisa --lisa-layers 2            # LISA: 2 sampled layers at a time""",
    "eval": """examples:
  lorakit eval --model smollm2-135m --data chichewa-heldout
  lorakit eval --adapter runs/lorakit/adapter --data chichewa-heldout --data kjv-heldout
  lorakit eval --model minilm-l6 --task seq-cls --adapter runs/bbc/adapter --data bbc-news
  lorakit eval --adapter runs/ny/adapter --suite bible-next-verse bible-match --limit 100 --report runs/ny/suite.json
  lorakit eval --suite afrixnli_yor.jsonl afrimgsm_hau.jsonl --shots 5 --mode in-language --mode translate-test
(--suite: an IrokoBench-style runner, lorakit.lang.evalsuite. Tasks are built-in names
 (bible-match, bible-next-verse, dialog-reply, bbc-topic) or JSONL files of items
 {"lang", "prompt", "choices" + "answer" | "label" (+ "labels") | "answer" (generation), and
 optional "prompt_en", "choices_en" for translate-test}; multiple choice and classification are
 scored by log-likelihood, generation by exact match. Prints a table per task and language.)""",
    "export": """examples:
  lorakit export --adapter runs/lorakit/adapter --out merged-model            # merged HF model dir
  lorakit export --adapter runs/lorakit/adapter --out peft-adapter --format peft
  lorakit export --adapter runs/dylora/adapter --out rank4 --format peft --rank 4""",
    "info": """examples:
  lorakit info runs/lorakit/adapter
  lorakit info runs/lorakit/adapter --json""",
    "generate": """examples:
  lorakit generate --prompt "Pachiyambi Mulungu" --adapter runs/lorakit/adapter
  lorakit generate --model smollm2-135m --prompt "In the beginning" --max-new-tokens 30""",
    "methods": "examples:\n  lorakit methods",
    "serve": """examples:
  lorakit serve --model smollm2-135m --adapters runs/adapters          # each subdirectory is an adapter
  lorakit serve --adapters runs/adapters --port 8000 --api-key secret --max-batch 16
then, with any OpenAI client:
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "chichewa", "prompt": "Ndipo masiku", "max_tokens": 20, "temperature": 0}'
  openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret").chat.completions.create(model="chichewa", ...)""",
    "vocab": """examples:
  lorakit vocab expand --model smollm2-135m --data chichewa --k 1000 --init merge --out models/smollm2-ny
  lorakit vocab reduce --model smollm2-135m --data chichewa --out models/smollm2-ny-small
  lorakit train --model models/smollm2-ny --data chichewa         # then train LoRA on the extended model
(expand: new target-language tokens from continued BPE merges, new embedding rows initialised by
 merge|mean|random; reduce: keep only the tokens the data uses. The output is a normal
 transformers model directory.)""",
    "federate": """examples:
  lorakit federate --model minilm-l6 --task seq-cls --data bbc-news --clients 4 --dirichlet 0.5 \\
      --ranks 4,8,16,8 --rounds 5 --local-steps 10 --strategy flora --out runs/fed
  lorakit federate --model smollm2-135m --data chichewa --clients 2 --ranks 4,8 --rounds 3 --sparse 0.1
  lorakit federate ... --flower        # the same rounds in Flower's simulation engine (Ray)
(real multi-machine runs: examples/flower_app/run_local.sh with flower-superlink/supernode)""",
    "select": """examples:
  lorakit select --model smollm2-135m --train pool.jsonl --target dev.jsonl --fraction 0.05 --output selected.jsonl
  lorakit select ... --group-field task --proj-dim 8192 --epochs 4    # LESS defaults: r=128, 4 warm-up epochs
Writes the selected examples (JSONL) and keeps the gradient datastore, scores and selection.json
in --work-dir (an interrupted run resumes from its last complete shard).""",
    "augment": """examples:
  lorakit augment --seeds seeds.jsonl --pool other1.jsonl --pool other2.jsonl --out new.jsonl --per-seed 2
  lorakit augment --dedomain --domain hotel=hotel.jsonl --domain taxi=taxi.jsonl --target taxi --out-dir amd2g
RADA (arXiv:2402.13482): retrieve related pool examples by MiniLM embeddings (FAISS when installed),
prompt a local LM (SmolLM2-135M-Instruct by default) with them and the seeds, parse, deduplicate and
filter the generations; writes OUT.jsonl and OUT.jsonl.report.json. --dedomain: AMD²G's
domain-agnostic stage-1 data (domain terms replaced by <term>) + stage-2 data + terms.json.""",
    "library": """examples:
  lorakit library --library loras/ --kshot kshot.jsonl --top-m 2 --output runs/expert
  lorakit library --library loras/ --kshot kshot.jsonl --labels yes,no --mix moe --embedder minilm-l6
Ranks every adapter in the folder on the K examples (response perplexity; accuracy over --labels;
similarity of library.json descriptions), picks a diverse group of --top-m (no near-duplicate
LoRAs, --diversity 0 turns that off) and writes their mixture to OUTPUT/adapter (--mix merge: one
LoRA; moe: a MeteoRA gate over them) and the score table to OUTPUT/selection.json.""",
    "recipe": """examples:
  lorakit recipe recipes/chichewa_assistant.yaml                 # reduced size: minutes on a laptop CPU
  lorakit recipe recipes/medical_assistant.yaml --scale full --out runs/med
  lorakit recipe recipes/chichewa_assistant.yaml --dry-run       # print the commands only
  lorakit recipe recipes/chichewa_assistant.yaml --from sft      # resume at a stage
A recipe is a YAML list of stages, each one lorakit verb (train, export, eval, vocab, ...) or a
data-building step (prepare); see recipes/README.md.""",
    "merge": """examples:
  lorakit merge recipe.yaml
recipe.yaml (mergekit style):
  base_model: smollm2-135m          # default: the first adapter's base model
  adapters:
    - {path: runs/chichewa/adapter, weight: 1.0}
    - {path: runs/notes/adapter, weight: 0.5}
  method: ties                       # linear task_arithmetic cat svd ties dare_linear dare_ties magnitude_prune
  rank: 16                           # output rank (not for the exact methods linear/task_arithmetic/cat)
  density: 0.5                       # ties / dare / magnitude_prune: fraction of entries kept
  output: runs/merged
  format: peft                       # peft: a LoRA adapter; merged: a full transformers model dir""",
}


def _parser(method: str | None = None) -> argparse.ArgumentParser:
    from lorakit.config import add_dataclass_args
    from lorakit.core.registry import get_method
    from lorakit.train import BUILTIN_DATA, TrainConfig

    p = argparse.ArgumentParser(prog="lorakit", description="Low-rank adaptation toolkit.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=EPILOGS[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    t = verb("train", "Train an adapter (causal LM or sequence classification).")
    t.add_argument("--config", help="YAML/JSON run file: TrainConfig keys, method keys under 'adapter:'")
    t.add_argument("--eval", action="store_true", help="after training, evaluate bits-per-byte on held-out data")
    run_flags = add_dataclass_args(t, TrainConfig, help_prefix="run: ") | {"--config", "--eval"}
    if method == "full":  # full-parameter training: no adapter flags
        t.set_defaults(_method_cls=None)
    else:
        spec = get_method(method or "lora")
        t.set_defaults(_method_cls=spec.config_cls)
        add_dataclass_args(t, spec.config_cls, prefix="adapter_", help_prefix=f"{spec.name}: ",
                           taken=run_flags, clash_prefix=spec.name)
    t.epilog += "\n\nbuilt-in data: " + ", ".join(f"{k} ({v})" for k, v in BUILTIN_DATA.items())

    e = verb("eval", "Evaluate a model (+ adapter): bits-per-byte, perplexity or accuracy.")
    _model_args(e)
    e.add_argument("--data", action="append", default=None,
                   help=f"{', '.join(EVAL_DATA)} or a text/JSONL path; repeatable (default chichewa-heldout)")
    e.add_argument("--task", default="causal-lm", choices=["causal-lm", "seq-cls"])
    e.add_argument("--block-size", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--json", action="store_true", help="print JSON only")
    e.add_argument("--suite", nargs="+", default=None, metavar="TASK",
                   help="IrokoBench-style task suite: built-in task names or JSONL files (see below)")
    e.add_argument("--mode", action="append", default=None, choices=["in-language", "translate-test"],
                   help="--suite: evaluation mode, repeatable (default: both)")
    e.add_argument("--shots", type=int, default=0, help="--suite: in-context demonstrations per item")
    e.add_argument("--pmi", action="store_true",
                   help="--suite: also score choices by PMI (log-likelihood minus the unconditional one)")
    e.add_argument("--limit", type=int, default=None, help="--suite: at most this many items per task (and language)")
    e.add_argument("--max-new-tokens", type=int, default=32, help="--suite: generation length")
    e.add_argument("--report", default=None, help="--suite: write the JSON report here (and the table as .md)")

    x = verb("export", "Merge an adapter into its base model, or write it in PEFT format.")
    _model_args(x)
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--format", choices=["merged", "peft"], default="merged",
                   help="merged: a plain transformers model dir; peft: a PEFT LoRA adapter (any method, via to_lora)")
    x.add_argument("--rank", type=int, default=None,
                   help="peft format: export at this rank (DyLoRA's nested rank; SVD truncation for others)")

    i = verb("info", "Describe a saved adapter: method, targets, rank, parameter count.")
    i.add_argument("adapter", help="adapter directory (lorakit- or PEFT-written)")
    i.add_argument("--json", action="store_true")

    g = verb("generate", "Generate text from a base model, optionally with an adapter.")
    _model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--repetition-penalty", type=float, default=1.3)
    g.add_argument("--seed", type=int, default=0)

    verb("methods", "List the registered adapter methods.")

    sv = verb("serve", "Serve a base model and a directory of adapters over the OpenAI HTTP API.")
    sv.add_argument("--model", default="smollm2-135m", help="base model alias or local HF dir")
    sv.add_argument("--adapters", default=None, help="directory whose subdirectories are adapters (name = dir name)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $LORAKIT_API_KEY)")
    sv.add_argument("--max-batch", type=int, default=8, help="rows decoded together (continuous batching)")
    sv.add_argument("--budget-mb", type=float, default=1024, help="adapter memory pool budget (LRU beyond it)")
    sv.add_argument("--rank-groups", type=_rank_groups, default="pow2",
                    help="how adapters of different ranks are batched: pow2 (pad to the next power of two), exact, "
                         "or an int R (pad all to R: one group, fewest kernels; for GPUs)")
    sv.add_argument("--schedule", choices=["affinity", "fcfs"], default="affinity",
                    help="admission order: affinity (requests for adapters already running go first, none passed "
                         "over more than max-batch times) or fcfs (strict arrival order)")

    vc = verb("vocab", "Extend a model's vocabulary for a new language, or reduce it to what a corpus uses.")
    vc.add_argument("action", choices=["expand", "reduce"])
    vc.add_argument("--model", default="smollm2-135m", help="alias or local HF dir")
    vc.add_argument("--data", default="chichewa", help="built-in corpus (chichewa, kjv) or a text/JSONL path")
    vc.add_argument("--out", required=True, help="output model directory")
    vc.add_argument("--k", type=int, default=1000, help="expand: number of new tokens")
    vc.add_argument("--init", default="merge", choices=["merge", "mean", "random", "transtok"],
                    help="expand: initialisation of the new embedding rows (transtok: trans-tokenization "
                         "over the English-Chichewa Bible, arXiv:2408.04303)")

    fd = verb("federate", "Federated LoRA fine-tuning across simulated clients (FLoRA, FedAvg; optional Flower).")
    fd.add_argument("--model", default="minilm-l6", help="alias or local HF dir")
    fd.add_argument("--task", default="seq-cls", choices=["causal-lm", "seq-cls"])
    fd.add_argument("--data", default="bbc-news", help="bbc-news (seq-cls), chichewa/kjv or a text path (causal-lm)")
    fd.add_argument("--clients", type=int, default=4)
    fd.add_argument("--ranks", default="8", help="one rank, or one per client: 4,8,16,8 (FLoRA allows mixed ranks)")
    fd.add_argument("--strategy", default="flora", choices=["flora", "fedavg", "fedavg-delta"])
    fd.add_argument("--rounds", type=int, default=5)
    fd.add_argument("--local-steps", type=int, default=10)
    fd.add_argument("--lr", type=float, default=1e-3)
    fd.add_argument("--batch-size", type=int, default=8)
    fd.add_argument("--dirichlet", type=float, default=0.5, help="seq-cls label skew α (smaller = more non-IID)")
    fd.add_argument("--sparse", type=float, default=None, help="send only this fraction of entries (CELLM top-k)")
    fd.add_argument("--block-size", type=int, default=128, help="causal-lm block length")
    fd.add_argument("--max-length", type=int, default=128, help="seq-cls truncation")
    fd.add_argument("--seed", type=int, default=0)
    fd.add_argument("--flower", action="store_true", help="run in Flower's simulation engine")
    fd.add_argument("--out", default=None, help="write federation.json and the final model here")

    mg = verb("merge", "Merge several adapters (any mix of methods and ranks) by a YAML recipe.")
    mg.add_argument("recipe", help="YAML/JSON merge recipe")

    from lorakit.data.less import SelectConfig

    se = verb("select", "Select the training examples most useful for a target task (LESS, arXiv:2402.04333).")
    se.add_argument("--config", help="YAML/JSON file of SelectConfig keys")
    add_dataclass_args(se, SelectConfig)

    from lorakit.compose.library import LibraryRunConfig

    li = verb("library", "Pick adapters from a LoRA library with K examples and mix them (arXiv:2408.15915).")
    li.add_argument("--config", help="YAML/JSON file of LibraryRunConfig keys")
    add_dataclass_args(li, LibraryRunConfig)

    rc = verb("recipe", "Run an end-to-end recipe (data, training stages, evaluation) from a YAML file.")
    rc.add_argument("recipe", help="recipe YAML file (see recipes/)")
    rc.add_argument("--scale", choices=["reduced", "full"], default="reduced",
                    help="reduced: a CPU-sized run of minutes; full: the documented full-size settings")
    rc.add_argument("--out", default=None, help="output directory (default runs/<recipe>-<scale>)")
    rc.add_argument("--from", dest="start", default=None, help="start at this stage (resume)")
    rc.add_argument("--only", default=None, help="run only this stage")
    rc.add_argument("--dry-run", action="store_true", help="print the stages' commands without running them")

    au = verb("augment", "Generate (RADA) or de-domain (AMD²G) training data with local models.")
    au.add_argument("--seeds", help="RADA: seed examples (JSONL records or a text file)")
    au.add_argument("--pool", action="append", default=[], help="RADA: other datasets to retrieve from (repeat)")
    au.add_argument("--out", help="RADA: output JSONL")
    au.add_argument("--embedder", default="minilm-l6", help="sentence encoder alias or local HF dir")
    au.add_argument("--generator", default="smollm2-135m", help="causal LM alias or local HF dir")
    au.add_argument("--k", type=int, default=4, help="retrieved examples per prompt")
    au.add_argument("--shots", type=int, default=2, help="other seed examples per prompt")
    au.add_argument("--per-seed", type=int, default=1, help="prompts per seed")
    au.add_argument("--index", default="auto", choices=["auto", "faiss", "torch"])
    au.add_argument("--max-new-tokens", type=int, default=128)
    au.add_argument("--temperature", type=float, default=0.0)
    au.add_argument("--dedup-threshold", type=float, default=0.8)
    au.add_argument("--copy-threshold", type=float, default=0.8)
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--dedomain", action="store_true", help="AMD²G mode: build the two-stage data instead")
    au.add_argument("--domain", action="append", default=[], metavar="NAME=PATH", help="--dedomain: a domain's data")
    au.add_argument("--target", help="--dedomain: the domain adapted to in stage 2")
    au.add_argument("--general", default=None, help="--dedomain: optional general-domain text file")
    au.add_argument("--out-dir", help="--dedomain: writes stage1.jsonl, stage2.jsonl, terms.json")
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="alias or local HF dir (default: the adapter's base model)")
    p.add_argument("--adapter", default=None, help="adapter directory to attach")


def _method_from_argv(argv: list[str]) -> str | None:
    """The method named by --method or the config file, so its flags can be generated."""
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            from lorakit.config import read_config_file

            return read_config_file(argv[i + 1]).get("method")
    return None


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in ("train", "eval", "serve", "recipe"):
        from lorakit.allocator import reexec_with_tcmalloc

        reexec_with_tcmalloc()  # long CPU jobs: a non-fragmenting allocator (see allocator.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser(_method_from_argv(argv)).parse_args(argv)
        return {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "info": cmd_info,
                "generate": cmd_generate, "methods": cmd_methods, "merge": cmd_merge,
                "serve": cmd_serve, "vocab": cmd_vocab, "federate": cmd_federate,
                "select": cmd_select, "augment": cmd_augment, "library": cmd_library,
                "recipe": cmd_recipe}[args.verb](args)
    except LorakitError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2


# -- verbs ------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from lorakit.config import from_dict, overrides
    from lorakit.train import TrainConfig, load_run_config, train

    run, adapter = ({}, {})
    if args.config:
        cfg0, adapter = load_run_config(args.config)
        run = {k: getattr(cfg0, k) for k in cfg0.__dataclass_fields__}
    run.update(overrides(args, TrainConfig))
    if args._method_cls is not None:
        adapter.update(overrides(args, args._method_cls, prefix="adapter_"))
    cfg = from_dict(TrainConfig, run)
    res = train(cfg, adapter=adapter)
    print(f"{'model' if cfg.method == 'full' else 'adapter'} saved to {res.adapter_dir}  (train loss {res.log['train_loss']:.4f}, "
          f"{res.log['seconds']['train']:.0f} s, {res.log['trainable_parameters']:,} trainable parameters)")
    if args.eval and cfg.task == "causal-lm":
        for name in ("chichewa-heldout", "kjv-heldout"):
            r = _eval_lm(res.model, res.tokenizer, name, 512, 4)
            print(f"{name}: bits/byte {r['bits_per_byte']:.4f}  perplexity {r['perplexity']:.2f}")
    return 0


def _load(args, task="causal-lm"):
    """Model (+ adapter) from --model / --adapter; the adapter's recorded base model is the default."""
    import lorakit
    from lorakit.models import load_model

    name = args.model
    if name is None and args.adapter:
        _, meta = lorakit.core.io.read_config(args.adapter)
        name = meta.get("base_model")
    if name is None:
        name = "smollm2-135m"
    num_labels = None
    if task == "seq-cls" and args.adapter:
        from lorakit.core.io import read_tensors

        heads = [t for k, t in read_tensors(args.adapter).items() if k.endswith(("score.weight", "classifier.weight"))]
        num_labels = heads[0].shape[0] if heads else None
    model, tok = load_model(name, task=task, num_labels=num_labels)
    if task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if args.adapter:
        lorakit.load(model, args.adapter)
        # an adapter that extended the vocabulary carries its tokenizer
        tok = lorakit.core.io.load_tokenizer(args.adapter) or tok
    return model, tok


def _eval_texts(name: str) -> list[str]:
    from lorakit import data

    if name == "chichewa-heldout":
        return data.chichewa_split()[1]
    if name == "kjv-heldout":
        return data.english_heldout_texts()
    if Path(name).exists():
        return data.load_texts(name)
    raise ConfigError(f"eval data {name!r} is neither one of {sorted(EVAL_DATA)} nor an existing path")


def _eval_lm(model, tok, name, block_size, batch_size) -> dict:
    from lorakit.evaluate import evaluate_lm

    return evaluate_lm(model, tok, _eval_texts(name), block_size=block_size, batch_size=batch_size)


def cmd_eval(args) -> int:
    if args.suite:
        return _eval_suite(args)
    model, tok = _load(args, args.task)
    results = {}
    for name in args.data or (["bbc-news"] if args.task == "seq-cls" else ["chichewa-heldout"]):
        t = time.time()
        if args.task == "seq-cls":
            from lorakit.data import bbc_news
            from lorakit.evaluate import evaluate_classifier

            texts, labels, _ = bbc_news("test")
            r = evaluate_classifier(model, tok, texts, labels, batch_size=args.batch_size)
        else:
            r = _eval_lm(model, tok, name, args.block_size, args.batch_size)
        r["seconds"] = round(time.time() - t, 1)
        results[name] = r
        if not args.json:
            print(f"{name}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_export(args) -> int:
    import lorakit
    from lorakit.errors import ConfigError

    if not args.adapter:
        raise ConfigError("export needs --adapter")
    if args.format == "peft":
        from lorakit.core.io import export_peft

        model, _ = _load(args)
        export_peft(model, args.out, rank=args.rank)
        print(f"PEFT LoRA adapter written to {args.out}")
        return 0
    model, tok = _load(args)
    lorakit.merge(model)
    lorakit.eject(model, keep_merged=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"merged model written to {args.out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_info(args) -> int:
    from lorakit.core.io import adapter_info

    info = adapter_info(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    rank = cfg.get("r")
    print(f"adapter     {info['path']}  (written by {info['written_by']})")
    print(f"method      {info['method']}")
    print(f"target      {info['target']}  ({info['modules']} modules)")
    if rank is not None:
        print(f"rank        {rank}")
    print(f"parameters  {info['parameters']:,}  ({info['bytes'] / 1e6:.2f} MB, {', '.join(info['dtypes'])})")
    print(f"base model  {info['base_model']}")
    if info.get("new_rows"):
        nr = info["new_rows"]
        print(f"new rows    {nr['n_new']} vocabulary rows after the base's {nr['n_old']} "
              f"({'tied' if nr['tied'] else 'untied'} LM head)")
    if info.get("tokenizer"):
        print(f"tokenizer   {', '.join(info['tokenizer'])}")
    print("config      " + json.dumps(cfg))
    return 0


def cmd_generate(args) -> int:
    import torch

    model, tok = _load(args)
    torch.manual_seed(args.seed)
    print(generate(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.repetition_penalty))
    return 0


def generate(model, tok, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0,
             repetition_penalty: float = 1.3) -> str:
    """Decode a continuation of `prompt` (greedy when temperature == 0)."""
    import torch

    enc = tok(prompt, return_tensors="pt")
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
              repetition_penalty=repetition_penalty)
    if temperature > 0:
        kw["temperature"] = temperature
    with torch.inference_mode():
        out = model.generate(**enc, **kw)
    return tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _rank_groups(value: str) -> str | int:
    """argparse type of `serve --rank-groups` (`lorakit.serve.parse_rank_groups`, message kept)."""
    from lorakit.serve.engine import parse_rank_groups

    try:
        return parse_rank_groups(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_serve(args) -> int:
    from lorakit.serve.server import main_serve

    return main_serve(args.model, args.adapters, args.host, args.port, args.api_key, args.max_batch, args.budget_mb,
                      args.rank_groups, args.schedule)


def cmd_federate(args) -> int:
    import copy

    import torch

    from lorakit.errors import ConfigError
    from lorakit.federated import dirichlet_split, run_federation
    from lorakit.models import load_model

    ranks = [int(r) for r in str(args.ranks).split(",")]
    ranks = ranks * args.clients if len(ranks) == 1 else ranks
    if len(ranks) != args.clients:
        raise ConfigError(f"--ranks gives {len(ranks)} ranks for {args.clients} clients")
    eval_fn, extra = None, {}
    if args.task == "seq-cls":
        from lorakit.data import bbc_news
        from lorakit.evaluate import evaluate_classifier

        if args.data != "bbc-news":
            raise ConfigError("federate --task seq-cls reads --data bbc-news")
        texts, labels, names = bbc_news("train")
        base, tok = load_model(args.model, task="seq-cls", num_labels=len(names))
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tok.pad_token_id
        enc = tok(texts, truncation=True, max_length=args.max_length, padding="max_length", return_tensors="pt")
        examples = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                     "labels": torch.tensor(labels[i])} for i in range(len(labels))]
        parts = dirichlet_split(labels, args.clients, args.dirichlet, seed=args.seed)
        clients = [[examples[i] for i in part] for part in parts]
        test_texts, test_labels, _ = bbc_news("test")

        def eval_fn(model):
            return evaluate_classifier(model, tok, test_texts, test_labels, max_length=args.max_length)

        extra["modules_to_save"] = [h for h in ("classifier", "score") if hasattr(base, h)] or None
    else:
        from lorakit.data import pack
        from lorakit.evaluate import evaluate_lm
        from lorakit.train import train_texts

        base, tok = load_model(args.model)
        blocks = pack(tok, train_texts(args.data, tok), args.block_size)
        if len(blocks) < args.clients:
            raise ConfigError(f"{args.data} has only {len(blocks)} blocks for {args.clients} clients")
        clients = list(blocks.chunk(args.clients))  # contiguous text: each client sees different books
        if args.data == "chichewa":
            heldout = _eval_texts("chichewa-heldout")

            def eval_fn(model):
                return {"bits_per_byte": evaluate_lm(model, tok, heldout, progress=False)["bits_per_byte"]}

    kw = dict(strategy=args.strategy, local_steps=args.local_steps, lr=args.lr, batch_size=args.batch_size,
              sparse=args.sparse, seed=args.seed, eval_fn=eval_fn, **extra)
    factory = lambda: copy.deepcopy(base)  # noqa: E731
    if args.flower:
        from lorakit.federated.flower import run_flower_simulation

        history = run_flower_simulation(factory, clients, ranks, args.rounds, **kw)
    else:
        history = run_federation(factory, clients, ranks, args.rounds, **kw)
    print(f"{'round':>5} {'accepted':>8} {'rejected':>8} {'train loss':>10} {'bytes up':>10}  eval")
    for r in history.rounds:
        losses = list((r.get("train_loss") or {}).values())
        loss = sum(losses) / len(losses) if losses else float("nan")
        print(f"{r['round']:>5} {len(r.get('accepted', [])):>8} {len(r.get('rejected', [])):>8} {loss:>10.4f} "
              f"{r.get('bytes_up', 0):>10}  {json.dumps(r.get('eval'), default=float)}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "federation.json").write_text(json.dumps(
            {"args": vars(args), "rounds": history.rounds}, indent=2, default=str) + "\n")
        if history.model is not None:
            from lorakit.fsutil import atomic_dir

            with atomic_dir(out / "model") as tmp:
                history.model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
        print(f"history and final model written to {out}")
    return 0


def cmd_select(args) -> int:
    from lorakit.config import from_dict, overrides, read_config_file
    from lorakit.data.less import SelectConfig, run_select

    data = read_config_file(args.config) if args.config else {}
    data.update(overrides(args, SelectConfig))
    cfg = from_dict(SelectConfig, data, where=args.config or "")
    res = run_select(cfg)
    print(f"selected {len(res.indices)} of {len(res.scores)} examples -> {cfg.output} "
          f"(datastore, scores and selection.json in {cfg.work_dir})")
    return 0


def cmd_library(args) -> int:
    from lorakit.compose.library import LibraryRunConfig, run_library
    from lorakit.config import from_dict, overrides, read_config_file

    data = read_config_file(args.config) if args.config else {}
    data.update(overrides(args, LibraryRunConfig))
    cfg = from_dict(LibraryRunConfig, data, where=args.config or "")
    res = run_library(cfg)
    print(res.table())
    print(f"selection -> {Path(cfg.output) / 'selection.json'}"
          + (f", mixture adapter -> {Path(cfg.output) / 'adapter'}" if res.mixture else ""))
    return 0


def cmd_recipe(args) -> int:
    from lorakit.recipes import run_recipe

    records = run_recipe(args.recipe, scale=args.scale, out=args.out, start=args.start, only=args.only,
                         dry_run=args.dry_run)
    if not args.dry_run:
        print("recipe done: " + ", ".join(f"{r['stage']} {r['seconds']} s" for r in records))
    return 0


def cmd_augment(args) -> int:
    from lorakit.data import augment
    from lorakit.errors import ConfigError

    if args.dedomain:
        if not (args.domain and args.target and args.out_dir):
            raise ConfigError("augment --dedomain needs --domain NAME=PATH (two or more), --target and --out-dir")
        domains = {}
        for item in args.domain:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--domain expects NAME=PATH, got {item!r}")
            domains[name] = augment.read_records(path)
        general = [augment.example_text(r) for r in augment.read_records(args.general)] if args.general else ()
        data = augment.two_stage_datasets(domains, args.target, general=general)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        augment.write_records(data.stage1, out / "stage1.jsonl")
        augment.write_records(data.stage2, out / "stage2.jsonl")
        (out / "terms.json").write_text(json.dumps(data.terms, indent=1, default=str) + "\n")
        n_terms = {k: len(v) for k, v in data.terms.items()}
        print(f"stage 1: {len(data.stage1)} de-domained examples, stage 2: {len(data.stage2)} {args.target!r} "
              f"examples; terms removed per domain {n_terms} -> {out}")
        return 0
    if not (args.seeds and args.pool and args.out):
        raise ConfigError("augment needs --seeds, at least one --pool and --out (or --dedomain)")
    cfg = augment.RadaConfig(k=args.k, shots=args.shots, per_seed=args.per_seed, index=args.index, seed=args.seed,
                             filter=augment.FilterConfig(dedup_threshold=args.dedup_threshold,
                                                         copy_threshold=args.copy_threshold))
    summary = augment.augment_files(args.seeds, args.pool, args.out, cfg, embedder_model=args.embedder,
                                    generator_model=args.generator, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, seed=args.seed)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def _eval_suite(args) -> int:
    from lorakit.errors import ConfigError
    from lorakit.lang.evalsuite import format_table, run_suite, write_report

    if args.data or args.task != "causal-lm":
        raise ConfigError("--suite scores a causal LM on its own tasks; it takes no --data / --task")
    model, tok = _load(args)
    report = run_suite(model, tok, args.suite, modes=args.mode or ["in-language", "translate-test"],
                       shots=args.shots, pmi=args.pmi, limit=args.limit, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, model_name=args.model, adapter=args.adapter)
    if args.report:
        write_report(report, args.report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
        if args.report:
            print(f"report written to {args.report} (+ {Path(args.report).with_suffix('.md').name})")
    return 0


def cmd_vocab(args) -> int:
    from lorakit.evaluate import fertility
    from lorakit.fsutil import atomic_dir
    from lorakit.models import load_model
    from lorakit.train import train_texts

    model, tok = load_model(args.model)
    texts = train_texts(args.data, tok)
    before = fertility(tok, texts)
    if args.action == "expand":
        from lorakit.lang import expand_vocabulary

        if args.init == "transtok":
            from lorakit.errors import ConfigError
            from lorakit.lang.transtok import bible_pairs, expand_vocabulary_transtok

            if args.data != "chichewa":
                raise ConfigError("--init transtok needs a parallel corpus; the built-in one is "
                                  "English-Chichewa (--data chichewa)")
            model, tok, report = expand_vocabulary_transtok(model, tok, texts, k=args.k,
                                                            parallel_pairs=bible_pairs())
        else:
            model, tok, report = expand_vocabulary(model, tok, texts, k=args.k, init=args.init)
        summary = f"added {report['n_added']} tokens ({args.init} init)"
    else:
        from lorakit.lang import reduce_vocabulary

        model, tok, report = reduce_vocabulary(model, tok, texts)
        summary = (f"kept {report['n_after']} of {report['n_before']} tokens, "
                   f"saved {report['bytes_saved'] / 1e6:.1f} MB ({100 * report['fraction_saved']:.1f}%)")
    with atomic_dir(Path(args.out)) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"{summary}; fertility on {args.data}: {before:.2f} -> {fertility(tok, texts):.2f} tokens/word; "
          f"written to {args.out}")
    return 0


def cmd_merge(args) -> int:
    from lorakit.compose import run_recipe

    out = run_recipe(args.recipe)
    print(f"merged adapter written to {out}")
    return 0


def cmd_methods(args) -> int:
    from lorakit.core.registry import list_methods

    for m in list_methods():
        print(f"{m.name:14s} {m.paper or '':18s} {m.summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
