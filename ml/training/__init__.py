"""Training: preprocessing, backbones and head, the feature cache, fitting, evaluation, the retrain."""
