"""Orbax checkpoints of a whole training run: ``TrainState`` (model, optimizer, step, RNG) + data iterator
state.

The only module of the package that imports orbax. One ``Checkpointer`` wraps an ``ocp.CheckpointManager``:

* items per step: ``state`` (arrays, as a nested dict keyed by the pytree path so checkpoints stay readable
  and independent of pytree node classes), ``data`` (the iterator's ``get_state()``, JSON) and ``meta`` (JSON:
  the config and anything else the caller wants kept with the weights);
* atomic: orbax writes a step into a temporary folder and renames it only once every item is on disk, and
  ``latest_step`` lists finalized steps only, so a process killed mid-write leaves nothing that restores and
  the previous checkpoint is used;
* the newest ``keep`` are kept; saving can be asynchronous (training continues while arrays are written).

Beside it, what guards and reads a run's checkpoints: :func:`config_changes` (resume refuses a checkpoint
written under another experiment config), :class:`InitConfig` (where a fine-tune or inference run takes its
weights) and :func:`restore_model` (a run's trained model, params only, rebuilt from the config stored with
it).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from selmerge_jax.config_io import from_dict
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.models.llama import Llama
from selmerge_jax.models.lora import LoRAConfig, apply_lora
from selmerge_jax.models.lora import trainable_filter as lora_filter
from selmerge_jax.training.config import TrainConfig
from selmerge_jax.validation import check_choice, check_positive_int

__all__ = ["RESUMABLE_CHANGES", "Checkpointer", "InitConfig", "config_changes", "nested_to_tree",
           "restore_model",
           "stack_layer_entries", "stored_meta", "tree_to_nested"]


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _paths(tree) -> tuple[list[tuple[str, ...]], list, Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [tuple(_key_name(k) for k in path) for path, _ in flat], [leaf for _, leaf in flat], treedef


def tree_to_nested(tree) -> dict:
    """Any pytree -> nested dict of its leaves keyed by path components (``params/layers/0/kernel/value``)."""
    out: dict = {}
    for path, leaf in zip(*_paths(tree)[:2]):
        if not path:
            raise ValueError("tree_to_nested needs a container pytree, got a bare leaf")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = leaf
    return out


def nested_to_tree(nested: dict, target):
    """Inverse of :func:`tree_to_nested`: leaves of ``nested`` put into ``target``'s structure."""
    paths, _, treedef = _paths(target)
    leaves = []
    for path in paths:
        node = nested
        for part in path:
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"checkpoint has no entry {'/'.join(path)} that the target state expects "
                               "(was it written by a different model or optimizer config?)")
            node = node[part]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def stack_layer_entries(nested):
    """``{'layers': {'0': tree, '1': tree, ...}}`` anywhere in ``nested`` -> ``{'layers': tree of [L, ...]}``.

    Returns ``nested`` itself (the same object) when it holds no per-layer subtrees.
    """
    if not isinstance(nested, dict):
        return nested
    out, changed = {}, False
    for key, value in nested.items():
        if key == "layers" and isinstance(value, dict) and value and all(k.isdigit() for k in value):
            layers = [stack_layer_entries(value[str(i)]) for i in range(len(value))]
            out[key] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
            changed = True
        else:
            out[key] = stack_layer_entries(value)
            changed = changed or out[key] is not value
    return out if changed else nested


def _like(value, target):
    """``value`` with ``target``'s dtype, and its sharding when it has one."""
    value = np.asarray(value).astype(target.dtype)
    sharding = getattr(target, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)


def _abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _restore_args(x: jax.ShapeDtypeStruct):
    local = jax.local_devices()[0]  # this process's: in a multi-process job jax.devices()[0] may be another's
    sharding = x.sharding if x.sharding is not None else jax.sharding.SingleDeviceSharding(local)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=x.shape, dtype=x.dtype)


def _json_safe(state):
    """Grain iterators may hand back ``bytes``; JSON needs text."""
    if isinstance(state, bytes):
        return {"__bytes_b64__": base64.b64encode(state).decode("ascii")}
    if isinstance(state, dict):
        return {str(k): _json_safe(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_json_safe(v) for v in state]
    return state


def _from_json_safe(state):
    if isinstance(state, dict):
        if set(state) == {"__bytes_b64__"}:
            return base64.b64decode(state["__bytes_b64__"])
        return {k: _from_json_safe(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_from_json_safe(v) for v in state]
    return state


def stored_meta(directory: str | os.PathLike, step: int) -> dict:
    """The JSON ``meta`` of a finalized checkpoint step, read as a file: no JAX backend, no orbax manager (a
    coordinating process that must not take device memory can check which config a run was trained with)."""
    path = os.path.join(os.fspath(directory), str(step), "meta", "metadata")
    with open(path, encoding="utf-8") as f:
        return _from_json_safe(json.load(f)) or {}


class Checkpointer:
    """Saves and restores ``(TrainState, data_state, meta)`` by optimizer step."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        check_positive_int("keep", keep)
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        """The newest *finalized* step (a half-written one is invisible), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, *, data_state=None, meta: dict | None = None) -> bool:
        """Starts saving ``state`` as ``step`` (returns at once when async); False if that step exists."""
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree_to_nested(state)),
                                  data=ocp.args.JsonSave(_json_safe(data_state or {})),
                                  meta=ocp.args.JsonSave(_json_safe(meta or {})))
        return self._manager.save(step, args=args, force=True)

    def restore(self, target, step: int | None = None):
        """Returns ``(state, data_state, meta)`` of ``step`` (default newest), shaped and sharded like
        ``target``.

        ``target`` is a state of the same structure (concrete arrays or ``jax.ShapeDtypeStruct`` leaves); its
        shardings decide where restored arrays live.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
        abstract = tree_to_nested(jax.tree.map(_abstract, target))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
            state = nested_to_tree(restored["state"], target)
        except (ValueError, KeyError, TypeError) as error:
            restored, state = self._restore_per_layer(step, target, error)
        return state, _from_json_safe(restored["data"]) or None, _from_json_safe(restored["meta"]) or {}

    def _restore_per_layer(self, step: int, target, error: Exception):
        """A checkpoint of the model's earlier layout, one subtree per layer (``layers/0/...``), restored into
        today's stacked layers (``layers/...`` with a leading ``[L]`` axis); anything else re-raises
        ``error``."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        stacked = stack_layer_entries(restored["state"])
        if stacked is restored["state"]:
            raise error
        try:
            state = nested_to_tree(stacked, target)
        except KeyError:
            raise error from None
        state = jax.tree.map(_like, state, target)
        return restored, state

    def restore_parts(self, target: Mapping, step: int | None = None) -> dict:
        """Only the top-level entries of the ``state`` item named by ``target`` (e.g. ``{"params": ...,
        "rest": ...}``), shaped and sharded like it; nothing else of the step is read (an inference run never
        loads the optimizer moments, which for AdamW are twice the trainable parameters in float32).

        A checkpoint of the earlier per-layer layout is read entry by entry and stacked."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
        abstract = tree_to_nested(jax.tree.map(_abstract, dict(target)))
        try:
            restored = self._partial(step, abstract, jax.tree.map(_restore_args, abstract))
            return nested_to_tree(restored, dict(target))
        except (ValueError, KeyError, TypeError) as error:
            stored = self._manager.item_metadata(step)["state"]
            wanted = {k: stored[k] for k in abstract if k in stored}
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
            stacked = stack_layer_entries(self._partial(step, wanted, as_numpy))
            try:
                parts = nested_to_tree(stacked, dict(target))
            except KeyError:
                raise error from None
            return jax.tree.map(_like, parts, dict(target))

    def _partial(self, step: int, item, restore_args):
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)))
        return restored["state"]

    def read_meta(self, step: int | None = None) -> dict:
        """Only the JSON ``meta`` of a checkpoint (e.g. the config needed to rebuild the model before
        restore)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return _from_json_safe(restored["meta"]) or {}

    def wait(self):
        """Blocks until an asynchronous save has been finalized."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# What a resumed run may change: its length and bookkeeping, where files live, the device mesh. Anything else
# (model, data mix, optimizer, seed, CRD schedule...) makes "resume" continue a different experiment.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.progress",
                     "train.output_dir", "checkpoint.", "mesh.", "init.", "data.data_dir", "data.train_npy",
                     "data.validation_npy")


def config_changes(stored: Mapping, current: Mapping,
                   allowed: Sequence[str] = RESUMABLE_CHANGES) -> list[str]:
    """Dotted keys whose values differ between two ``config_to_dict`` trees, leaving out ``allowed`` keys and
    prefixes (ending in '.'); tuples and lists compare equal.

    A key on one side only is a field the other version of the code did not have (a checkpoint written before
    a field with a default was added): not a change. A value on one side where the other has a section (``crd:
    null`` against ``crd: {...}``) is.
    """
    flat_a, flat_b = _flatten(stored), _flatten(current)
    changed = {k for k in set(flat_a) & set(flat_b) if flat_a[k] != flat_b[k]}
    for key in set(flat_a) ^ set(flat_b):
        other = flat_b if key in flat_a else flat_a
        if any(o.startswith(key + ".") for o in other):
            changed.add(key)
    ok = lambda k: any(k == a or (a.endswith(".") and k.startswith(a)) for a in allowed)
    return sorted(k for k in changed if not ok(k))


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, Mapping) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: _plain(tree)}


def _plain(value):
    """JSON's view of a value (a checkpoint stores lists where the config holds tuples)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitConfig:
    """Where a fine-tune or inference run gets its weights.

    Attributes:
      kind: "checkpoint" (our orbax run directory; the model config is read from it), "hf" (a local Hugging
        Face Llama/Mistral directory) or "scratch" (random init from ``model``).
      path: the checkpoint directory (``.../checkpoints``) or HF directory.
      step: checkpoint step (default: the newest).
    """

    kind: Literal["checkpoint", "hf", "scratch"] = "scratch"
    path: str | None = None
    step: int | None = None

    def __post_init__(self):
        check_choice("InitConfig.kind", self.kind, ("checkpoint", "hf", "scratch"))
        if self.kind != "scratch" and not self.path:
            raise ValueError(f"InitConfig.path is required with kind={self.kind!r}")


def restore_model(checkpoint_dir: str, step: int | None = None) -> tuple[Llama, dict]:
    """The trained model of a run (weights of ``step``, default newest) and the run's stored config dict.

    The model is rebuilt from the stored config's ``model``, ``lora`` and ``train`` sections (a pretraining or
    a fine-tuning run alike; its weights come from this checkpoint, not from where it started). Only the
    ``params`` and ``rest`` entries of the train state are read, never the optimizer state.
    """
    ckpt = Checkpointer(checkpoint_dir)
    try:
        meta = ckpt.read_meta(step)
        stored = meta["config"]
        model_cfg = from_dict(ModelConfig, stored["model"], "model")
        lora = from_dict(LoRAConfig, stored["lora"], "lora") if stored.get("lora") else None
        train = from_dict(TrainConfig, stored.get("train"), "train")
        trainable = lora_filter(lora) if lora is not None else nnx.Param

        def build() -> Llama:
            model = Llama(model_cfg, rngs=nnx.Rngs(train.seed))
            if lora is not None:
                apply_lora(model, lora, rngs=nnx.Rngs(train.seed + 1))
            return model

        # Shapes only: nothing is initialised before the stored arrays arrive, and only the weights are read.
        graphdef, params, rest = nnx.split(nnx.eval_shape(build), trainable, ...)
        parts = ckpt.restore_parts({"params": params, "rest": rest}, step)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, parts["params"], parts["rest"]), stored
