"""ml_collections config for `experiments/train_exit_heads.py` (AdaDecode exit heads on SmolLM2-135M)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "smollm2-135m"
  c.layers = (22, 24, 26, 28)  # heads to train (depth = number of layers run before the head)
  c.table_layers = tuple(range(2, 30, 2))  # layers whose identity-head agreement is measured
  c.num_train_seqs = 120  # ShareGPT first exchanges (chat template, teacher-forced)
  c.num_eval_seqs = 16  # held-out exchanges, taken after the training ones
  c.seq_len = 192  # the ShareGPT exchanges are cut to this many tokens
  c.greedy_seqs = 256  # user turns of the exchanges after the held-out ones, answered by the model itself
  c.greedy_tokens = 128  # new tokens per greedy reply
  # the dtype the replies are generated in: fp32, whose batched decode step at B = 8 took 86 ms against bf16's 300 ms
  # on this CPU (2026-11-29); the replies of the two differ rarely
  c.greedy_dtype = "float32"
  c.greedy_batch = 8  # prompts generated together
  c.steps = 400
  c.batch = 256  # token rows per step
  c.lr = 5e-3
  c.warmup_frac = 0.03
  c.weight_decay = 0.0
  c.seed = 0
  c.workdir = "results/exit_heads"  # orbax checkpoints (resumable) and metrics.jsonl
  c.ckpt_every = 10
  c.stop_after = -1  # > 0: stop after that many steps (simulates a killed run; rerun to resume)
  c.export_dir = "checkpoints/adadecode/smollm2-135m"  # final heads (orbax) + heads.json + vocab.json; "" to skip
  c.vocab_seqs = 2000  # more exchanges (after the held-out ones) whose replies rank the reduced head's candidates
  c.vocab_only = False  # only write export_dir/vocab.json (the heads there are kept)
  return c
