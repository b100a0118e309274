"""Input pipelines: LAION-format sources, evaluation datasets, vocabularies and image transforms."""
