"""KimiConfig: the single source of sizes, read from Hugging Face config.json files.

Handles flat configs (DeepSeek-V3, Kimi-K2) and nested ones (Kimi K2.5/K2.6 keep the text model under
`text_config`), rope scaling spelled `rope_scaling` (with `type`) or `rope_parameters` (with `rope_type`).
Behaviour (routing, rope, quantization) is keyed on config fields only, never on a model's name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from kimi_jax.tokenizer import BYTE_VOCAB_SIZE


class ConfigError(ValueError):
    """A config.json that does not describe a model kimi-jax can run; the message names file and field."""


_TEXT_ARCHITECTURES = {"DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "KimiK2ForCausalLM"}
_NESTED_ARCHITECTURES = {"KimiK25ForConditionalGeneration", "Kimi_K25ForConditionalGeneration"}
_TEXT_MODEL_TYPES = {"deepseek_v3", "kimi_k2"}
_NESTED_MODEL_TYPES = {"kimi_k25"}
ATTENTION_IMPLS = ("xla", "pallas")
MOE_IMPLS = ("xla", "pallas", "ep", "ep_ragged", "ep_pallas")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the qk_rope_head_dim columns: plain (factor 1) or YaRN."""

    theta: float = 10000.0
    kind: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ExpertQuant:
    """Routed experts kept INT4 pack-quantized (symmetric, per-group scales; kimi_jax/quant.py)."""

    group_size: int = 32
    scale_dtype: str = "bfloat16"  # the checkpoint's: the product q * scale is rounded to it, as the reference

    def __post_init__(self):
        if self.group_size <= 0 or self.scale_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"expert_quant needs a positive group_size and a float scale_dtype, got "
                              f"{self.group_size}, {self.scale_dtype!r}")


@dataclasses.dataclass(frozen=True)
class KimiConfig:
    """Sizes and behaviour of the DeepSeek-V3-style text model (MLA + MoE)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    first_k_dense_replace: int
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = RopeConfig()
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # How the stacked layers run: "scan" keeps pod compiles fast; "unroll" avoids XLA:CPU copying each
    # layer's weights per iteration (SPEC.md section 7). Both are tested equal.
    layer_loop: str = "unroll"
    # Layers per scan iteration (layer_loop="scan"): `kimi-jax plan` compiles 1 and 2 and differences their
    # cost_analysis (which counts a loop body once) to get one layer's cost with the same partitioning.
    scan_unroll: int = 1
    # Rematerialisation of each decoder layer in the backward pass: "none", "full" (save only layer inputs),
    # or "dots" (keep matmul outputs, recompute the rest).
    remat: str = "none"
    # "xla", or "pallas": the kernels of kernels_pallas/ (run per shard under a mesh; interpreted off TPU).
    attention_impl: str = "xla"
    # "xla" (grouped tiles), "pallas" (grouped-matmul kernels), or expert-parallel over the mesh's "expert" axis
    # (sharding/expert_parallel.py) with each device's FFN as grouped tiles ("ep"), lax.ragged_dot
    # ("ep_ragged") or the Pallas kernels ("ep_pallas").
    moe_impl: str = "xla"
    # moe_impl="ep*" only: None is dropless; a float f caps each device's dispatch to f x the mean rows per
    # expert device and drops the overflow (sharding/expert_parallel.py states the rule).
    moe_capacity_factor: float | None = None
    # Routed experts held packed INT4 + scales (a checkpoint converted with --int4 keep); None: dense.
    expert_quant: ExpertQuant | None = None

    def __post_init__(self):
        if self.num_attention_heads <= 0 or self.hidden_size <= 0:
            raise ConfigError(f"hidden_size and num_attention_heads must be positive, got {self.hidden_size}, "
                              f"{self.num_attention_heads}")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ConfigError("group-limited routing needs at least 2 experts per group "
                              f"(n_routed_experts={self.n_routed_experts}, n_group={self.n_group})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                              f"n_routed_experts={self.n_routed_experts}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc":
            raise ConfigError(f"router scoring_func={self.scoring_func!r} topk_method={self.topk_method!r} is not "
                              "supported; kimi-jax implements sigmoid scoring with noaux_tc selection")
        if self.layer_loop not in ("scan", "unroll"):
            raise ConfigError(f"layer_loop must be 'scan' or 'unroll', got {self.layer_loop!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.moe_impl not in MOE_IMPLS:
            raise ConfigError(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.remat not in ("none", "full", "dots"):
            raise ConfigError(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(f"first_k_dense_replace={self.first_k_dense_replace} must be within "
                              f"[0, num_hidden_layers={self.num_hidden_layers}]")

    # Derived sizes.
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token per layer: the latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 as transformers applies it."""
        scale = self.qk_head_dim ** -0.5
        if self.rope.kind == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes: Any) -> "KimiConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> "KimiConfig":
        """Reads `config.json` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"{file}: no config.json found (expected a Hugging Face checkpoint directory)")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(file), **overrides)

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config", **overrides: Any) -> "KimiConfig":
        text = _text_config(raw, source)
        source = text.get("__source__", source)
        fields = _parse_text_config(text, source)
        try:
            return cls(**fields, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _text_config(raw: dict, source: str) -> dict:
    """The text model's fields: `text_config` of a nested Kimi K2.5/K2.6 config, or the flat config."""
    archs = set(raw.get("architectures") or [])
    model_type = raw.get("model_type")
    if "text_config" in raw:
        if model_type not in _NESTED_MODEL_TYPES and not archs & _NESTED_ARCHITECTURES:
            raise ConfigError(f"{source}: has a text_config but model_type={model_type!r} / architectures="
                              f"{sorted(archs)}; expected model_type 'kimi_k25'")
        text = dict(raw["text_config"])
        # Token ids may sit only at the top level of nested configs.
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            text.setdefault(key, raw.get(key))
        text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        source = f"{source} (text_config)"
        model_type = text.get("model_type")
    else:
        text = raw
        if archs and not archs & _TEXT_ARCHITECTURES:
            raise ConfigError(f"{source}: unknown architectures {sorted(archs)}; expected one of "
                              f"{sorted(_TEXT_ARCHITECTURES | _NESTED_ARCHITECTURES)}")
    if model_type not in _TEXT_MODEL_TYPES:
        raise ConfigError(f"{source}: model_type={model_type!r} is not a DeepSeek-V3-style text model; expected "
                          f"one of {sorted(_TEXT_MODEL_TYPES)}")
    text["__source__"] = source
    return text


_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
             "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size",
             "n_routed_experts", "num_experts_per_tok")


def _parse_text_config(text: dict, source: str) -> dict:
    source = text.pop("__source__", source)
    missing = [k for k in _REQUIRED if text.get(k) is None]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {missing}")
    if text.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported (Kimi and DeepSeek-V3 use false)")
    if text.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={text['hidden_act']!r} is not supported; expected 'silu'")
    heads = text["num_attention_heads"]
    if text.get("num_key_value_heads", heads) != heads:
        raise ConfigError(f"{source}: num_key_value_heads={text['num_key_value_heads']} must equal "
                          f"num_attention_heads={heads} (MLA has no grouped KV heads)")

    def token_id(key):
        value = text.get(key)
        return value[0] if isinstance(value, list) else value

    return dict(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=heads,
        q_lora_rank=text.get("q_lora_rank"),
        kv_lora_rank=text["kv_lora_rank"],
        qk_nope_head_dim=text["qk_nope_head_dim"],
        qk_rope_head_dim=text["qk_rope_head_dim"],
        v_head_dim=text["v_head_dim"],
        intermediate_size=text["intermediate_size"],
        moe_intermediate_size=text["moe_intermediate_size"],
        n_routed_experts=text["n_routed_experts"],
        num_experts_per_tok=text["num_experts_per_tok"],
        n_shared_experts=text.get("n_shared_experts") or 0,
        first_k_dense_replace=text.get("first_k_dense_replace", 0),
        n_group=text.get("n_group") or 1,
        topk_group=text.get("topk_group") or 1,
        routed_scaling_factor=float(text.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(text.get("norm_topk_prob", True)),
        scoring_func=text.get("scoring_func", "sigmoid"),
        topk_method=text.get("topk_method", "noaux_tc"),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=text.get("max_position_embeddings", 4096),
        rope=_parse_rope(text, source),
        rope_interleave=bool(text.get("rope_interleave", True)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("pad_token_id"),
    )


def _parse_rope(text: dict, source: str) -> RopeConfig:
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind != "yarn":
        raise ConfigError(f"{source}: rope type {kind!r} is not supported; expected 'default' or 'yarn'")
    original = params.get("original_max_position_embeddings")
    if original is None:
        raise ConfigError(f"{source}: yarn rope scaling needs original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:  # transformers' fallback: the context extension ratio
        factor = text.get("max_position_embeddings", original) / original

    def opt_float(key):
        return None if params.get(key) is None else float(params[key])

    return RopeConfig(theta=float(theta), kind="yarn", factor=float(factor),
                      original_max_position_embeddings=int(original),
                      beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                      mscale=opt_float("mscale"), mscale_all_dim=opt_float("mscale_all_dim"),
                      attention_factor=opt_float("attention_factor"), truncate=bool(params.get("truncate", True)))


_K26_YARN = RopeConfig(theta=50000.0, kind="yarn", factor=64.0, original_max_position_embeddings=4096,
                       beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)

PRESETS: dict[str, KimiConfig] = {
    "kimi-k2.6": KimiConfig(
        vocab_size=163840, hidden_size=7168, num_hidden_layers=61, num_attention_heads=64, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=18432,
        moe_intermediate_size=2048, n_routed_experts=384, num_experts_per_tok=8, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.827, norm_topk_prob=True,
        rms_norm_eps=1e-5, max_position_embeddings=262144, rope=_K26_YARN, bos_token_id=163584,
        eos_token_id=163585, pad_token_id=163839),
    "bench-mini": KimiConfig(
        vocab_size=32000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8, q_lora_rank=384,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=2816,
        moe_intermediate_size=256, n_routed_experts=128, num_experts_per_tok=8, n_shared_experts=1,
        first_k_dense_replace=1, routed_scaling_factor=2.827, rms_norm_eps=1e-5, max_position_embeddings=262144,
        rope=_K26_YARN),
    # The embedded demo model (kimi_jax/demo_model/, trained on the Python standard library): ~4M parameters.
    "demo": KimiConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=96,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=768,
        moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, routed_scaling_factor=2.5, rms_norm_eps=1e-5, max_position_embeddings=16384,
        rope=RopeConfig(theta=50000.0, kind="yarn", factor=4.0, original_max_position_embeddings=4096,
                        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)),
    # Small enough for every test; the vocabulary fits the byte-level tokenizer of the demo model.
    "tiny": KimiConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=128,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        rope=RopeConfig(theta=50000.0, kind="yarn", factor=4.0, original_max_position_embeddings=256,
                        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)),
}


def preset(name: str, **overrides: Any) -> KimiConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
