"""Tasks of the one training loop: the contract and registry (`flip.tasks.registry`), FLIP's
contrastive task (`contrastive`), MAE pretraining (`mae`) and the classifier tasks, linear probe
and fine-tuning (`classifier`). Importing this package imports none of them."""
