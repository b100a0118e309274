"""Input pipelines: LAION-format training sources, evaluation and classification data sets (one
data-set name grammar, `dataset_spec`), vocabularies, image transforms and the demo set."""
