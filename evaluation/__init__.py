"""Evaluation of pretrained checkpoints in the paper's settings (SPEC §7): zero-shot classification,
linear probe (reference recipe + fast path), end-to-end fine-tune (BEiT recipe, torchrun) and retrieval.

Layering: flows -> evaluation -> datasets -> slip_core. `tasks.run_task(task, model, dataset, EvalConfig)` is
the single entry point the Prefect flow (flows/evaluate.py) and the CLI (flows/cli_eval.py) share; named
settings are in `presets`; datasets come from `datasets.catalog`; the generic pieces (strict image reading,
batched feature extraction) from `slip_core.eval_images` / `slip_core.features`.
"""
