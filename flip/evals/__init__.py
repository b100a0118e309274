"""Evaluators as plug-ins: named evaluators configured in `config.evals` (docs/EVALUATORS.md).

`flip.evals.registry`: the `Evaluator` base class, `EvalContext`, `register_evaluator` and
`build_evaluators`; `flip.evals.core`: the sharded, padded, counted evaluation every evaluator
shares; one module per built-in type (zeroshot, retrieval, classification, reconstruction);
`flip.evals.eval_only`: restore a checkpoint, then run `config.evals`. Nothing is imported here:
importing the package has no side effects and pulls in no data or model code.
"""
