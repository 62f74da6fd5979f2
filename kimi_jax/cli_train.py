"""`kimi-jax finetune` and `kimi-jax export` subcommands."""

from __future__ import annotations

import json
import sys


def add_finetune(sub):
    p = sub.add_parser("finetune", help="fine-tune (or train from a preset) with optax",
                       description="Fine-tune a checkpoint, or train a preset from scratch, on JSONL data "
                                   "({\"text\": ...} or {\"messages\": [...]}, packed to --seq-len).")
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--checkpoint", help="Hugging Face checkpoint directory to start from")
    base.add_argument("--preset", help="start from a preset with random weights (tiny, bench-mini, ...)")
    p.add_argument("--data", required=True, help="JSONL file")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, configs")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps (then cosine decay to 10%%)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters only")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--qk-clip-tau", type=float, default=None)
    p.add_argument("--bias-update-gamma", type=float, default=0.0)
    p.add_argument("--aux-loss-alpha", type=float, default=0.0)
    p.add_argument("--remat", choices=["none", "full", "dots"], default="none")
    p.add_argument("--dtype", default="float32", help="parameter and compute dtype")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(run=run_finetune)


def run_finetune(args) -> int:
    from flax import nnx

    from kimi_jax.config import preset
    from kimi_jax.finetune import finetune
    from kimi_jax.loading import load, resolve_dtype
    from kimi_jax.model import KimiForCausalLM
    from kimi_jax.tokenizer import ByteTokenizer, load_tokenizer
    from kimi_jax.train import TrainConfig

    dtype = resolve_dtype(args.dtype)
    if args.checkpoint:
        model = load(args.checkpoint, dtype=dtype, remat=args.remat)
        tokenizer = load_tokenizer(args.checkpoint)
    else:
        tokenizer = ByteTokenizer()
        cfg = preset(args.preset, remat=args.remat, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                     pad_token_id=tokenizer.pad_id)
        if cfg.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"preset {args.preset!r} has vocab_size={cfg.vocab_size}, smaller than the byte "
                             f"tokenizer's {tokenizer.vocab_size}")
        model = KimiForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(args.seed))
    total = args.steps if args.warmup else None
    tcfg = TrainConfig(optimizer=args.optimizer, learning_rate=args.lr, warmup_steps=args.warmup, total_steps=total,
                       weight_decay=args.weight_decay, qk_clip_tau=args.qk_clip_tau,
                       bias_update_gamma=args.bias_update_gamma, aux_loss_alpha=args.aux_loss_alpha,
                       lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, seed=args.seed)
    history = finetune(model, tokenizer, args.data, args.out, tcfg, steps=args.steps, batch_size=args.batch,
                       seq_len=args.seq_len, save_every=args.save_every, keep=args.keep, resume=args.resume,
                       tokenizer_dir=args.checkpoint)
    if history:
        print(json.dumps({"steps": history[-1]["step"], "first_loss": history[0]["loss"],
                          "last_loss": history[-1]["loss"], "out": args.out}))
    else:
        print(f"{args.out}: already at step {args.steps}; nothing to do", file=sys.stderr)
    return 0


def add_export(sub):
    p = sub.add_parser("export", help="write a finetune run as a Hugging Face checkpoint",
                       description="Export a finetune run directory (its latest checkpoint, LoRA merged) as "
                                   "safetensors + config.json that transformers' DeepseekV3ForCausalLM loads.")
    p.add_argument("run_dir")
    p.add_argument("hf_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(run=run_export)


def run_export(args) -> int:
    import ml_dtypes
    import numpy as np

    from kimi_jax.finetune import export

    dtype = np.float32 if args.dtype == "float32" else ml_dtypes.bfloat16
    print(export(args.run_dir, args.hf_dir, dtype=dtype))
    return 0


BENCHMARKS = {"decode": "bench.decode", "prefill": "bench.prefill", "moe-scaling": "bench.moe_scaling",
              "cache": "bench.cache", "convert": "bench.convert", "serve": "bench.serve"}


def add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks against a reference measured in the same run",
                       description="Run a benchmark from bench/ (each prints JSON with --json and saves "
                                   "bench/results/<name>.json and .png). Options after the name go to it.")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("options", nargs="*", help="the benchmark's own options (see kimi-jax bench NAME -- --help)")
    p.set_defaults(run=run_bench)


def run_bench(args) -> int:
    import importlib

    return importlib.import_module(BENCHMARKS[args.name]).main(args.options)
