"""n4-train: pretraining, SFT, reward models, DPO/RPO and synthetic data generation for Nemotron-4."""
