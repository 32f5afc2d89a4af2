"""Training: settings, plans (LightningModules) and the one driver that runs them."""
