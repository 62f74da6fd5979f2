"""The `kimi-jax` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from kimi_jax.cli_plan import add_plan
from kimi_jax.cli_serve import add_serve
from kimi_jax.cli_train import add_bench, add_export, add_finetune


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text (default: the embedded demo model)",
                       description="Generate from a checkpoint directory, or from the embedded demo model.")
    p.add_argument("--checkpoint", help="Hugging Face safetensors directory (config.json + *.safetensors)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs a tokenizer in the checkpoint directory)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    src.add_argument("--chat", help="a user message, rendered with the chat format")
    p.add_argument("--no-thinking", action="store_true", help="with --chat: open the answer with <think></think>")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32 (default on CPU) or bfloat16 (default elsewhere)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    import jax

    from kimi_jax.chat import parse_output, render_chat
    from kimi_jax.chat_parse import ChatFormatError
    from kimi_jax.demo import DEMO_PROMPT, demo_model
    from kimi_jax.generate import generate
    from kimi_jax.loading import load
    from kimi_jax.tokenizer import TokenizerError, load_tokenizer

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if args.checkpoint:
        model = load(args.checkpoint, dtype=dtype)
        try:
            tokenizer = load_tokenizer(args.checkpoint)
        except TokenizerError:
            if args.prompt_ids is None:
                raise
            tokenizer = None
    else:
        model, tokenizer = demo_model(dtype=dtype)

    if args.prompt_ids is not None:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    elif args.chat is not None:
        prompt = render_chat([{"role": "user", "content": args.chat}], tokenizer, thinking=not args.no_thinking)
    else:
        prompt = tokenizer.encode(args.prompt if args.prompt is not None else DEMO_PROMPT)
    stop_ids = list(tokenizer.stop_ids) if tokenizer else [t for t in [model.cfg.eos_token_id] if t is not None]

    result = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_ids=stop_ids,
                      pad_id=model.cfg.pad_token_id or 0)
    tokens = result.tokens[0]
    stats = {"prompt_tokens": len(prompt), "new_tokens": len(tokens), "compile_s": round(result.compile_s, 3),
             "prefill_s": round(result.prefill_s, 4), "decode_s": round(result.decode_s, 4),
             "decode_tokens_per_s": round(result.decode_tokens_per_s, 1)}
    out = {"tokens": tokens, **stats}
    if tokenizer is not None:
        out["text"] = tokenizer.decode(tokens, skip_special=True)
        if args.chat is not None:
            try:
                parsed = parse_output(tokens, tokenizer)
                out.update(reasoning=parsed.reasoning, content=parsed.content,
                           tool_calls=[vars(c) for c in parsed.tool_calls])
            except ChatFormatError as e:  # the model's output, not the user's input: show it, say why
                print(f"kimi-jax generate: warning: could not parse the reply as chat output ({e})",
                      file=sys.stderr)
                out.update(reasoning=None, content=out["text"], tool_calls=[])
    if args.json:
        print(json.dumps(out))
        return 0
    if args.chat is not None and tokenizer is not None:
        if out["reasoning"]:
            print(f"[reasoning] {out['reasoning']}")
        print(out["content"])
        for call in out["tool_calls"]:
            print(f"[tool call] {call['name']}({json.dumps(call['arguments'])})")
    else:
        print(out.get("text", " ".join(map(str, tokens))))
    print(f"[{stats['prompt_tokens']} prompt tokens, {stats['new_tokens']} new; compile {stats['compile_s']} s, "
          f"prefill {stats['prefill_s'] * 1e3:.1f} ms, decode {stats['decode_tokens_per_s']} tokens/s]",
          file=sys.stderr)
    return 0


def _add_convert(sub):
    from convert.cli import add_arguments

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to a sharded Orbax checkpoint",
                       description="Convert a Hugging Face safetensors checkpoint (bf16, FP8 block or INT4 "
                                   "pack-quantized) into an Orbax checkpoint that kimi_jax.load(DST, mesh=...) "
                                   "restores directly onto a mesh.")
    add_arguments(p)
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    from convert.cli import run
    from kimi_jax.config import KimiConfig

    # The converter checks tensors; the model config (router, rope, activation) is checked here, so a
    # checkpoint kimi-jax cannot run is refused before hours of conversion rather than at load time.
    KimiConfig.from_pretrained(args.src)
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-jax", description="Kimi K2.6 in JAX: generate, convert, ...")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_convert(sub)
    add_finetune(sub)
    add_export(sub)
    add_bench(sub)
    add_plan(sub)
    add_serve(sub)
    return parser


def main(argv=None) -> int:
    from convert.errors import CheckpointError
    from kimi_jax.chat_parse import ChatFormatError
    from kimi_jax.config import ConfigError
    from kimi_jax.tokenizer import TokenizerError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, ConfigError, TokenizerError, ChatFormatError, ValueError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"kimi-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


# glibc (>= 2.35) backs large allocations with transparent huge pages when told so. XLA:CPU allocates an
# executable's temporaries afresh for every run, and on 4 KiB pages each run then takes a page fault per 4 KiB
# it writes: a decode step that slices 72 MB of experts took 18K faults (measured: ~1.5 us each, two thirds of
# the MoE time). Huge pages fault once per 2 MiB. The setting must be in place before the process starts.
_TUNABLE = "glibc.malloc.hugetlb=1"


def console_main() -> int:
    """The `kimi-jax` console script: `main`, in a process started with huge-page allocations (re-executing
    itself once to set them; KIMI_JAX_NO_REEXEC=1 or a GLIBC_TUNABLES of your own skips it)."""
    if (sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ
            and os.environ.get("KIMI_JAX_NO_REEXEC") != "1"):
        env = {**os.environ, "GLIBC_TUNABLES": _TUNABLE}
        try:
            os.execve(sys.executable, [sys.executable, "-m", "kimi_jax", *sys.argv[1:]], env)
        except OSError:
            pass  # run as we are
    return main()


if __name__ == "__main__":
    sys.exit(main())
