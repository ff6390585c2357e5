"""Synthetic datasets in the published layouts (MIMIC-CXR, the AD cohorts' tables and NIfTI
folders, CheXpert-v1.0), written to disk so that the real shard writers read them exactly as
they read downloaded data. Tests, the demo and the experiments use them; the shard commands do
not."""
