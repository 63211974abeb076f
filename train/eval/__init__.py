"""Evaluation on the training engine: scoring.py (the one batched, jitted log-likelihood scorer),
requests.py (text -> requests as lm-eval builds them), perplexity.py / choice.py / generation.py
(the task kinds), tasks.py (a suite from `eval.tasks`), lm_eval_adapter.py (lm-eval's `lmlab` model)."""
