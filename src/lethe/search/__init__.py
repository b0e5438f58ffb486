"""MemControl: an Optuna search over which parameters of the U-Net to fine-tune."""
