"""Expert-parallel MoE: each device of the "expert" mesh axis holds E/n routed experts, and expert weights never
move (gathering them, w[idx] under a sharded expert axis, is what XLA would do otherwise: the whole expert
stack all-gathered every layer, SPEC.md section 7). Two exchanges, chosen by the capacity rule:

- dropless (capacity_factor=None, the default): every device all-gathers the tokens (and routing) of its
  expert group along the axis, runs its own experts on the pairs that chose them, and a reduce-scatter sums
  each token's shares back on the device that holds the token. Nothing is dropped.
- capacity-limited (capacity_factor=f): tokens travel to the devices that own their experts and back through
  two all_to_all exchanges, each source device packing its pairs into C = ceil(f * N_local * X / n) rows per
  destination. Pairs past a destination's C, in token order on each source device, are DROPPED: they
  contribute zero to their token (the token still gets its other experts and the shared expert).
  `dispatch_plan` reproduces the rule.

Why the gather for dropless: a dropless all_to_all buffer needs N_local * min(X, E_local) rows per
destination (a token's X experts are distinct, so at most min(X, E_local) live on one device), n * C =
N_group * min(X, E_local) rows in all, and the dispatch moves it four times (pack, send, return, unpack),
while the gather moves N_group rows in and out once. Measured on the full K2.6 decode plan (v5p-128, one token
per chip): the all_to_all buffers were 384 rows of [7168] per chip per layer for ~8 real pairs. The
all_to_all wins when a capacity makes C small (f * X < n), which is why prefill and training plans use one.

Sizes: N tokens, X experts per token, P = N*X pairs, E experts, n devices on the expert axis, C rows per
destination, R = n*C rows a device receives, G = n * N_local tokens of one expert group.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels_pallas.moe_gmm import combine_pairs, sort_pairs

EXPERT_AXIS = "expert"


def expert_axis_size(mesh, axis: str = EXPERT_AXIS) -> int:
    """Devices along `axis` of `mesh` (1 when the mesh is empty or has no such axis)."""
    if mesh is None or mesh.empty or axis not in mesh.axis_names:
        return 1
    return mesh.shape[axis]


def capacity(tokens_local: int, top_k: int, num_experts: int, n: int, capacity_factor: float) -> int:
    """Rows per destination device in the all_to_all dispatch buffer (see the module docstring), at most the
    N_local * min(X, E_local) pairs one device's tokens can send to one destination."""
    most = tokens_local * min(top_k, num_experts // n)
    return max(1, min(most, math.ceil(capacity_factor * tokens_local * top_k / n)))


def dispatch_plan(experts_NX, num_experts: int, n: int, cap: int):
    """Where each pair of one source device goes: (slot_P, keep_P). slot = destination * cap + rank among the
    pairs this device sends to that destination (pair order: token-major); keep is False for pairs past the
    capacity and for padding pairs (expert id >= num_experts). Dropped pairs get slot n * cap (past the buffers)."""
    experts_P = experts_NX.reshape(-1)
    valid_P = experts_P < num_experts
    dest_P = jnp.where(valid_P, experts_P // (num_experts // n), 0)
    onehot_PJ = (dest_P[:, None] == jnp.arange(n)[None, :]) & valid_P[:, None]
    rank_P = jnp.take_along_axis(jnp.cumsum(onehot_PJ, axis=0) - 1, dest_P[:, None], axis=1)[:, 0]
    keep_P = valid_P & (rank_P < cap)
    return jnp.where(keep_P, dest_P * cap + rank_P, n * cap), keep_P


def moe_expert_parallel(x_ND, weights_NX, experts_NX, w_gate_EDF, w_up_EDF, w_down_EFD, *,
                        local_ffn: Callable, mesh=None, axis: str = EXPERT_AXIS,
                        capacity_factor: float | None = None, layer=None):
    """sum_x weights[n, x] * FFN_{experts[n, x]}(x[n]) with the experts sharded over `axis` of `mesh`
    (default: the ambient mesh, `jax.set_mesh`). Without such an axis (or of size 1) it is `local_ffn` itself.

    local_ffn(x_RD, weights_RX, experts_RX, w_gate, w_up, w_down) -> [R, D] is the single-device grouped FFN
    (kimi_jax.moe.experts_grouped); it must skip pairs whose expert id is >= the number of experts it holds,
    which is how pairs for other devices and empty buffer rows (id E_local) cost nothing. Weights may be dense
    arrays or INT4 pytrees whose leaves all lead with the expert axis. `layer`: every weight leaf leads with a
    layers axis before the expert axis, and local_ffn takes `layer=` (the Pallas kernels read that layer of the
    stacks in place)."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    n = expert_axis_size(mesh, axis)

    def ffn(*args, layer):  # local_ffn, told the layer only when there is one (the XLA local FFNs take none)
        return local_ffn(*args) if layer is None else local_ffn(*args, layer=layer)

    if n == 1:
        return ffn(x_ND, weights_NX, experts_NX, w_gate_EDF, w_up_EDF, w_down_EFD, layer=layer)
    lead = 0 if layer is None else 1  # the expert axis of each weight leaf
    E = jax.tree.leaves(w_gate_EDF)[0].shape[lead]
    if E % n:
        raise ValueError(f"expert parallelism: n_routed_experts={E} is not divisible by mesh axis {axis!r} of "
                         f"size {n}")
    E_local = E // n
    N, D = x_ND.shape
    X = experts_NX.shape[1]
    # Tokens are split over every mesh axis (each device dispatches its own share); pad N to a multiple of the
    # device count with pairs that go nowhere (expert id E) and weigh nothing.
    token_axes = tuple(mesh.axis_names)
    devices = math.prod(mesh.shape[a] for a in token_axes)
    N_pad = -(-N // devices) * devices
    if N_pad != N:
        x_ND = jnp.pad(x_ND, ((0, N_pad - N), (0, 0)))
        weights_NX = jnp.pad(weights_NX, ((0, N_pad - N), (0, 0)))
        experts_NX = jnp.pad(experts_NX, ((0, N_pad - N), (0, 0)), constant_values=E)

    def gather_dispatch(x_nD, weights_nX, experts_nX, w_gate, w_up, w_down, layer):
        x_GD = jax.lax.all_gather(x_nD, axis, tiled=True)  # the expert group's tokens, in device order
        weights_GX = jax.lax.all_gather(weights_nX, axis, tiled=True)
        experts_GX = jax.lax.all_gather(experts_nX, axis, tiled=True)
        mine_GX = (experts_GX // E_local == jax.lax.axis_index(axis)) & (experts_GX < E)  # padding pairs: id E
        local_id_GX = jnp.where(mine_GX, experts_GX % E_local, E_local)  # E_local: not here, skipped
        y_GD = ffn(x_GD, weights_GX, local_id_GX, w_gate, w_up, w_down, layer=layer)  # this device's share
        # Summed in float32: a token's X experts sit on up to X devices.
        out_nD = jax.lax.psum_scatter(y_GD.astype(jnp.float32), axis, scatter_dimension=0, tiled=True)
        return out_nD.astype(x_nD.dtype)

    def all_to_all_dispatch(x_nD, weights_nX, experts_nX, w_gate, w_up, w_down, layer):
        Nl = x_nD.shape[0]
        cap = capacity(Nl, X, E, n, capacity_factor)
        slot_P, keep_P = dispatch_plan(experts_nX, E, n, cap)
        token_P = jnp.arange(Nl * X) // X
        # Send buffers [n, C, .]: block j goes to device j; dropped pairs (slot n * C, past the end) are not
        # written (mode="drop": no dump row to slice off, a copy of the buffer every layer).
        send_x_JCD = jnp.zeros((n * cap, D), x_nD.dtype).at[slot_P].set(x_nD[token_P], mode="drop").reshape(n, cap, D)
        local_id_P = jnp.where(keep_P, experts_nX.reshape(-1) % E_local, E_local)
        send_e_JC = jnp.full((n * cap,), E_local, jnp.int32).at[slot_P].set(local_id_P, mode="drop").reshape(n, cap)
        recv_x_JCD = jax.lax.all_to_all(send_x_JCD, axis, 0, 0, tiled=True)  # block j: from device j
        recv_e_JC = jax.lax.all_to_all(send_e_JC, axis, 0, 0, tiled=True)
        R = n * cap
        y_RD = ffn(recv_x_JCD.reshape(R, D), jnp.ones((R, 1), jnp.float32), recv_e_JC.reshape(R, 1), w_gate, w_up,
                   w_down, layer=layer)
        back_JCD = jax.lax.all_to_all(y_RD.reshape(n, cap, D), axis, 0, 0, tiled=True)  # block j: from device j
        y_PD = jnp.take(back_JCD.reshape(R, D), slot_P, axis=0, mode="fill", fill_value=0)  # dropped pairs: 0
        out_nD = jnp.einsum("nxd,nx->nd", y_PD.reshape(Nl, X, D).astype(jnp.float32), weights_nX)
        return out_nD.astype(x_nD.dtype)

    w_spec = lambda w: jax.tree.map(lambda _: P(*(None,) * lead, axis), w)  # noqa: E731  (the expert axis only)
    tok = P(token_axes)
    dispatch = gather_dispatch if capacity_factor is None else all_to_all_dispatch
    out_ND = jax.shard_map(dispatch, mesh=mesh, in_specs=(tok, tok, tok, w_spec(w_gate_EDF), w_spec(w_up_EDF),
                                                          w_spec(w_down_EFD), P()),
                           out_specs=tok, check_vma=False)(x_ND, weights_NX, experts_NX, w_gate_EDF, w_up_EDF,
                                                           w_down_EFD, layer)
    return out_ND[:N]


def experts_ragged(x_RD, weights_RX, experts_RX, w_gate_EDF, w_up_EDF, w_down_EFD):
    """A local expert FFN for TPU: rows sorted by expert, then `jax.lax.ragged_dot` (a grouped matmul that
    reads each expert's matrices once; cost_analysis counts it, unlike a loop over tiles, whose body it counts
    once). Pairs are sorted and combined as the Pallas expert FFN does it (kernels_pallas.moe_gmm.sort_pairs,
    combine_pairs). Pairs with expert id >= E sort last, outside every group, and contribute zero. On CPU
    ragged_dot is a dense loop over experts (SPEC.md section 7): there use kimi_jax.moe.experts_grouped. INT4 stacks are
    dequantized whole (`.dequantize`), which reads the packed bytes once."""
    dense = [w.dequantize(x_RD.dtype) if hasattr(w, "dequantize") else w for w in (w_gate_EDF, w_up_EDF, w_down_EFD)]
    E = dense[0].shape[0]
    x_PD, sizes_E, order_P = sort_pairs(x_RD, experts_RX, E, experts_RX.size)  # ids >= E are not counted
    h_PF = jax.nn.silu(jax.lax.ragged_dot(x_PD, dense[0], sizes_E)) * jax.lax.ragged_dot(x_PD, dense[1], sizes_E)
    y_PD = jax.lax.ragged_dot(h_PF, dense[2], sizes_E)
    return combine_pairs(y_PD, order_P, jnp.where(experts_RX < E, weights_RX, 0.0), x_RD.dtype)
