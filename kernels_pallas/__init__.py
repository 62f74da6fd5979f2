"""Pallas TPU kernels, each file beside the pure-jnp reference of the same signature it is tested against:

- mla_decode:  weight-absorbed MLA decode attention over the latent cache (flash-decoding, ragged lengths)
- mla_prefill: causal flash attention with MLA head widths (nope + shared rope key, own value width)
- moe_gmm:     grouped matmul over expert-sorted rows (group sizes by scalar prefetch) and the expert FFN
- moe_gmm_int4: the same over packed-INT4 experts as kimi_jax/quant.py keeps them, dequantized in VMEM

The model reaches them through `KimiConfig.attention_impl` / `moe_impl` = "pallas" (and moe_impl="ep_pallas"
inside the expert-parallel MoE); under a mesh they run per shard. Off TPU they run in interpret mode. Block sizes are tables keyed by chip generation; README.md beside this file has the bytes,
FLOPs and roofline times at Kimi K2.6 sizes.
"""
