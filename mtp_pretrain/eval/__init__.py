"""Evaluation tasks of the multi-token-prediction paper that do not depend on the model.

Each module plugs into a model through a plain callable, so it needs neither the model nor the
trainer:

* `polynomial`: polynomial arithmetic over F7[X]/(X^5) (section 4.2); scored with
  `generate(prompts, max_new_tokens) -> completions`.
* `induction`: two-token names in generated stories (section 4.1); scored with
  `next_token_logits(token_ids) -> [len, V]` and any tokenizer with encode/decode.
* `humaneval`: HumanEval pass@k with execution in `sandbox` (best-effort isolation).

See docs/eval.md.
"""
