"""The shared LightningModule, the fit loop with EMA and resume, and the training stages."""
