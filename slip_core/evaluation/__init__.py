"""Evaluation of pretrained checkpoints in the paper's settings (SPEC §7): zero-shot classification,
linear probe (reference recipe + fast path), end-to-end fine-tune (BEiT recipe, torchrun) and retrieval.

`tasks.run_task(task, model, dataset, EvalConfig)` is the single entry point the Prefect flow
(flows/evaluate.py) and the CLI (flows/cli_eval.py) share; datasets come from `datasets.catalog`.
"""
