"""Meshes, the one table of logical-axis rules, and the shardings of params, KV caches and activations.

Sharding is a property of the params and of the cache, not of a decoding method:

- `shard_params(params, mesh)` places every param by its logical axes (`PARAM_AXES`), once, at load time.
- Inside `use_mesh(mesh)` (which `LM.generate` and `LM.logits` enter when the LM has a mesh), every cache made
  by `kvcache.init_cache` or written by `model.run_layers` is constrained to `CACHE_AXES`, and `run_layers`
  constrains its activations to `ACTIVATION_AXES`. Outside a mesh all of these are no-ops, so single-device
  code is unchanged. A method's own jitted step needs nothing more; one that builds caches or batch-major
  arrays by other means calls `constrain_cache(cache)` / `constrain(x, logical_axes)` on them.

Each logical axis maps to one mesh axis or to None (replicated). An array may not use one mesh axis for two
of its dims (that fails loudly); a dim the mesh axis does not divide (SmolLM2's 9 query / 3 KV heads on a
`model` axis of 2) is replicated instead, and the reason is logged once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from hdjax.config import WEIGHT_AXES
from hdjax.errors import HdjaxError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "model")

# The rules: logical axis -> mesh axis (None: replicated). Data parallel over the batch; Megatron-style model
# parallel over vocab, heads and MLP, with d_model, head_dim, cache length and the layer stack replicated.
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("length", None),
    ("layers", None),
    ("vocab", "model"),
    ("embed", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("fused", None),  # a fused weight's parts (a kv head's q/k/v, gate/up), kept together on each device
)

# The logical axis of each of `model.py`'s axis letters.
AXIS_LETTERS = {"D": "embed", "N": "heads", "K": "kv_heads", "H": "head_dim", "F": "mlp", "V": "vocab", "C": "fused"}

# Logical axes of every param, by its name in `model.py` (each decoder layer has its own params), in both weight
# layouts (`config.WEIGHT_AXES`).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embedding_vd": ("vocab", "embed"),
    **{f"{weight}_{axes.lower()}": tuple(AXIS_LETTERS[a] for a in axes)
       for weight, layouts in WEIGHT_AXES.items() for axes in layouts},
    "scale": ("embed",),  # RMSNorm scales: attn_norm, mlp_norm, final_norm
}

# Logical axes of the `KVCache` fields.
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("layers", "batch", "kv_heads", "length", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
    "lengths": ("batch",),
}

# Logical axes of the activations `run_layers` carries.
ACTIVATION_AXES: dict[str, tuple[str, ...]] = {
    "h_btd": ("batch", "length", "embed"),
}


def make_mesh(data: int | None = None, model: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, model) mesh with Auto axes (GSPMD propagation) over `devices` (default: all devices).

  Give either size and the other fills the devices; give neither and all devices go to `model`.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data is None and model is None:
    data = 1
  data = n // model if data is None else data
  model = n // data if model is None else model
  if data < 1 or model < 1 or data * model != n:
    raise HdjaxError(f"mesh data={data} x model={model} does not cover the {n} devices")
  return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def auto_mesh(mesh: Mesh) -> Mesh:
  """`mesh` with Auto axis types: any `jax.sharding.Mesh` whose axes are "data" and "model" (in any order), e.g.
  `jax.make_mesh((4, 2), ("data", "model"))`, whose Explicit axes jax's sharding-in-types would otherwise apply
  to every op (the embedding gather then has no sharding rule)."""
  if not isinstance(mesh, Mesh):
    raise HdjaxError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if sorted(mesh.axis_names) != sorted(MESH_AXES):
    raise HdjaxError(f"mesh axes must be {MESH_AXES}, got {tuple(mesh.axis_names)} (see hdjax.sharding.make_mesh)")
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _rule_table(rules: Sequence[tuple[str, str | None]]) -> dict[str, str | None]:
  table = dict(rules)
  if len(table) != len(rules):
    raise HdjaxError(f"sharding rules name a logical axis twice: {[name for name, _ in rules]}")
  unknown = {m for m in table.values() if m is not None} - set(MESH_AXES)
  if unknown:
    raise HdjaxError(f"sharding rules use mesh axes {sorted(unknown)} not in {MESH_AXES}")
  return table


@functools.lru_cache(maxsize=None)
def _log_replicated(what: str, reason: str) -> None:
  log.info("sharding: replicating %s: %s", what, reason)


def logical_to_spec(logical_axes: Sequence[str], shape: Sequence[int], mesh_shape: Mapping[str, int],
                    rules: Sequence[tuple[str, str | None]] = RULES, what: str = "array") -> PartitionSpec:
  """The PartitionSpec of an array of `shape` whose dims have `logical_axes`.

  Raises on a collision (two dims mapped to one mesh axis) or an axis with no rule; replicates, with a logged
  reason, a dim the mesh axis does not divide.
  """
  table = _rule_table(rules)
  if len(logical_axes) != len(shape):
    raise HdjaxError(f"{what}: logical axes {tuple(logical_axes)} do not match its shape {tuple(shape)}")
  spec, used = [], {}
  for name, size in zip(logical_axes, shape):
    if name not in table:
      raise HdjaxError(f"{what}: no sharding rule for logical axis {name!r}")
    axis = table[name]
    if axis is not None and axis in used:
      raise HdjaxError(f"{what}: logical axes {used[axis]!r} and {name!r} both map to mesh axis {axis!r}")
    if axis is not None:
      used[axis] = name
    ways = mesh_shape.get(axis, 1) if axis is not None else 1
    if ways > 1 and size % ways:
      _log_replicated(what, f"{name}={size} is not divisible by mesh axis {axis}={ways}")
      axis = None
    spec.append(axis if ways > 1 else None)
  return PartitionSpec(*spec)


def param_logical_axes(path: Sequence[Any]) -> tuple[str, ...]:
  """Logical axes of the param at a pytree `path` (keys of `{'embedder': ..., 'layers': (per-layer dicts)}`)."""
  keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
  name = keys[-1]
  if name not in PARAM_AXES:
    raise HdjaxError(f"param {'/'.join(map(str, keys))} has no logical axes: add {name!r} to "
                     f"hdjax.sharding.PARAM_AXES")
  return PARAM_AXES[name]


def param_specs(params: Any, mesh: Mesh | jax.sharding.AbstractMesh,
                rules: Sequence[tuple[str, str | None]] = RULES) -> Any:
  """PartitionSpecs for a params pytree (arrays or ShapeDtypeStructs)."""
  def spec(path, x):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return logical_to_spec(param_logical_axes(path), x.shape, dict(mesh.shape), rules, f"param {name}")
  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = RULES) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules))


def shard_params(params: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = RULES) -> Any:
  """Places params on `mesh` by their logical axes (dtypes unchanged)."""
  return jax.device_put(params, param_shardings(params, mesh, rules))


def cache_specs(shapes: Mapping[str, Sequence[int]], mesh_shape: Mapping[str, int]) -> dict[str, PartitionSpec]:
  """The PartitionSpec of each `KVCache` field of the given shapes (`kvcache.cache_shardings` builds on it)."""
  return {f: logical_to_spec(CACHE_AXES[f], shapes[f], mesh_shape, what=f"cache.{f}") for f in CACHE_AXES}


def current_mesh_shape() -> dict[str, int] | None:
  """Axis sizes of the mesh set by `use_mesh` (inside or outside jit), or None without one."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else dict(mesh.shape)


def constrain(x: jax.Array, logical_axes: Sequence[str], what: str = "activation") -> jax.Array:
  """`with_sharding_constraint` by logical axes under the current mesh; the identity without one."""
  mesh_shape = current_mesh_shape()
  if mesh_shape is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh_shape, what=what))


def constrain_cache(cache):
  """The cache constrained to `CACHE_AXES` under the current mesh; unchanged without one."""
  mesh_shape = current_mesh_shape()
  if mesh_shape is None:
    return cache
  fields = {f: getattr(cache, f) for f in CACHE_AXES}
  specs = cache_specs({f: x.shape for f, x in fields.items()}, mesh_shape)
  return cache.replace(**{f: jax.lax.with_sharding_constraint(x, specs[f]) for f, x in fields.items()})


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[None]:
  """Runs the body under `mesh` (so the constraints above apply); does nothing for None."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh):
    yield


def describe(tree: Any) -> Any:
  """The PartitionSpec of every array in a pytree, for printing and tests."""
  return jax.tree.map(lambda x: x.sharding.spec if isinstance(x.sharding, NamedSharding) else None, tree)


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a pytree of (possibly sharded) arrays."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))
