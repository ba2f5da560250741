"""Pure torch / numpy / scikit-learn: model families, estimators, the domain classifier and metric math.

Nothing in here imports Prefect, DVC, MLflow, or any other madloop package.
"""
