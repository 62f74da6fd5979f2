"""`kimi_jax.load`: a model from a Hugging Face safetensors directory or a converted Orbax checkpoint
(`kimi-jax convert`), optionally placed on a mesh."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from convert.errors import CheckpointError
from convert.mapping import load_param_tree
from convert.manifest import read_manifest
from convert.safetensors_io import SafetensorsCheckpoint
from kimi_jax.config import ExpertQuant, KimiConfig
from kimi_jax.model import KimiForCausalLM
from sharding.rules import SERVE, named_sharding


def resolve_dtype(dtype) -> jnp.dtype:
    try:
        return jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}; expected a name such as 'float32' or 'bfloat16'") from None


def load(path: str | Path, *, dtype="bfloat16", mesh=None, rules: dict = SERVE, progress: bool = True,
         **config_overrides) -> KimiForCausalLM:
    """Loads a checkpoint directory: a converted Orbax checkpoint (recognised by its manifest; see
    `load_converted`), or config.json + safetensors (flat or `language_model.`-prefixed names, single file or
    sharded with an index). With `mesh`, each parameter is placed as `rules` say.
    `config_overrides` replace KimiConfig fields (e.g. layer_loop="scan")."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint directory with config.json)")
    manifest = read_manifest(path)
    if manifest is not None:
        return load_converted(path, manifest, dtype=dtype, mesh=mesh, rules=rules, **config_overrides)
    cfg = KimiConfig.from_pretrained(path, **config_overrides)
    dtype = resolve_dtype(dtype)
    with SafetensorsCheckpoint(path) as reader:
        bar = tqdm(total=cfg.num_hidden_layers, desc=f"loading {path.name}", unit="layer", disable=not progress)
        with bar:
            tree = load_param_tree(reader, cfg, np.dtype(dtype), progress=bar.update)
    return model_from_tree(cfg, tree, dtype=dtype, mesh=mesh, rules=rules)


def load_converted(path: str | Path, manifest: dict, *, dtype="bfloat16", mesh=None, rules: dict = SERVE,
                   **config_overrides) -> KimiForCausalLM:
    """A model restored from a converted checkpoint: the abstract model gives every variable's shape, dtype and
    NamedSharding (from `rules` on `mesh`, else the default device), and Orbax reads each array straight into
    it, so a device reads only its own shards and no full copy is ever assembled on the host. Experts kept
    INT4 (`--int4 keep`) stay packed; everything else is cast to `dtype` as it is read."""
    path = Path(path)
    if manifest.get("experts") == "int4":
        config_overrides.setdefault("expert_quant", ExpertQuant(group_size=manifest["int4_group_size"],
                                                                scale_dtype=manifest["int4_scale_dtype"]))
    cfg = KimiConfig.from_pretrained(path, **config_overrides)
    graphdef, flat = _abstract_variables(cfg, resolve_dtype(dtype))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = {}
    for keys, variable in flat:
        name = "/".join(map(str, keys))
        sharding = (default if mesh is None else
                    named_sharding(name, variable.shape, variable.get_metadata()["axes"], mesh, rules))
        targets[name] = jax.ShapeDtypeStruct(tuple(variable.shape), variable.dtype, sharding=sharding)
    from convert.orbax_store import restore_params  # Orbax is imported only when a converted checkpoint is read

    arrays = restore_params(path, targets)
    for keys, variable in flat:
        variable.set_value(arrays["/".join(map(str, keys))])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _abstract_variables(cfg: KimiConfig, dtype):
    """The model's graph and its variables as shapes only (no random init is run)."""
    abstract = nnx.eval_shape(lambda: KimiForCausalLM(cfg, dtype=dtype))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_flat_state(state)


def model_from_tree(cfg: KimiConfig, tree: dict[str, np.ndarray], *, dtype=jnp.float32, mesh=None,
                    rules: dict = SERVE) -> KimiForCausalLM:
    """A model whose parameters are the arrays of a flat {"a/b/c": array} tree (no random init is run)."""
    graphdef, flat = _abstract_variables(cfg, dtype)
    missing = sorted({"/".join(map(str, p)) for p, _ in flat} - set(tree))
    if missing:
        raise CheckpointError(f"parameter tree lacks {missing[:5]} ({len(missing)} missing)")
    for path, variable in flat:
        name = "/".join(map(str, path))
        array = tree[name]
        if tuple(array.shape) != tuple(variable.shape):
            raise CheckpointError(f"parameter {name!r} has shape {tuple(array.shape)}, model expects "
                                  f"{tuple(variable.shape)}")
        if mesh is not None:
            sharding = named_sharding(name, array.shape, variable.get_metadata()["axes"], mesh, rules)
            # Each process builds only its own devices' shards. (device_put onto a mesh spanning several
            # processes would first all-gather the whole array from every process to check they agree.)
            host = array.astype(variable.dtype, copy=False)
            value = jax.make_array_from_callback(host.shape, sharding, lambda index, host=host: host[index])
        else:
            value = jnp.asarray(array, dtype=variable.dtype)
        variable.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
