"""`kimi-jax serve`: the OpenAI-compatible HTTP server (kimi_jax/serve/server.py) over one model."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

DEMO_MODEL_NAME = "kimi-jax-demo"


def add_serve(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default: the embedded demo model)",
                       description="Serve /v1/chat/completions, /v1/completions and /v1/models over a continuous-"
                                   "batching engine, from a checkpoint directory or the embedded demo model.")
    p.add_argument("--checkpoint", help="checkpoint directory (Hugging Face safetensors or converted Orbax) with "
                                        "its tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--page-size", type=int, default=16, help="latent cache rows per page")
    p.add_argument("--max-context", type=int, default=None,
                   help="prompt + completion tokens of one request (default: 2048, or less if the model's "
                        "max_position_embeddings is smaller; a multiple of --page-size)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens forwarded per prefill step")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 answers")
    p.add_argument("--api-key", default=os.environ.get("KIMI_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $KIMI_JAX_API_KEY)")
    p.add_argument("--model-name", help=f"the model id clients send (default: the checkpoint directory's name, "
                                        f"or {DEMO_MODEL_NAME!r})")
    p.add_argument("--dtype", default=None, help="float32 (default on CPU) or bfloat16 (default elsewhere)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    import jax

    from kimi_jax.demo import demo_model
    from kimi_jax.loading import load
    from kimi_jax.serve.engine import Engine, EngineConfig, Request
    from kimi_jax.serve.server import serve
    from kimi_jax.tokenizer import load_tokenizer

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if args.checkpoint:
        tokenizer = load_tokenizer(args.checkpoint)  # before the weights: a missing tokenizer fails fast
        model = load(args.checkpoint, dtype=dtype)
        name = args.model_name or Path(args.checkpoint).resolve().name
    else:
        model, tokenizer = demo_model(dtype=dtype)
        name = args.model_name or DEMO_MODEL_NAME
    max_context = args.max_context
    if max_context is None:
        limit = min(2048, model.cfg.max_position_embeddings)
        max_context = max(limit // args.page_size, 1) * args.page_size
    config = EngineConfig(max_batch=args.max_batch, page_size=args.page_size, max_context=max_context,
                          prefill_chunk=args.prefill_chunk, max_queue=args.max_queue)
    engine = Engine(model, tokenizer, config)

    if not _is_loopback(args.host) and args.api_key is None:
        print(f"kimi-jax serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              f"port can use the model", file=sys.stderr)
    print(f"kimi-jax serve: compiling the engine for {name!r} (max_batch {config.max_batch}, context "
          f"{config.max_context}, {config.total_pages} pages of {config.page_size})...", file=sys.stderr)
    engine.generate([Request((tokenizer.bos_id,), max_tokens=2)])  # compile before the first client waits
    serve(engine, model_name=name, host=args.host, port=args.port, api_key=args.api_key, log_level=args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
